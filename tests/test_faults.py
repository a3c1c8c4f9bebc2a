"""Faults of the three commands (docs/faults.md): bad images, output paths, damaged checkpoints,
changed options on --resume, killed writes. Each checks the message, the exit status and the files.

Tiny runs: 16x16 images, 8-image batches, one or two epochs, in-process.
"""
import errno
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from sib_fast import cli_errors, train
from sib_fast.training.checkpoint import CHECKPOINT
from sib_fast.training.history import METRICS
from sib_fast.training.prepare import CONFIG

from cli_runs import TINY, _restore_threads  # noqa: F401  (an autouse fixture)


def _train(out, *args):
    return train.main([*TINY, "--output", str(out), *args])


def _one_error_line(capsys, prog="sib-train"):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{prog}: "), err
    return err[0]


def _records(out):
    return [json.loads(line) for line in (out / METRICS).read_text().splitlines()]


def _image_folder(root, n_train=8, n_val=4, classes=("cat", "dog")):
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                arr = (torch.rand(20, 24, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(arr).save(root / split / cls / f"{i}.jpg", quality=90)
    return root


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 1-epoch sib-train output folder (copy it before changing it)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert _train(out, "--epochs", "1") == 0
    return out


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------- bad images (sib-train)

def _bad_folder(tmp_path):
    root = _image_folder(tmp_path / "data")
    truncated = root / "train" / "cat" / "1.jpg"
    _truncate(truncated)
    text = root / "train" / "dog" / "2.jpg"
    text.write_text("not an image\n")
    return root, sorted([str(truncated), str(text)])


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_images_are_skipped_named_once_and_counted(tmp_path, capsys, workers):
    root, bad = _bad_folder(tmp_path)
    out = tmp_path / "out"
    code = _train(out, "--data", str(root), "--train-samples", "0", "--val-samples", "0", "--epochs", "2",
                  "--workers", str(workers), "--batch-size", "4")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    warned = [line for line in captured.out.splitlines() if "skipped unreadable image" in line]
    assert sorted(line.split("skipped unreadable image ")[1].split(" (")[0] for line in warned) == bad, warned
    recs = _records(out)
    assert [r["bad_images"] for r in recs] == [2, 0] and recs[-1]["bad_images_total"] == 2
    assert recs[0]["bad_image_files"] == bad and recs[1]["bad_image_files"] == []
    ckpt = torch.load(out / CHECKPOINT, weights_only=True)
    assert sorted(ckpt["bad_images"]) == bad


def test_more_unreadable_images_than_allowed_stop_with_one_line(tmp_path, capsys):
    root, bad = _bad_folder(tmp_path)
    code = _train(tmp_path / "out", "--data", str(root), "--train-samples", "0", "--val-samples", "0",
                  "--batch-size", "4", "--workers", "0", "--max-bad-images", "1")
    line = _one_error_line(capsys)
    assert code == 1 and "more than --max-bad-images 1" in line and all(b in line for b in bad), line
    # 0: the first one stops the run
    code = _train(tmp_path / "out0", "--data", str(root), "--train-samples", "0", "--val-samples", "0",
                  "--batch-size", "4", "--workers", "0", "--max-bad-images", "0")
    line = _one_error_line(capsys)
    assert code == 1 and "1 unreadable image files" in line and "--max-bad-images 0" in line, line


def test_an_unreadable_class_folder_is_a_bad_argument(tmp_path, capsys):
    root = _image_folder(tmp_path / "data")
    (root / "val" / "bird").mkdir()  # a class without images
    (root / "train" / "bird").mkdir()
    out = tmp_path / "out"
    code = _train(out, "--data", str(root), "--workers", "0")
    line = _one_error_line(capsys)
    assert code == 2 and "--data" in line and "bird" in line, line
    assert not out.exists()


# --------------------------------------------------------------------------- output paths (sib-train)

def test_bad_output_paths_stop_before_any_work(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    ckpt_dir = tmp_path / "ckptdir"
    (ckpt_dir / CHECKPOINT).mkdir(parents=True)
    for out, words in ((a_file, ["--output", "is a file"]), (a_file / "sub", ["--output", "is a file"]),
                       (ckpt_dir, [str(ckpt_dir / CHECKPOINT), "is a folder"])):
        assert _train(out, "--epochs", "1") == 2
        line = _one_error_line(capsys)
        assert all(w in line for w in words), line
    assert a_file.read_text() == "x" and (ckpt_dir / CHECKPOINT).is_dir()

    # not writable / read-only file system (the tests may run as root, where chmod does not stop writes)
    def refuse(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(cli_errors.tempfile, "mkstemp", refuse)
    out = tmp_path / "ro" / "run"
    assert _train(out, "--epochs", "1") == 2
    line = _one_error_line(capsys)
    assert "--output" in line and str(out) in line and "Read-only file system" in line, line
    assert not (tmp_path / "ro").exists()


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(trained, tmp_path, capsys, monkeypatch):
    out = _copy(trained, tmp_path / "run")
    before = (out / CHECKPOINT).read_bytes()
    save = torch.save

    def full(obj, f, *a, **k):
        if isinstance(obj, dict) and "optimizer" in obj:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full)
    code = _train(out, "--epochs", "2", "--resume")
    line = _one_error_line(capsys)
    assert code == 1 and "No space left on device" in line and str(out / CHECKPOINT) in line, line
    assert "checkpoint" in line and "intact" in line
    assert (out / CHECKPOINT).read_bytes() == before
    assert not list(out.glob("*.tmp*"))


def test_a_temporary_file_of_a_killed_save_is_removed(trained, tmp_path, capsys):
    out = _copy(trained, tmp_path / "run")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = out / f"{CHECKPOINT}.tmp{dead}"
    stale.write_bytes(b"")  # what kill -9 during torch.save leaves
    live = out / f"{CHECKPOINT}.tmp1"  # pid 1 runs: it may be writing, so it stays
    live.write_bytes(b"")
    assert _train(out, "--epochs", "2", "--resume") == 0
    assert not stale.exists() and live.exists()
    assert f"removed {stale.name}" in capsys.readouterr().out


# --------------------------------------------------------------------------- --resume

def _expect_resume_error(out, capsys, *words):
    before = (out / CHECKPOINT).read_bytes()
    code = _train(out, "--epochs", "2", "--resume")
    line = _one_error_line(capsys)
    assert code == 2 and "Traceback" not in line, line
    for w in words:
        assert w in line, (w, line)
    assert (out / CHECKPOINT).read_bytes() == before  # looked at, never rewritten
    return line


def test_resume_on_unreadable_checkpoints_is_one_line(trained, tmp_path, capsys):
    out = _copy(trained, tmp_path / "run")
    path = out / CHECKPOINT
    good = path.read_bytes()
    cases = [(good[: len(good) // 2], ["damaged", "truncated"]),
             (b"", ["empty"]),
             (b"hello, not a checkpoint\n", ["not a checkpoint"])]
    for data, words in cases:
        path.write_bytes(data)
        _expect_resume_error(out, capsys, str(path), *words)
    for obj, words in (({"args": {}, "epoch": 1}, ["not a sib-train checkpoint", "'model'"]),
                       (torch.zeros(3), ["not a sib-train checkpoint", "Tensor"])):
        torch.save(obj, path)
        _expect_resume_error(out, capsys, str(path), *words)


def test_resume_detects_flipped_bytes(trained, tmp_path, capsys):
    out = _copy(trained, tmp_path / "run")
    path = out / CHECKPOINT
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 8] = bytes(b ^ 0x5A for b in data[mid:mid + 8])
    path.write_bytes(bytes(data))
    _expect_resume_error(out, capsys, str(path), "damaged")


def test_resume_on_damaged_metrics_refuses_and_keeps_them(trained, tmp_path, capsys):
    out = _copy(trained, tmp_path / "run")
    text = (out / METRICS).read_text() + "{not json\n"
    (out / METRICS).write_text(text)
    _expect_resume_error(out, capsys, str(out / METRICS), "line 2")
    assert (out / METRICS).read_text() == text


def test_sib_eval_reads_damaged_metrics_leniently(trained, tmp_path):
    # the one metrics.jsonl reader: --resume refuses a damaged line (above), sib-eval's training
    # curves leave it out and say so, through the same function
    from sib_fast.evaluation.inputs import load_run

    out = _copy(trained, tmp_path / "run")
    good = (out / METRICS).read_text()
    (out / METRICS).write_text(good + "{not json\n" + json.dumps({"loss": 1.0}) + "\n")
    lines = []
    run = load_run(str(out), log=lines.append)
    assert [r["epoch"] for r in run["records"]] == [1]
    assert len(lines) == 1 and "2 line(s) are not metrics records" in lines[0] and str(out / METRICS) in lines[0]
    (out / METRICS).write_bytes(b"\xff\xfe")
    lines.clear()
    assert load_run(str(out), log=lines.append)["records"] == []
    assert len(lines) == 1 and "cannot read" in lines[0] and "no training curves" in lines[0]


def test_resume_with_a_new_learning_rate_trains_with_it(trained, tmp_path, capsys):
    same = _copy(trained, tmp_path / "same")
    new = _copy(trained, tmp_path / "new")
    assert _train(same, "--epochs", "2", "--resume") == 0
    capsys.readouterr()
    assert _train(new, "--epochs", "2", "--resume", "--lr", "0.5", "--weight-decay", "0.01") == 0
    log = [line for line in capsys.readouterr().out.splitlines() if "resuming after epoch 1" in line]
    assert len(log) == 1 and "--lr 0.002 -> 0.5" in log[0] and "--weight-decay 0.0001 -> 0.01" in log[0], log
    a = torch.load(same / CHECKPOINT, weights_only=True)
    b = torch.load(new / CHECKPOINT, weights_only=True)
    assert [g["lr"] for g in a["optimizer"]["param_groups"]] == [train.SYNTHETIC_LR]
    assert [g["lr"] for g in b["optimizer"]["param_groups"]] == [0.5]
    assert [g["weight_decay"] for g in b["optimizer"]["param_groups"]] == [0.01]
    assert b["args"]["lr"] == 0.5 and json.loads((new / CONFIG).read_text())["lr"] == 0.5
    assert any(not torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


# --------------------------------------------------------------------------- arguments checked deeper down

def test_a_huge_window_trains_and_an_even_one_is_one_line(tmp_path, capsys):
    """docs/loss.md allows any positive odd window: one past the whole image computes that image's window
    (the same mask) instead of overflowing a C int (it ended in a traceback); an even one is a
    usage error naming the option."""
    out = tmp_path / "out"
    assert _train(out, "--window-size", "2147483649") == 0
    losses = [r["train_loss"] for r in _records(out) if "train_loss" in r]
    assert losses and all(math.isfinite(v) for v in losses)
    even = tmp_path / "even"
    assert _train(even, "--window-size", "2147483648") == 2
    line = _one_error_line(capsys)
    assert "window" in line and not even.exists(), line


def test_any_value_error_from_the_loss_checks_is_one_line(tmp_path, capsys, monkeypatch):
    import sib_fast.validation

    def refuse(window_size, temperature, slope):
        raise ValueError(f"window_size must be at most 65535, got {window_size}")

    monkeypatch.setattr(sib_fast.validation, "check_hyperparameters", refuse)
    out = tmp_path / "out"
    assert _train(out, "--window-size", "2147483649") == 2
    line = _one_error_line(capsys)
    assert "window_size must be at most" in line and "--window-size" in line and not out.exists(), line


@pytest.mark.slow
def test_unreadable_images_under_torchrun_with_workers(tmp_path):
    """Two ranks, a DataLoader worker each: every bad file is named once (by rank 0) and counted once."""
    import socket
    root, bad = _bad_folder(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "sib_fast.train", *TINY,
           "--data", str(root), "--train-samples", "0", "--val-samples", "0", "--batch-size", "2",
           "--workers", "1", "--epochs", "2", "--vjp", "finite_difference", "--output", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    warned = [line for line in proc.stdout.splitlines() if "skipped unreadable image" in line]
    assert sorted(line.split("skipped unreadable image ")[1].split(" (")[0] for line in warned) == bad, warned
    recs = _records(out)
    assert [r["bad_images"] for r in recs] == [2, 0] and recs[-1]["bad_images_total"] == 2
    assert all(r["ranks_in_sync"] is True for r in recs)


# --------------------------------------------------------------------------- sib-eval

EVAL_FAST = ["--methods", "gradcam", "--num-images", "4", "--batch-size", "4", "--steps", "2", "--grid-images", "1"]


def _eval(*argv):
    from sib_fast import evaluate
    return evaluate.main([*EVAL_FAST, *argv])  # argv last: it may override EVAL_FAST


def _eval_folder(root, n=3, size=(20, 24)):
    from PIL import Image
    import numpy as np
    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        (root / "images" / c).mkdir(parents=True)
        (root / "masks" / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / "images" / c / f"{i}.jpg")
            m = np.zeros(size, dtype=np.uint8)
            m[5:15, 6:18] = 255
            Image.fromarray(m).save(root / "masks" / c / f"{i}.png")
    return root


def test_sib_eval_skips_unreadable_images_and_masks_and_empty_masks(trained, tmp_path, capsys):
    from PIL import Image
    import numpy as np
    data = _eval_folder(tmp_path / "data")
    bad_img = data / "images" / "a" / "1.jpg"
    _truncate(bad_img)
    bad_mask = data / "masks" / "b" / "0.png"
    bad_mask.write_text("not a png\n")
    empty = data / "masks" / "c" / "2.png"
    Image.fromarray(np.zeros((20, 24), dtype=np.uint8)).save(empty)
    out = tmp_path / "report"
    code = _eval(str(trained), "--data", str(data), "--output", str(out), "--num-images", "0")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = captured.out.splitlines()
    assert sum("skipped unreadable image" in ln and str(bad_img) in ln for ln in lines) == 1, lines
    assert sum("skipped unreadable mask" in ln and str(bad_mask) in ln for ln in lines) == 1, lines
    warn = [ln for ln in lines if "empty ground-truth mask" in ln]
    assert len(warn) == 1 and "1 image(s)" in warn[0] and "2.jpg" in warn[0], warn
    res = json.loads((out / "results.json").read_text())
    assert sorted(p for p, _ in res["left_out"]["unreadable"]) == sorted([str(bad_img), str(bad_mask)])
    assert res["left_out"]["empty_mask"] == [str(data / "images" / "c" / "2.jpg")]
    scores = next(iter(res["models"].values()))["per_image"]["gradcam"]["energy_pg"]
    assert len(scores) == 9 - 3  # neither the unreadable pairs nor the empty mask are scored
    report = (out / "report.md").read_text()
    assert "1 image(s) with an empty ground-truth mask, 2 unreadable file(s)" in report
    # more than --max-bad-images: one line naming them, exit 2, no report
    code = _eval(str(trained), "--data", str(data), "--output", str(tmp_path / "r1"), "--num-images", "0",
                 "--max-bad-images", "1")
    line = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(line) == 1 and "more than --max-bad-images 1" in line[0], line
    assert str(bad_img) in line[0] and str(bad_mask) in line[0] and not (tmp_path / "r1").exists()


def test_sib_eval_says_what_is_wrong_with_a_checkpoint(trained, tmp_path, capsys):
    text = tmp_path / "notckpt.pt"
    text.write_text("101\n")
    flipped = tmp_path / "flipped.pt"
    data = bytearray((trained / CHECKPOINT).read_bytes())
    mid = len(data) // 2
    data[mid:mid + 8] = bytes(b ^ 0x5A for b in data[mid:mid + 8])
    flipped.write_bytes(bytes(data))
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    for path, words in ((text, ["not a checkpoint"]), (flipped, ["damaged"]), (empty, ["empty"])):
        assert _eval(str(path), "--output", str(tmp_path / "o")) == 2
        line = _one_error_line(capsys, "sib-eval")
        assert str(path) in line and all(w in line for w in words), line
    assert not (tmp_path / "o").exists()


def test_sib_eval_bad_output_paths(trained, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    report_dir = tmp_path / "r"
    (report_dir / "report.md").mkdir(parents=True)
    for out, words in ((a_file, ["--output", "is a file"]), (a_file / "sub", ["--output", "is a file"]),
                       (report_dir, ["report.md", "is a folder"])):
        assert _eval(str(trained), "--output", str(out)) == 2
        line = _one_error_line(capsys, "sib-eval")
        assert all(w in line for w in words), line
    assert a_file.read_text() == "x"


def test_sib_eval_a_full_disk_is_one_line(trained, tmp_path, capsys, monkeypatch):
    from sib_fast.evaluation import report
    out = tmp_path / "r"

    def full(path, text, what="file"):
        raise cli_errors.OutputError(f"cannot write the {what} {path}: No space left on device")

    monkeypatch.setattr(report, "atomic_write_text", full)
    assert _eval(str(trained), "--output", str(out)) == 1
    line = _one_error_line(capsys, "sib-eval")
    assert "No space left on device" in line and str(out / "results.json") in line, line


def test_ctrl_c_is_one_line_and_status_130(trained, tmp_path, capsys, monkeypatch):
    from sib_fast.evaluation import report
    from sib_fast.training import loop

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "train_epoch", interrupt)
    out = tmp_path / "run"
    assert _train(out, "--epochs", "1") == 130
    assert _one_error_line(capsys) == f"sib-train: interrupted; the last checkpoint (if any) is {out / CHECKPOINT}"
    monkeypatch.setattr(report, "evaluate_model", interrupt)
    assert _eval(str(trained), "--output", str(tmp_path / "r")) == 130
    assert _one_error_line(capsys, "sib-eval") == "sib-eval: interrupted"


# --------------------------------------------------------------------------- sib-bench

def _bench(*argv):
    from sib_fast.bench import cli as bench
    return bench.main(list(argv))


def test_sib_bench_from_json_missing_or_malformed_is_one_line(tmp_path, capsys):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"schema": "sib-bench/1", "rows": [')
    a_list = tmp_path / "list.json"
    a_list.write_text("[1, 2]")
    cases = ((tmp_path / "missing.json", ["--from-json", "cannot read", "No such file"]),
             (bad_json, ["--from-json", "is not JSON", "line 1"]),
             (a_list, ["is not a sib-bench/1 record"]),
             (tmp_path, ["--from-json", "cannot read"]))
    for path, words in cases:
        assert _bench("--from-json", str(path)) == 2
        line = _one_error_line(capsys, "sib-bench")
        assert str(path) in line and all(w in line for w in words), line


def test_sib_bench_checks_its_outputs_before_measuring(tmp_path, capsys, monkeypatch):
    from sib_fast.bench import cli as bench

    def never(*a, **k):
        raise AssertionError("measured before checking the outputs")

    monkeypatch.setattr(bench, "new_record", never)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for argv, words in ((["--json", str(tmp_path)], ["--json", "is a folder"]),
                        (["--json", str(a_file / "head.json")], ["--json", "is a file"]),
                        (["--markdown", str(tmp_path)], ["--markdown", "is a folder"]),
                        (["--plot", str(tmp_path / "head.nope")], ["--plot", ".nope"])):
        assert _bench("--device", "cpu", "--quick", *argv) == 2
        line = _one_error_line(capsys, "sib-bench")
        assert all(w in line for w in words), line
    assert a_file.read_text() == "x"


def test_sib_bench_a_full_disk_while_recording_keeps_the_rows(tmp_path, capsys, monkeypatch):
    from sib_fast.bench import record as bench_record
    record = tmp_path / "head.json"
    calls = {"n": 0}
    write = bench_record.atomic_write_text

    def full(path, text, what="file"):
        calls["n"] += 1
        if calls["n"] > 1:  # the first row is recorded, then the disk is full
            raise cli_errors.OutputError(f"cannot write the {what} {path}: No space left on device "
                                         "(the previous one is intact)")
        write(path, text, what)

    monkeypatch.setattr(bench_record, "atomic_write_text", full)
    code = _bench("--device", "cpu", "--threads", "1", "--quick", "--copy-mib", "16", "--no-compile",
                  "--no-memory", "--backends", "reference", "--batch", "2,3", "--size", "12", "--json", str(record))
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 1 and "No space left on device" in err[-1] and str(record) in err[-1], err
    assert "| reference |" in captured.out  # the measured rows are printed, not lost
    assert len(json.loads(record.read_text())["rows"]) == 1


def test_tune_checks_its_json_before_measuring(tmp_path, capsys):
    from sib_fast.bench import tune
    assert tune.main(["--device", "cpu", "--json", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tune: --json") and "is a folder" in err[0], err
