"""sib-eval end to end on tiny sib-train runs (a few seconds of training each)."""
import json

import pytest
import torch

from sib_fast import evaluate
from sib_fast.evaluation.inputs import load_folder

TRAIN_ARGS = ["--epochs", "1", "--train-samples", "16", "--val-samples", "8", "--batch-size", "8",
              "--image-size", "32", "--num-classes", "3", "--spurious", "0.5", "--lr", "1e-3"]
FAST = ["--num-images", "4", "--batch-size", "4", "--steps", "4", "--ig-steps", "2", "--smoothgrad-samples", "2",
        "--grid-images", "2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    train = pytest.importorskip("sib_fast.train")
    root = tmp_path_factory.mktemp("runs")
    for name, extra in (("base", ["--no-sib"]), ("sib", [])):
        assert train.main(TRAIN_ARGS + ["--output", str(root / name)] + extra) == 0
    return root


def test_sib_eval_end_to_end(runs, tmp_path, capsys):
    out = tmp_path / "report"
    rc = evaluate.main([str(runs / "base"), str(runs / "sib" / "checkpoint.pt"), "--quick", "--output", str(out),
                        "--methods", "ig,smoothgrad,gradcam++"] + FAST)
    assert rc == 0, capsys.readouterr().err
    report = (out / "report.md").read_text()
    for text in ("Energy pointing game", "Pointing game", "Top-k IoU", "Deletion AUC", "Insertion AUC",
                 "| baseline s0 |", "S-IB s0", "| gradcam_pp |", "accuracy", "training_curves.png"):
        assert text in report, text
    # each run's S-IB gradient shares from its metrics.jsonl: a number for S-IB, n/a for the baseline
    models = {line.split(" | ")[0].strip("| "): line for line in report.splitlines() if "s0 | `" in line}
    assert models["baseline s0"].endswith("| n/a / n/a |")
    fg, bg = models["S-IB s0"].rsplit("|", 2)[1].split(" / ")
    assert float(fg) > 0 and float(bg) > 0
    for m in ("integrated_gradients", "smoothgrad", "gradcam_pp"):
        assert (out / f"grid_{m}.png").stat().st_size > 0
    assert (out / "training_curves.png").stat().st_size > 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["models"]) == {"baseline s0", "S-IB s0"}
    sib = res["models"]["S-IB s0"]
    assert sib["mode"] == "S-IB"
    scores = sib["per_image"]["gradcam_pp"]
    assert set(scores) == {"energy_pg", "pointing_game", "topk_iou", "deletion", "insertion"}
    assert all(len(v) == 4 for v in scores.values())
    assert all(0 <= s <= 1 for v in scores.values() for s in v)
    mean, lo, hi = sib["summary"]["gradcam_pp"]["energy_pg"]
    assert lo <= mean <= hi


def test_sib_eval_groups_and_labels(runs, tmp_path):
    out = tmp_path / "r"
    rc = evaluate.main([f"A={runs / 'base'}", f"A={runs / 'sib'}", "--output", str(out), "--methods", "gradcam",
                        "--grid-images", "0"] + FAST[:8])
    assert rc == 0
    report = (out / "report.md").read_text()
    assert "Over the checkpoints of each group" in report and "A: 2" in report
    assert not list(out.glob("grid_*.png"))


def test_guided_backprop_on_a_model_without_relu_gets_a_note(runs, tmp_path, capsys):
    # the default model has GELUs: Captum's guided backprop then changes nothing, and the log says so
    pytest.importorskip("captum")
    rc = evaluate.main([str(runs / "base"), "--output", str(tmp_path / "r"), "--methods", "saliency,gbp",
                        "--grid-images", "0"] + FAST[:8])
    assert rc == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if "guided backprop equals its saliency" in line]
    assert len(notes) == 1 and "no nn.ReLU" in notes[0], notes
    rc = evaluate.main([str(runs / "base"), "--output", str(tmp_path / "r2"), "--methods", "saliency",
                        "--grid-images", "0"] + FAST[:8])
    assert rc == 0 and "guided backprop" not in capsys.readouterr().out


def test_sib_eval_folder_dataset(runs, tmp_path):
    from PIL import Image
    import numpy as np

    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        (data / "images" / c).mkdir(parents=True)
        (data / "masks" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(data / "images" / c / f"{i}.jpg")
            m = np.zeros((40, 48), dtype=np.uint8)
            m[10:30, 12:36] = 255
            Image.fromarray(m).save(data / "masks" / c / f"{i}.png")
    xs, ys, ms, classes, names, skipped = load_folder(data, 32, 0)
    assert len(names) == 6 and names[0].endswith("0.jpg") and skipped == []
    assert xs.shape == (6, 3, 32, 32) and ms.shape == (6, 1, 32, 32) and classes == ["a", "b", "c"]
    assert ys.tolist() == [0, 0, 1, 1, 2, 2] and 0 <= float(xs.min()) and float(xs.max()) <= 1
    assert 0.2 < float(ms.mean()) < 0.5  # the centred box survives resize + centre crop
    out = tmp_path / "r"
    assert evaluate.main([str(runs / "base"), "--data", str(data), "--output", str(out), "--methods", "layercam"]
                         + FAST) == 0
    assert "images of 32px, 3 classes" in (out / "report.md").read_text()
    (data / "masks" / "c" / "1.png").unlink()
    assert evaluate.main([str(runs / "base"), "--data", str(data), "--output", str(out)] + FAST) == 2


def test_sib_eval_bad_arguments_are_one_line(runs, tmp_path, capsys):
    cases = [([str(tmp_path / "missing")], "no checkpoint"),
             ([str(runs / "base"), "--methods", "occlusion"], "unknown explanation method"),
             ([str(runs / "base"), "--topk", "2"], "--topk"),
             ([str(runs / "base"), "--data", str(tmp_path / "nodata")], "no such folder")]
    for argv, msg in cases:
        assert evaluate.main(argv + ["--output", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err
    bad = tmp_path / "bad.pt"
    torch.save({"weights": 1}, bad)
    assert evaluate.main([str(bad), "--output", str(tmp_path / "o")]) == 2
    assert "not a sib-train checkpoint" in capsys.readouterr().err
