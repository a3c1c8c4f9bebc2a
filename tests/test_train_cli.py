"""``sib-train``: arguments, outputs, checkpoints and --resume, non-finite losses, ImageFolder data.

Runs call ``sib_fast.train.main(argv)`` in-process on tiny synthetic images (16x16, a few
steps); one subprocess run checks the module entry point.
"""
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch

import sib_fast
from sib_fast import cli_errors, train
from sib_fast.training.checkpoint import CHECKPOINT, save_checkpoint
from sib_fast.training.data import SyntheticObjects
from sib_fast.training.history import CURVES, METRICS
from sib_fast.training.prepare import CONFIG

from cli_runs import TINY, _restore_threads  # noqa: F401  (an autouse fixture)


def _run(tmp_path, *args, name="run"):
    out = tmp_path / name
    code = train.main([*TINY, "--output", str(out), *args])
    return code, out


def _records(out):
    return [json.loads(line) for line in (out / METRICS).read_text().splitlines()]


def _checkpoint(out):
    return torch.load(out / CHECKPOINT, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------- arguments

def test_defaults_are_the_documented_main_job():
    args = train.build_parser().parse_args([])
    train.validate(args)
    assert args.data == "synthetic" and args.arch == "sib_cnn" and args.vjp == "exact"
    assert args.image_size == 64 and args.window_size == 9 and args.lr == train.SYNTHETIC_LR
    assert args.epochs == 4 and args.train_samples == 2048 and args.val_samples == 256
    assert args.weight_decay == 1e-4 and args.lambda_fg == 0.01 and args.lambda_bg == 1000.0
    assert train.default_window(224) == 31 and train.default_window(32) == 5 and train.default_window(8) == 3


def test_imagefolder_defaults_follow_the_paper(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
    args = train.build_parser().parse_args(["--data", str(tmp_path)])
    train.validate(args)
    assert args.lr == 1e-4 and args.image_size == 224 and args.window_size == 31
    assert args.train_samples == 0 and args.val_samples == 0  # the whole dataset, not a demo subset


def _bad_cases(tmp_path):
    no_val = tmp_path / "no_val"
    (no_val / "train").mkdir(parents=True)
    return [
        (["--arch", "resnet5O"], ["unknown --arch", "resnet50"]),
        (["--data", str(tmp_path / "missing")], ["no such folder"]),
        (["--data", str(no_val)], ["val/"]),
        (["--window-size", "8"], ["--window-size", "odd"]),
        (["--compile"], ["--compile", "finite_difference"]),
        (["--batch-size", "1"], ["--batch-size", ">= 2"]),
        (["--resume", "--output", str(tmp_path / "empty")], ["--resume", "no checkpoint"]),
        (["--lr", "nan"], ["--lr"]),
        (["--spurious", "2"], ["--spurious"]),
        (["--epochs", "0"], ["--epochs"]),
        (["--threads", "0"], ["--threads"]),
        (["--check-vjp", "--no-sib"], ["--check-vjp", "--no-sib"]),
        (["--sib-every", "0"], ["--sib-every", ">= 1"]),
        (["--sib-batch", "1"], ["--sib-batch", ">= 2"]),
        (["--sib-every", "2", "--no-sib"], ["--sib-every", "--no-sib"]),
        (["--sib-lazy", "separate", "--no-sib"], ["--sib-lazy", "--no-sib"]),
        (["--arch", "tiny_vit", "--image-size", "60"], ["--arch tiny_vit", "patch size 8", "60"]),
        (["--arch", "vit_s_16", "--image-size", "40"], ["--arch vit_s_16", "patch size 16", "40"]),
        (["--hsic-features", "0"], ["--hsic-features", "hsic_features"]),
        (["--hsic-features", "16", "--no-sib"], ["--hsic-features", "--no-sib"]),
    ]


def test_bad_arguments_end_with_one_line(tmp_path, capsys):
    for argv, words in _bad_cases(tmp_path):
        code = train.main(argv)
        err = capsys.readouterr().err
        assert code == 2, argv
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("sib-train: error: "), (argv, err)
        for w in words:
            assert w in lines[0], (argv, lines[0])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a missing backend")
def test_unavailable_backend_is_one_line(tmp_path, capsys):
    # a bad argument: exit 2, as the README says, and no output folder left behind
    code, out = _run(tmp_path, "--backend", "cuda")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "backend 'cuda' is unavailable" in err[0] and "--backend" in err[0]
    assert not out.exists()


def test_a_temperature_the_fused_head_cannot_take(tmp_path, capsys):
    # named: one line saying why; auto: the reference head, with a note saying why
    if "cpu" in sib_fast.available_backends("cpu"):
        code, out = _run(tmp_path, "--backend", "cpu", "--temperature", "1.0")
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "temperature=1 is above" in err[0], err
        assert not out.exists()
    # twice in one process (a notebook): the note is not a once-only warning
    for name in ("auto", "again"):
        code, out = _run(tmp_path, "--epochs", "1", "--temperature", "1.0", name=name)
        notes = [line for line in capsys.readouterr().out.splitlines() if "note:" in line and "temperature=1" in line]
        assert code == 0 and len(notes) == 1 and "'reference'" in notes[0], (name, notes)
        assert _records(out)[-1]["backend"] == "reference"


def test_entry_point_reports_errors_without_traceback():
    """The console script where the package is installed (CI), else ``python -m sib_fast.train``."""
    exe = shutil.which("sib-train")
    cmd = [exe] if exe is not None else [sys.executable, "-m", "sib_fast.train"]
    proc = subprocess.run([*cmd, "--arch", "no_such_net"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "Traceback" not in proc.stderr
    assert "unknown --arch 'no_such_net'" in proc.stderr


# --------------------------------------------------------------------------- runs

@pytest.mark.parametrize("extra", [[], ["--vjp", "finite_difference"], ["--no-sib"]],
                         ids=["exact", "finite_difference", "no-sib"])
def test_run_writes_metrics_curves_checkpoint(tmp_path, capsys, extra):
    code, out = _run(tmp_path, "--epochs", "2", *extra)
    assert code == 0
    stdout = capsys.readouterr().out
    assert "sib-train: done in" in stdout and "val accuracy" in stdout
    records = _records(out)
    assert [r["epoch"] for r in records] == [1, 2]
    r = records[-1]
    for key in ("train_ce", "train_acc", "val_acc", "images_per_s", "peak_mem_mb", "nonfinite_skipped",
                "val_hsic", "val_bg", "val_fg_fraction"):
        assert r[key] is not None and math.isfinite(r[key]), key
    if "--no-sib" in extra:
        assert r["train_hsic"] is None and r["vjp"] is None
    else:
        assert math.isfinite(r["train_hsic"]) and math.isfinite(r["train_bg"])
        assert r["vjp"] == (extra[1] if extra else "exact")
    assert (out / CURVES).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = _checkpoint(out)
    assert ckpt["epoch"] == 2 and ckpt["step"] == 4
    assert {"model", "optimizer", "scaler", "rng", "args"} <= set(ckpt)
    assert not list(out.glob("*.tmp*")), "no temporary files left behind"
    assert json.loads((out / CONFIG).read_text())["epochs"] == 2


def test_speed_options_smoke(tmp_path, capsys):
    code, out = _run(tmp_path, "--vjp", "finite_difference", "--amp", "bf16", "--channels-last")
    assert code == 0
    r = _records(out)[-1]
    assert r["amp"] == "bf16" and math.isfinite(r["train_ce"])
    # the user is told that half precision scrambles the S-IB gradient, once
    notes = [line for line in capsys.readouterr().out.splitlines() if "note: --amp bf16" in line]
    assert len(notes) == 1 and "Precision" in notes[0], notes


@pytest.mark.parametrize("vjp", ["exact", "finite_difference"])
def test_resume_gives_the_same_weights(tmp_path, vjp):
    """2 epochs in one run == 1 epoch, then --resume for the second (CPU, deterministic)."""
    code, straight = _run(tmp_path, "--epochs", "2", "--vjp", vjp, name="straight")
    assert code == 0
    code, resumed = _run(tmp_path, "--epochs", "1", "--vjp", vjp, name="resumed")
    assert code == 0 and _checkpoint(resumed)["epoch"] == 1
    code, _ = _run(tmp_path, "--epochs", "2", "--vjp", vjp, "--resume", name="resumed")
    assert code == 0
    a, b = _checkpoint(straight), _checkpoint(resumed)
    assert a["step"] == b["step"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k in pa:
            assert torch.equal(pa[k], pb[k]), k
    assert [r["epoch"] for r in _records(resumed)] == [1, 2]
    assert _records(resumed)[-1]["train_ce"] == _records(straight)[-1]["train_ce"]


def test_random_feature_hsic_trains_and_resumes_to_the_same_weights(tmp_path):
    """--hsic-features: a fresh projection seed at every step from torch's generator, so a resumed
    run draws the same matrices as an uninterrupted one; the HSIC it logs is HSIC_F, not HSIC."""
    code, straight = _run(tmp_path, "--epochs", "2", "--hsic-features", "16", name="straight")
    assert code == 0
    code, resumed = _run(tmp_path, "--epochs", "1", "--hsic-features", "16", name="resumed")
    assert code == 0
    code, _ = _run(tmp_path, "--epochs", "2", "--hsic-features", "16", "--resume", name="resumed")
    assert code == 0
    a, b = _checkpoint(straight), _checkpoint(resumed)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert _records(resumed)[-1]["train_hsic"] == _records(straight)[-1]["train_hsic"]
    code, exact = _run(tmp_path, "--epochs", "2", name="exact")
    assert code == 0 and _records(exact)[-1]["train_hsic"] != _records(straight)[-1]["train_hsic"]
    assert json.loads((straight / CONFIG).read_text())["hsic_features"] == 16


def test_gradient_shares_are_measured_logged_and_plotted(tmp_path, capsys):
    code, out = _run(tmp_path, "--epochs", "2", "--lambda-bg", "10")  # weak: 2e-4 of cross-entropy here
    assert code == 0
    log = capsys.readouterr().out
    assert "S-IB gradient shares at the start" in log
    assert "less than 1% of cross-entropy" in log and "Choosing lambda" in log
    first, second = _records(out)
    for rec in (first, second):
        assert 0 < rec["grad_ratio_fg"] < 1 and 0 < rec["grad_ratio_bg"] < 1
    assert first["grad_ratio_fg_start"] > 0 and "grad_ratio_fg_start" not in second
    # strong weights: no note
    code, _ = _run(tmp_path, "--epochs", "1", "--lambda-fg", "1000", "--lambda-bg", "1e9", name="strong")
    assert code == 0 and "less than 1%" not in capsys.readouterr().out
    code, base = _run(tmp_path, "--epochs", "1", "--no-sib", name="base")
    assert code == 0 and _records(base)[0]["grad_ratio_fg"] is None


@pytest.mark.parametrize("form", ["merged", "separate"])
def test_lazy_schedule_continues_across_resume(tmp_path, form):
    """--sib-every 3 with 2 steps per epoch: S-IB steps 0 and 3, whether or not the run resumes."""
    cheap = ["--sib-every", "3", "--sib-batch", "4", "--sib-lazy", form]
    code, straight = _run(tmp_path, "--epochs", "2", *cheap, name="straight")
    assert code == 0
    code, resumed = _run(tmp_path, "--epochs", "1", *cheap, name="resumed")
    assert code == 0
    code, _ = _run(tmp_path, "--epochs", "2", "--resume", *cheap, name="resumed")
    assert code == 0
    assert [r["sib_steps"] for r in _records(straight)] == [r["sib_steps"] for r in _records(resumed)] == [1, 1]
    a, b = _checkpoint(straight), _checkpoint(resumed)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    every = _records(_run(tmp_path, "--epochs", "1", name="every")[1])
    assert every[0]["sib_steps"] == 2
    # the separate form's own S-IB step: StyleGAN2's compensation c = 3/4 of the rate and betas
    c = 0.75 if form == "separate" else 1.0
    assert [tuple(g["betas"]) for g in b["optimizer"]["param_groups"]] == [(0.9**c, 0.999**c)]
    assert _records(resumed)[-1]["lr"] == pytest.approx(json.loads((resumed / CONFIG).read_text())["lr"] * c)


def test_exact_mode_on_a_model_without_double_backward_is_one_line(tmp_path, capsys):
    code, _ = _run(tmp_path, "--arch", "tiny_vit")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "--vjp finite_difference" in err[0], err
    code, out = _run(tmp_path, "--arch", "tiny_vit", "--vjp", "finite_difference", name="fd")
    assert code == 0 and math.isfinite(_records(out)[-1]["train_ce"])


def _check_vjp_line(capsys):
    lines = [line for line in capsys.readouterr().out.splitlines() if "--check-vjp" in line]
    assert len(lines) == 1, lines
    return lines[0]


def test_finite_differences_on_a_relu_network_get_a_note(tmp_path, capsys):
    code, _ = _run(tmp_path, "--epochs", "1", "--arch", "resnet18", "--vjp", "finite_difference")
    notes = [line for line in capsys.readouterr().out.splitlines() if "note:" in line and "kinks" in line]
    assert code == 0 and len(notes) == 1 and "MaxPool2d, ReLU" in notes[0] and "--check-vjp" in notes[0], notes
    code, _ = _run(tmp_path, "--epochs", "1", "--vjp", "finite_difference", name="smooth")  # sib_cnn: none
    assert code == 0 and "kinks" not in capsys.readouterr().out


def test_check_vjp_reports_the_cosine_and_warns_on_kinks(tmp_path, capsys):
    code, _ = _run(tmp_path, "--epochs", "1", "--vjp", "finite_difference", "--check-vjp")
    line = _check_vjp_line(capsys)
    assert code == 0 and float(line.split("cosine ")[1].split(";")[0]) > 0.999 and "warning" not in line, line
    # torchvision's resnet18 (ReLU, max pool): the modes disagree and the line says why
    code, _ = _run(tmp_path, "--epochs", "1", "--arch", "resnet18", "--check-vjp", name="relu")
    line = _check_vjp_line(capsys)
    assert code == 0 and float(line.split("cosine ")[1].split(";")[0]) < 0.9, line
    assert "warning" in line and "ReLU" in line and "--vjp exact" in line, line
    # no double backward: nothing to compare, said in the same line; training goes on
    code, _ = _run(tmp_path, "--epochs", "1", "--arch", "tiny_vit", "--vjp", "finite_difference",
                   "--check-vjp", name="vit")
    line = _check_vjp_line(capsys)
    assert code == 0 and "cannot run" in line, line


def test_resume_refuses_a_different_run(tmp_path, capsys):
    code, out = _run(tmp_path, "--epochs", "1")
    assert code == 0
    before = (out / CHECKPOINT).read_bytes()
    for argv, name in ((["--spurious", "0.5"], "--spurious"), (["--seed", "3"], "--seed"),
                       (["--temperature", "0.2"], "--temperature"), (["--arch", "tiny_vit"], "--arch")):
        code, _ = _run(tmp_path, "--epochs", "2", "--resume", *argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and name in err[0] and "cannot change" in err[0], (argv, err)
    assert (out / CHECKPOINT).read_bytes() == before


# --------------------------------------------------------------------------- non-finite losses

def _nan_images(monkeypatch, bad):
    render = SyntheticObjects.render

    def patched(self, index):
        image, label, mask = render(self, index)
        if self.split == "train" and bad(index):
            image = torch.full_like(image, float("nan"))
        return image, label, mask

    monkeypatch.setattr(SyntheticObjects, "render", patched)


def test_a_nonfinite_loss_skips_the_step_and_is_reported(tmp_path, monkeypatch, capsys):
    _nan_images(monkeypatch, lambda i: i == 3)
    code, out = _run(tmp_path, "--epochs", "2")
    assert code == 0
    assert [r["nonfinite_skipped"] for r in _records(out)] == [1, 1]
    assert "non-finite steps skipped: 2" in capsys.readouterr().out
    ckpt = _checkpoint(out)
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())


def test_nonfinite_losses_in_a_row_stop_the_run_with_the_cause(tmp_path, monkeypatch, capsys):
    _nan_images(monkeypatch, lambda i: True)
    code, out = _run(tmp_path, "--epochs", "3", "--max-nonfinite", "2")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert "2 non-finite losses in a row" in err[0] and "NaN/Inf" in err[0]
    assert not (out / CHECKPOINT).exists()


def test_no_checkpoint_from_nonfinite_weights(tmp_path, monkeypatch, capsys):
    step = torch.optim.AdamW.step
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        result = step(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 3:  # first step of the second epoch
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    code, out = _run(tmp_path, "--epochs", "2", "--max-nonfinite", "5")
    err = capsys.readouterr().err
    assert code == 1 and "not finite" in err and "no checkpoint written" in err
    ckpt = _checkpoint(out)
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"epoch": 1})

    def broken(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(cli_errors.OutputError, match="disk full.*previous one is intact"):
        save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


# --------------------------------------------------------------------------- other data and models

def test_imagefolder_data(tmp_path):
    from PIL import Image
    root = tmp_path / "folder"
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 4), ("val", 2)):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                arr = (torch.rand(20, 24, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(arr).save(root / split / cls / f"{i}.png")
    code, out = _run(tmp_path, "--data", str(root), "--train-samples", "0", "--val-samples", "0",
                     "--batch-size", "4", "--workers", "0", "--epochs", "1")
    assert code == 0
    r = _records(out)[-1]
    assert r["val_fg_fraction"] is None and 0.0 <= r["val_acc"] <= 1.0


def test_arch_lookup():
    from sib_fast.training.models import build_model, check_arch
    assert build_model("tiny_vit", 5, 32)(torch.rand(2, 3, 32, 32)).shape == (2, 5)
    assert build_model("resnet18", 7, 32)(torch.rand(2, 3, 32, 32)).shape == (2, 7)
    with pytest.raises(ValueError, match="did you mean resnet18"):
        check_arch("resnet1")
    # the benchmarks' models are built-ins too: sib-bench --step builds them with this function
    assert build_model("tiny_cnn", 3, 16)(torch.rand(2, 3, 16, 16)).shape == (2, 3)
    vit = build_model("vit_small", 4, 32)
    assert type(vit) is type(build_model("vit_s_16", 4, 32)) and vit.hidden_dim == 384 and len(vit.encoder.layers) == 12
    with pytest.raises(ValueError, match="divisible by its patch size 16"):
        build_model("vit_s_16", 4, 40)
    with pytest.raises(ValueError, match=r"built-in model \(sib_cnn, tiny_vit, tiny_cnn, vit_s_16\)"):
        check_arch("no_such_net")


def test_timm_models_train(tmp_path):
    """--arch takes timm names: a ReLU ResNet in the exact mode, and a ViT (timm's attention is
    fused scaled_dot_product_attention, no double backward) in the finite-difference mode."""
    pytest.importorskip("timm")
    from sib_fast.training.models import build_model
    assert build_model("timm/vit_tiny_patch16_224", 4, 32)(torch.rand(2, 3, 32, 32)).shape == (2, 4)
    code, out = _run(tmp_path, "--epochs", "1", "--arch", "resnet10t", name="resnet")
    assert code == 0 and math.isfinite(_records(out)[-1]["train_ce"])
    code, out = _run(tmp_path, "--epochs", "1", "--arch", "timm/vit_tiny_patch16_224", "--image-size", "32",
                     "--vjp", "finite_difference", name="vit")
    assert code == 0 and math.isfinite(_records(out)[-1]["train_ce"])
