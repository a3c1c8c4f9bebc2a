"""Both commands on the benchmarks' layouts (tests/dataset_fixtures.py): ``sib-train`` one epoch of
the tiny CNN at 32px on the official train split, validated on the official test split, then
``sib-eval`` of its checkpoint against the boxes or masks; and a fault in an annotation file is
exit status 2 with one line naming the file and the line. In-process, like tests/test_train_cli.py."""
import json

import pytest

from dataset_fixtures import make_cub, make_dogs, make_imagenet, val_name

from cli_runs import _restore_threads  # noqa: F401  (an autouse fixture)

pytest.importorskip("torchvision")
train = pytest.importorskip("sib_fast.train")
from sib_fast import evaluate  # noqa: E402

TRAIN = ["--arch", "tiny_cnn", "--image-size", "32", "--epochs", "1", "--batch-size", "3", "--workers", "0",
         "--threads", "1", "--train-samples", "0", "--val-samples", "0", "--lr", "1e-3"]
EVAL = ["--methods", "layercam", "--num-images", "0", "--batch-size", "3", "--steps", "2", "--grid-images", "1"]
LAYOUTS = {"cub": make_cub, "dogs": make_dogs, "imagenet": make_imagenet}


def _train(capsys, root, out, *extra):
    code = train.main([*TRAIN, "--data", str(root), "--output", str(out), *extra])
    return code, capsys.readouterr()


@pytest.mark.parametrize("fmt, truth", [("cub", "bounding boxes (bounding_boxes.txt)"),
                                        ("dogs", "bounding boxes (Annotation/, PASCAL VOC XML)"),
                                        ("imagenet", "bounding boxes (PASCAL VOC XML)")])
def test_train_then_evaluate(tmp_path, capsys, fmt, truth):
    if fmt == "dogs":
        pytest.importorskip("scipy")
    root = LAYOUTS[fmt](tmp_path / fmt)
    code, captured = _train(capsys, root, tmp_path / "run", "--data-format", fmt)
    assert code == 0, captured.err
    # the official splits: 3 images each (ImageNet: 6 train images, 3 val)
    assert f"{6 if fmt == 'imagenet' else 3} train / 3 val images of 32px, 3 classes" in captured.out
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data_format"] == fmt
    rc = evaluate.main([str(tmp_path / "run"), "--data", str(root), "--output", str(tmp_path / "report"), *EVAL])
    assert rc == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    assert results["data"].endswith(f"3 images of 32px, 3 classes; ground truth: {truth}")
    assert f"ground truth: {truth}" in (tmp_path / "report" / "report.md").read_text()
    model = next(iter(results["models"].values()))
    assert len(model["per_image"]["layercam"]["energy_pg"]) == 3


def test_faults_are_one_line_with_exit_status_2(tmp_path, capsys):
    root = make_imagenet(tmp_path / "in")
    xml = root / "val" / f"{val_name(3)}.xml"
    good = xml.read_text()
    xml.write_text(good.replace("<xmin>11</xmin>", "<xmin>eleven</xmin>"))
    assert train.main([*TRAIN, "--data", str(root), "--output", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err == f"sib-train: error: {xml}, line 19: <xmin> is 'eleven', not a number\n"
    assert not (tmp_path / "bad").exists()
    xml.write_text(good)
    assert train.main([*TRAIN, "--data", str(root), "--output", str(tmp_path / "run")]) == 0
    xml.write_text(good.replace("<xmax>20</xmax>", "<xmax>200</xmax>"))  # 200 > the image's 37
    capsys.readouterr()
    assert evaluate.main([str(tmp_path / "run"), "--data", str(root), "--output", str(tmp_path / "rep"), *EVAL]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sib-eval: error: {xml}, line 18: the box (10, 5, 200, 15) lies outside the 37x37 image")
    assert len(err.strip().splitlines()) == 1
    # a forced format whose files are not there; --data-format with synthetic data
    xml.write_text(good)
    for argv, message in ((["--data", str(root), "--data-format", "cub"], "(--data-format cub, CUB-200-2011): "
                           "missing images.txt, image_class_labels.txt, train_test_split.txt, classes.txt, images, "
                           "bounding_boxes.txt"),
                          (["--data-format", "dogs"], "--data-format dogs applies to a --data folder")):
        assert evaluate.main([str(tmp_path / "run"), "--output", str(tmp_path / "rep"), *EVAL, *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
