"""The benchmarks' layouts (sib_fast.datasets) read from tiny fixtures written as the datasets ship
them (tests/dataset_fixtures.py): detection, labels, official splits and the ground-truth masks
that boxes and segmentations become at the evaluation view, compared with hand-written
expectations; and every fault in an annotation file is one line naming the file and the line."""
import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

from sib_fast.cli_errors import UsageError
from sib_fast.datasets import DATA_FORMATS, detect_format, evaluation_set, training_sets
from sib_fast.datasets.boxes import Box, boxes_mask
from sib_fast.evaluation.inputs import load_items

from dataset_fixtures import (CUB_CLASSES, DOG_BREEDS, WNIDS, box_mask, cub_name, dog_name, make_cub, make_dogs,
                              make_imagenet, val_name)

pytest.importorskip("torchvision")

ALL = ((0, 32), (0, 32))   # the whole 32px view
CENTRE = ((3, 13), (8, 18))  # rows, columns of the 10x10 box at (10, 5) of a 37px image
WIDE = ((3, 13), (9, 19))    # the same box 20 pixels right in a 74x37 image (crop offset 21)


def _args(root, fmt="auto", **kw):
    return argparse.Namespace(**{**dict(data=str(root), data_format=fmt, image_size=32, train_samples=0,
                                        val_samples=0, seed=0), **kw})


def _rel(samples, base):
    return [(str(Path(p).relative_to(base)), y) for p, y in samples]


def _masks(root, fmt="auto"):
    es = evaluation_set(_args(root, fmt))
    xs, ys, ms, names, skipped = load_items(es, 32, 0, log=lambda *a: None)
    assert skipped == [] and xs.shape == (len(names), 3, 32, 32)
    return es, ys.tolist(), ms[:, 0].numpy(), names


def _expect(*regions):
    return np.stack([sum(box_mask(*r) for r in rs).clip(0, 1) for rs in regions])


@pytest.fixture(scope="module")
def cub(tmp_path_factory):
    return make_cub(tmp_path_factory.mktemp("cub") / "CUB_200_2011")


@pytest.fixture(scope="module")
def dogs(tmp_path_factory):
    pytest.importorskip("scipy")
    return make_dogs(tmp_path_factory.mktemp("dogs") / "StanfordDogs")


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    return make_imagenet(tmp_path_factory.mktemp("imagenet") / "ILSVRC2012")


@pytest.fixture(scope="module")
def sorted_val(tmp_path_factory):
    return make_imagenet(tmp_path_factory.mktemp("sorted") / "ILSVRC2012", val_folders=True)


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory):
    return make_imagenet(tmp_path_factory.mktemp("kaggle") / "imagenet-object-localization-challenge", kaggle=True)


# --------------------------------------------------------------------------- detection

def test_each_layout_is_detected(cub, dogs, imagenet, sorted_val, kaggle, tmp_path):
    assert DATA_FORMATS == ("auto", "folder", "cub", "dogs", "imagenet")
    for root, fmt in ((cub, "cub"), (dogs, "dogs"), (imagenet, "imagenet"), (sorted_val, "imagenet"),
                      (kaggle, "imagenet")):
        assert detect_format(root, "auto", "train") == fmt and detect_format(root, "auto", "eval") == fmt
        assert detect_format(root, fmt, "eval") == fmt
    for sub in ("train/a", "val/a", "images/a", "masks/a"):
        (tmp_path / sub).mkdir(parents=True)
    assert detect_format(tmp_path) == "folder" and detect_format(tmp_path, "auto", "eval") == "folder"


@pytest.mark.parametrize("fmt, missing", [("cub", "missing images.txt, image_class_labels.txt, "
                                                  "train_test_split.txt, classes.txt, images"),
                                          ("dogs", "missing train_list.mat, test_list.mat, Images"),
                                          ("imagenet", "missing train/WNID/ folders, val/"),
                                          ("folder", "missing train/, val/")])
def test_a_forced_format_names_what_is_missing(tmp_path, fmt, missing):
    with pytest.raises(UsageError) as exc:
        detect_format(tmp_path, fmt, "train")
    assert f"--data-format {fmt}" in str(exc.value) and missing in str(exc.value)
    assert len(str(exc.value).splitlines()) == 1
    with pytest.raises(UsageError, match="no layout recognised"):
        detect_format(tmp_path)


def test_cub_without_boxes_or_segmentations_cannot_be_evaluated(cub, tmp_path):
    root = make_cub(tmp_path / "c")
    (root / "bounding_boxes.txt").unlink()
    assert detect_format(root, "cub", "train") == "cub"
    with pytest.raises(UsageError, match="missing bounding_boxes.txt"):
        detect_format(root, "cub", "eval")


# --------------------------------------------------------------------------- labels and splits

def test_cub_labels_and_official_split(cub):
    train, val, k, _ = training_sets(_args(cub))
    assert k == 3 and train.classes == CUB_CLASSES
    assert _rel(train.samples, cub / "images") == [(cub_name(1), 0), (cub_name(3), 1), (cub_name(5), 2)]
    assert _rel(val.samples, cub / "images") == [(cub_name(2), 0), (cub_name(4), 1), (cub_name(6), 2)]
    x, y = val[1]
    assert x.shape == (3, 32, 32) and y == 1


def test_dogs_labels_and_official_split(dogs):
    train, val, k, _ = training_sets(_args(dogs))
    assert k == 3 and train.classes == DOG_BREEDS
    assert _rel(train.samples, dogs / "Images") == [(f"{dog_name(0, 10074)}.jpg", 0), (f"{dog_name(1, 1004)}.jpg", 1),
                                                    (f"{dog_name(2, 1030)}.jpg", 2)]
    assert _rel(val.samples, dogs / "Images") == [(f"{dog_name(0, 10131)}.jpg", 0), (f"{dog_name(1, 1007)}.jpg", 1),
                                                  (f"{dog_name(2, 1053)}.jpg", 2)]


@pytest.mark.parametrize("layout", ["imagenet", "kaggle", "sorted_val"])
def test_imagenet_labels_from_the_train_folders_and_the_val_annotations(layout, request):
    root = request.getfixturevalue(layout)
    train, val, k, _ = training_sets(_args(root))
    data = root / "ILSVRC" / "Data" / "CLS-LOC" if layout == "kaggle" else root
    assert k == 3 and train.classes == WNIDS and len(train) == 6
    assert [y for _, y in train.samples] == [0, 0, 1, 1, 2, 2]
    expected = [(f"{val_name(1)}.JPEG", 2), (f"{val_name(2)}.JPEG", 0), (f"{val_name(3)}.JPEG", 1)]
    if layout == "sorted_val":  # val/WNID/: in folder order, labelled by the folder
        expected = [(f"{WNIDS[y]}/{name}", y) for name, y in sorted(expected, key=lambda t: t[1])]
    assert _rel(val.samples, data / "val") == expected


def test_subsets_keep_the_labels(cub):
    train, _, _, _ = training_sets(_args(cub, train_samples=2))
    assert len(train) == 2 and all(y in (0, 1, 2) for _, y in (train[i] for i in range(2)))


# --------------------------------------------------------------------------- ground truth

def test_cub_boxes_become_masks_in_the_evaluation_view(cub):
    es, ys, ms, names = _masks(cub)
    assert es.truth == "bounding boxes (bounding_boxes.txt)" and es.classes == CUB_CLASSES
    assert [Path(n).relative_to(cub / "images").as_posix() for n in names] == [cub_name(i) for i in (2, 4, 6)]
    assert ys == [0, 1, 2]
    # a 37px image: crop offset 2; a 74px one: halved first, the same box
    np.testing.assert_array_equal(ms, _expect([CENTRE], [CENTRE], [ALL]))


def test_cub_segmentations_are_used_when_present(tmp_path):
    root = make_cub(tmp_path / "CUB_200_2011", segmentations=True)
    es, ys, ms, _ = _masks(root, "cub")
    assert es.truth.startswith("segmentation masks")
    # the top-left quarter (255) is the bird, the bottom-left one (102: 2 of 5 annotators) is not
    np.testing.assert_array_equal(ms, _expect(*[[((0, 16), (0, 16))]] * 3))


def test_dogs_boxes_union(dogs):
    es, ys, ms, _ = _masks(dogs)
    assert es.truth.startswith("bounding boxes (Annotation/") and ys == [0, 1, 2]
    # 10131: two boxes (their union); 1007: 74x37; 1053: the whole image
    np.testing.assert_array_equal(ms, _expect([CENTRE, ((27, 32), (0, 3))], [WIDE], [ALL]))


@pytest.mark.parametrize("layout, source", [("imagenet", "PASCAL VOC XML"), ("kaggle", "LOC_val_solution.csv"),
                                            ("sorted_val", "PASCAL VOC XML")])
def test_imagenet_val_boxes(layout, source, request):
    es, ys, ms, _ = _masks(request.getfixturevalue(layout))
    expected = {2: [CENTRE], 0: [WIDE], 1: [CENTRE, ((27, 32), (0, 3))]}  # by class: val 1, 2, 3
    assert es.truth == f"bounding boxes ({source})" and es.classes == WNIDS
    assert ys == ([0, 1, 2] if layout == "sorted_val" else [2, 0, 1])
    np.testing.assert_array_equal(ms, _expect(*[expected[y] for y in ys]))


def test_box_geometry():
    # a pixel is in when its centre is: a half-pixel box at 37px covers nothing, a box may overrun by one
    assert boxes_mask([Box(10.0, 5.0, 10.4, 15.0, "f, line 1")], 37, 37, 32).sum() == 0
    full = boxes_mask([Box(-1.0, -1.0, 38.0, 38.0, "f, line 1")], 37, 37, 32)
    assert bool((full == 1).all())
    with pytest.raises(UsageError, match=r"^f, line 7: the box .* lies outside the 37x37 image$"):
        boxes_mask([Box(0.0, 0.0, 39.0, 10.0, "f, line 7")], 37, 37, 32)
    with pytest.raises(UsageError, match="f, line 2: the box .* swapped"):
        Box(5.0, 0.0, 4.0, 1.0, "f, line 2")
    assert torch.equal(boxes_mask([], 37, 37, 32), torch.zeros(1, 32, 32))


# --------------------------------------------------------------------------- faults: one line, file and line

def _replace_line(path, n, text):
    lines = path.read_text().splitlines()
    lines[n - 1] = text
    path.write_text("\n".join(lines) + "\n")


CUB_FAULTS = [
    ("image_class_labels.txt", 3, "3 two", "image_class_labels.txt, line 3: the class id 'two' is not an integer"),
    ("image_class_labels.txt", 2, "2 9", "image_class_labels.txt, line 2: class id 9 is not in classes.txt"),
    ("image_class_labels.txt", 5, "", "images.txt, line 5: image id 5 has no line in"),
    ("train_test_split.txt", 4, "44 0", "train_test_split.txt, line 4: image id 44 is not in images.txt"),
    ("train_test_split.txt", 2, "2 yes", "train_test_split.txt, line 2: is_training_image is 'yes', not 0 or 1"),
    ("images.txt", 3, "1 x.jpg", "images.txt, line 3: id 1 again (first at line 1)"),
    ("images.txt", 6, "6 no/such.jpg", "images.txt, line 6: no image file"),
    ("classes.txt", 2, "2", "classes.txt, line 2: expected <class_id> <class_name>, got '2'"),
]


@pytest.mark.parametrize("name, line, text, message", CUB_FAULTS)
def test_cub_faults_name_the_file_and_line(tmp_path, name, line, text, message):
    root = make_cub(tmp_path / "cub")
    _replace_line(root / name, line, text)
    with pytest.raises(UsageError) as exc:
        training_sets(_args(root))
    assert message in str(exc.value) and str(root / name.split(",")[0]) in str(exc.value)
    assert len(str(exc.value).splitlines()) == 1


@pytest.mark.parametrize("text, message", [
    ("4 20.0 10.0 200.0 20.0", "bounding_boxes.txt, line 4: the box (20, 10, 220, 30) lies outside the 74x74 image"),
    ("4 20.0 10.0 0.0 20.0", "bounding_boxes.txt, line 4: the box (20, 10, 20, 30) is empty"),
    ("4 20.0 ten 20.0 20.0", "bounding_boxes.txt, line 4: y 'ten' is not a number"),
    ("4 20.0 10.0 20.0", "bounding_boxes.txt, line 4: expected <image_id> <x> <y> <width> <height>"),
])
def test_cub_box_faults(tmp_path, text, message):
    root = make_cub(tmp_path / "cub")
    _replace_line(root / "bounding_boxes.txt", 4, text)
    with pytest.raises(UsageError) as exc:
        _masks(root)
    assert message in str(exc.value) and len(str(exc.value).splitlines()) == 1


def test_dogs_faults(tmp_path):
    from scipy.io import loadmat, savemat

    root = make_dogs(tmp_path / "dogs")
    ann = root / "Annotation" / dog_name(1, 1007)
    good = ann.read_text()
    cases = [(good.replace("<xmax>40</xmax>", "<xmax>4O</xmax>"), "line 21: <xmax> is '4O', not a number"),
             (good.replace("<xmax>40</xmax>", "<xmax>140</xmax>"), "line 18: the box (30, 5, 140, 15) lies outside"),
             (good.replace("</bndbox>", "</bndbx>"), "line 23: not well-formed XML (mismatched tag)"),
             (good.replace("\t\t\t<ymin>6</ymin>\n", ""), "line 18: <bndbox> has no <ymin>")]
    for text, message in cases:
        ann.write_text(text)
        with pytest.raises(UsageError) as exc:
            _masks(root)
        assert str(exc.value).startswith(f"{ann}, ") and message in str(exc.value), str(exc.value)
    ann.write_text(good)
    mat = {k: v for k, v in loadmat(str(root / "test_list.mat")).items() if not k.startswith("__")}
    for change, message in ((dict(labels=mat["labels"][:2]), "test_list.mat: labels has 2 entries, file_list 3"),
                            (dict(labels=mat["labels"] * 0), "test_list.mat, entry 1: label 0.0 is not a class"),
                            (dict(labels=mat["labels"][::-1]), "test_list.mat, entry 1: label 3 is "
                                                               "'n02085620-Chihuahua' here but 'n02085936-Maltese_dog' "
                                                               "at ")):
        savemat(str(root / "test_list.mat"), {**mat, **change})
        with pytest.raises(UsageError) as exc:
            training_sets(_args(root))
        assert message in str(exc.value), str(exc.value)
    (root / "test_list.mat").write_bytes(b"not a mat file at all" * 10)
    with pytest.raises(UsageError, match="test_list.mat: not a MATLAB file scipy can read"):
        training_sets(_args(root))


def test_imagenet_faults(tmp_path):
    root = make_imagenet(tmp_path / "in")
    xml = root / "val" / f"{val_name(2)}.xml"
    xml.write_text(xml.read_text().replace(WNIDS[0], "n09999999"))
    with pytest.raises(UsageError, match=rf"^{xml}, line 14: the object's <name> 'n09999999' is not one of the 3"):
        training_sets(_args(root))
    xml.unlink()
    with pytest.raises(UsageError, match=f"{val_name(2)}.JPEG: no label: expected"):
        training_sets(_args(root))
    root = make_imagenet(tmp_path / "kaggle", kaggle=True)
    csv = root / "LOC_val_solution.csv"
    good = csv.read_text()
    for line, text, message in ((3, f"{val_name(2)},n01440764 31 6 40", "line 3: PredictionString must be groups"),
                                (4, f"{val_name(9)},n01440764 31 6 40 15", f"line 4: no validation image {val_name(9)}"),
                                (2, f"{val_name(1)},n09999999 1 1 5 5", "line 2: 'n09999999' is not one of the 3"),
                                (1, "Id,Boxes", "line 1: expected the header ImageId,PredictionString")):
        csv.write_text(good)
        _replace_line(csv, line, text)
        with pytest.raises(UsageError) as exc:
            training_sets(_args(root))
        assert str(exc.value).startswith(f"{csv}, line {line}") and message in str(exc.value), str(exc.value)
