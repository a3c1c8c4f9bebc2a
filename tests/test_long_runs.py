"""``sib-train`` for long runs: ``--checkpoint-every`` and an exact ``--resume`` from the middle of
an epoch, ``--eval-only``, ``--label-smoothing``, top-5 accuracy, and the checks of these options."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sib_fast import SIBLoss, train
from sib_fast.training import loop
from sib_fast.training.checkpoint import CHECKPOINT
from sib_fast.training.history import METRICS
from sib_fast.training.models import BUILTIN
from sib_fast.training.prepare import CONFIG, EVAL
from sib_fast.training.step import sib_backward

from cli_runs import TINY, _restore_threads  # noqa: F401  (an autouse fixture)

# 4 steps an epoch; a cosine schedule with a warmup, so that the rate differs at every step
LONG = ["--train-samples", "32", "--epochs", "2", "--checkpoint-every", "3", "--lr-schedule", "cosine",
        "--warmup-epochs", "0.5"]
TIMING = ("images_per_s", "epoch_time_s", "peak_mem_mb", "grad_ratio_fg_start", "grad_ratio_bg_start")


@pytest.fixture(autouse=True)
def _dropout_model(monkeypatch):
    """A model that draws from the RNG at every step: a resumed run must draw what the uninterrupted one did."""
    def drop_cnn(num_classes, image_size):
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.GELU(), nn.Dropout(0.3),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
    monkeypatch.setitem(BUILTIN, "drop_cnn", drop_cnn)


def _run(out, *args):
    return train.main([*TINY, "--arch", "drop_cnn", "--output", str(out), *args])


def _records(out):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (out / METRICS).read_text().splitlines()]


def _ckpt(out):
    return torch.load(out / CHECKPOINT, map_location="cpu", weights_only=True)


def _interrupt_after_checkpoint_at(monkeypatch, step):
    """Ctrl-C right after the mid-epoch checkpoint of ``step`` is written."""
    real = loop.save_checkpoint

    def save_then_stop(path, state):
        real(path, state)
        if "batch" in state and state["step"] == step:
            raise KeyboardInterrupt
    monkeypatch.setattr(loop, "save_checkpoint", save_then_stop)
    return lambda: monkeypatch.setattr(loop, "save_checkpoint", real)


def _assert_same_run(a, b):
    ca, cb = _ckpt(a), _ckpt(b)
    assert ca["step"] == cb["step"] == 8 and ca["epoch"] == cb["epoch"] == 2 and "batch" not in cb
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    for sa, sb in zip(ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values()):
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    assert ca["optimizer"]["param_groups"][0]["lr"] == cb["optimizer"]["param_groups"][0]["lr"]
    assert torch.equal(ca["rng"][0]["cpu"], cb["rng"][0]["cpu"]), "the RNG went on as in the uninterrupted run"
    assert _records(a) == _records(b)


@pytest.mark.parametrize("mode", ["exact", "no-sib"])
def test_resume_from_the_middle_of_an_epoch_continues_exactly(tmp_path, monkeypatch, capsys, mode):
    extra = ["--no-sib"] if mode == "no-sib" else []
    assert _run(tmp_path / "straight", *LONG, *extra) == 0
    go_on = _interrupt_after_checkpoint_at(monkeypatch, 6)  # the second batch of epoch 2
    assert _run(tmp_path / "resumed", *LONG, *extra) == 130
    mid = _ckpt(tmp_path / "resumed")
    assert (mid["epoch"], mid["batch"], mid["step"]) == (1, 2, 6) and len(mid["partial"]) == 1
    assert [r["epoch"] for r in _records(tmp_path / "resumed")] == [1]
    go_on()
    capsys.readouterr()
    assert _run(tmp_path / "resumed", *LONG, *extra, "--resume") == 0
    assert "resuming in epoch 2 after batch 2 (step 6)" in capsys.readouterr().out
    _assert_same_run(tmp_path / "straight", tmp_path / "resumed")


def test_mid_epoch_resume_with_random_crops_in_worker_processes(tmp_path, monkeypatch):
    """An ImageFolder with RandomResizedCrop loaded by a worker: each image's crop is seeded from
    (seed, epoch, index), so the resumed run crops as the uninterrupted one did."""
    from PIL import Image
    root = tmp_path / "folder"
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 16), ("val", 2)):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                arr = (torch.rand(20, 24, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(arr).save(root / split / cls / f"{i}.png")
    data = ["--data", str(root), "--train-samples", "0", "--val-samples", "0", "--workers", "1", "--num-classes", "2"]
    assert _run(tmp_path / "straight", *LONG, *data) == 0
    go_on = _interrupt_after_checkpoint_at(monkeypatch, 3)
    assert _run(tmp_path / "resumed", *LONG, *data) == 130
    go_on()
    assert _run(tmp_path / "resumed", *LONG, *data, "--resume") == 0
    _assert_same_run(tmp_path / "straight", tmp_path / "resumed")


def test_a_mid_epoch_checkpoint_needs_as_many_processes(tmp_path, monkeypatch, capsys):
    _interrupt_after_checkpoint_at(monkeypatch, 3)
    assert _run(tmp_path / "run", *LONG) == 130
    path = tmp_path / "run" / CHECKPOINT
    ckpt = _ckpt(tmp_path / "run")
    ckpt["partial"] = ckpt["partial"] * 2
    torch.save(ckpt, path)
    capsys.readouterr()
    assert _run(tmp_path / "run", *LONG, "--resume") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "in the middle of an epoch by 2 process(es)" in err


def test_eval_only_scores_the_checkpoint_and_changes_nothing_else(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(out, "--epochs", "1", "--num-classes", "6") == 0
    before = {f: (out / f).read_bytes() for f in (CHECKPOINT, METRICS, CONFIG)}
    capsys.readouterr()
    assert _run(out, "--epochs", "1", "--num-classes", "6", "--eval-only") == 0
    log = capsys.readouterr().out
    result = json.loads((out / EVAL).read_text())
    last = json.loads((out / METRICS).read_text().splitlines()[-1])
    assert result["val_acc"] == last["val_acc"] and result["val_acc5"] == last["val_acc5"]
    assert result["epoch"] == 1 and result["step"] == 2 and result["val_images"] == 8
    assert f"--eval-only: {out / CHECKPOINT} (epoch 1, step 2) on 8 val images: acc" in log and "top-5" in log
    assert {f: (out / f).read_bytes() for f in before} == before


@pytest.mark.parametrize("argv, words", [
    (["--eval-only"], ["--eval-only: no checkpoint at"]),
    (["--eval-only", "--resume"], ["--eval-only", "no use with --resume"]),
    (["--checkpoint-every", "0"], ["--checkpoint-every must be >= 1"]),
    (["--label-smoothing", "1"], ["--label-smoothing must be in [0, 1), got 1.0"]),
    (["--label-smoothing", "-0.1"], ["--label-smoothing"]),
    (["--label-smoothing", "nan"], ["--label-smoothing"]),
])
def test_bad_arguments_are_one_line(tmp_path, capsys, argv, words):
    assert train.main([*argv, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sib-train: error: "), err
    for w in words:
        assert w in err
    assert not (tmp_path / "out").exists()


def test_eval_only_on_another_arch_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(out, "--epochs", "1") == 0
    capsys.readouterr()
    assert train.main([*TINY, "--arch", "tiny_cnn", "--output", str(out), "--eval-only"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds a 'drop_cnn' model, not --arch 'tiny_cnn'" in err


def test_label_smoothing_is_the_cross_entropy_s():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3))
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    crit = SIBLoss(window_size=3, backend="reference")
    st = sib_backward(model, x, y, crit, label_smoothing=0.2)
    assert st.ce.item() == pytest.approx(F.cross_entropy(model(x), y, label_smoothing=0.2).item(), rel=1e-6)
    assert st.ce.item() != pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-3)
    with pytest.raises(ValueError, match="label_smoothing"):
        sib_backward(model, x, y, crit, label_smoothing=1.0)


def test_top5_beside_top1_with_more_than_five_classes(tmp_path, capsys):
    assert _run(tmp_path / "six", "--epochs", "1", "--num-classes", "6", "--label-smoothing", "0.1") == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("epoch 1/1")][0]
    assert line.count("top-5") == 2, line
    r = _records(tmp_path / "six")[0]
    assert r["train_acc"] <= r["train_acc5"] <= 1 and r["val_acc"] <= r["val_acc5"] <= 1
    assert math.isfinite(r["train_ce"])
    assert _run(tmp_path / "three", "--epochs", "1") == 0
    r = _records(tmp_path / "three")[0]
    assert r["train_acc5"] is None and r["val_acc5"] is None
    assert "top-5" not in capsys.readouterr().out


# --------------------------------------------------------------------------- two processes (gloo)

def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, ports: list, out: str, argv: list) -> None:
    """The three runs in one pair of processes (each process starts in seconds): straight, stopped
    on every rank after the mid-epoch checkpoint of step 3, as a killed job would be, and resumed."""
    import os
    import warnings
    warnings.simplefilter("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    real = loop._maybe_checkpoint

    def checkpoint_then_stop(r, *a):
        real(r, *a)
        if r.step == 3:
            raise KeyboardInterrupt
    for port, (name, extra, stop) in zip(ports, (("straight", [], False), ("resumed", [], True),
                                                 ("resumed", ["--resume"], False))):
        os.environ["MASTER_PORT"] = str(port)
        loop._maybe_checkpoint = checkpoint_then_stop if stop else real
        code = train.main([*TINY, "--arch", "tiny_cnn", "--device", "cpu", "--output", f"{out}/{name}", *argv,
                           *extra])
        assert code == (130 if stop else 0), (name, code)
        if stop and rank == 0:
            mid = torch.load(f"{out}/{name}/{CHECKPOINT}", weights_only=True)
            assert (mid["epoch"], mid["batch"], mid["step"]) == (1, 1, 3) and len(mid["partial"]) == 2


@pytest.mark.slow
def test_mid_epoch_resume_under_ddp(tmp_path):
    """Two gloo processes, 2 steps an epoch: stopped after the checkpoint of step 3 (the first batch
    of epoch 2), resumed, they end as the run that was not stopped, on both ranks."""
    import torch.multiprocessing as mp
    argv = ["--train-samples", "32", "--epochs", "2", "--checkpoint-every", "1", "--lr-schedule", "cosine"]
    mp.spawn(_ddp_worker, args=([_free_port() for _ in range(3)], str(tmp_path), argv), nprocs=2, join=True)
    a, b = _ckpt(tmp_path / "straight"), _ckpt(tmp_path / "resumed")
    assert a["step"] == b["step"] == 4 and len(b["rng"]) == 2 and "batch" not in b
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for ra, rb in zip(a["rng"], b["rng"]):
        assert torch.equal(ra["cpu"], rb["cpu"])
    assert _records(tmp_path / "straight") == _records(tmp_path / "resumed")
