"""CUB-200-2011 (``--data-format cub``), as its archive unpacks: ``--data`` is the
``CUB_200_2011`` folder with ``images/CLASS/NAME.jpg`` and the text files

    images.txt              <image_id> <path under images/>
    image_class_labels.txt  <image_id> <class_id>
    train_test_split.txt    <image_id> <1: train, 0: test>
    classes.txt             <class_id> <class name>
    bounding_boxes.txt      <image_id> <x> <y> <width> <height>   (pixels; for sib-eval)

and, when the separate segmentations archive is unpacked there, ``segmentations/CLASS/NAME.png``
(the annotators' average: a pixel is on the bird where the mask is at least half of 255).
``sib-train`` trains on the official train split and validates on the test split; ``sib-eval``
scores the test split against the segmentation masks when they are there, else the boxes. Every
file must cover the same image ids: a fault is one line naming the file and the line."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sib_fast.cli_errors import UsageError
from sib_fast.datasets.boxes import Box
from sib_fast.datasets.common import (EvalItem, EvalSet, LabeledImages, missing_image, read_rows, to_float,
                                      to_int)

NAME = "CUB-200-2011"
TRAIN_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt", "images")
BOXES = "bounding_boxes.txt"
SEGMENTATIONS = "segmentations"
MASK_THRESHOLD = 127  # the masks average the annotators: on the bird where at least half marked it


def missing_files(root: Path, purpose: str) -> list[str]:
    """The files of the layout that ``root`` lacks for ``purpose`` ("train" or "eval")."""
    need = list(TRAIN_FILES)
    if purpose == "eval" and not (root / SEGMENTATIONS).is_dir():
        need.append(BOXES)
    return [f for f in need if not (root / f).exists()]


@dataclass
class Cub:
    root: Path
    classes: list[str]
    ids: list[int]                          # in images.txt order
    images: dict[int, tuple[str, str]]      # id -> (path under images/, where it was read)
    labels: dict[int, int]                  # id -> class index (0-based, classes.txt order)
    train: dict[int, bool]


def _id_table(path: Path, fields: int, what: str, known: dict | None) -> dict[int, tuple[list[str], str]]:
    """id -> (the other fields, "FILE, line N"); a repeated id, or one not in ``known``, names its line."""
    table = {}
    for n, parts in read_rows(path, fields, what):
        where = f"{path}, line {n}"
        i = to_int(parts[0], where, "the id")
        if i in table:
            raise UsageError(f"{where}: id {i} again (first at line {table[i][1].rsplit(' ', 1)[-1]})")
        if known is not None and i not in known:
            raise UsageError(f"{where}: image id {i} is not in images.txt")
        table[i] = (parts[1:], where)
    return table


def _every_image_in(table: dict, path: Path, cub_images: dict) -> None:
    for i, (_, where) in cub_images.items():
        if i not in table:
            raise UsageError(f"{where}: image id {i} has no line in {path}")


def read_cub(root: Path) -> Cub:
    """The labels and the official split of every image, checked across the files."""
    cls = _id_table(root / "classes.txt", 2, "<class_id> <class_name>", None)
    class_ids = sorted(cls)
    index = {c: k for k, c in enumerate(class_ids)}
    images = {i: (v[0], where) for i, (v, where) in
              _id_table(root / "images.txt", 2, "<image_id> <image_name>", None).items()}
    for i, (rel, where) in images.items():
        if not (root / "images" / rel).is_file():
            raise missing_image(root / "images" / rel, where)
    labels = {}
    path = root / "image_class_labels.txt"
    for i, (v, where) in _id_table(path, 2, "<image_id> <class_id>", images).items():
        c = to_int(v[0], where, "the class id")
        if c not in index:
            raise UsageError(f"{where}: class id {c} is not in classes.txt")
        labels[i] = index[c]
    _every_image_in(labels, path, images)
    train = {}
    path = root / "train_test_split.txt"
    for i, (v, where) in _id_table(path, 2, "<image_id> <is_training_image>", images).items():
        if v[0] not in ("0", "1"):
            raise UsageError(f"{where}: is_training_image is {v[0]!r}, not 0 or 1")
        train[i] = v[0] == "1"
    _every_image_in(train, path, images)
    return Cub(root, [cls[c][0][0] for c in class_ids], list(images), images, labels, train)


def training_sets(root: Path, train_tf, val_tf):
    """(train, val, classes): the official train and test splits."""
    cub = read_cub(root)

    def split(is_train):
        return LabeledImages([(str(root / "images" / cub.images[i][0]), cub.labels[i]) for i in cub.ids
                              if cub.train[i] == is_train], cub.classes, train_tf if is_train else val_tf)

    return split(True), split(False), cub.classes


def read_boxes(root: Path, cub: Cub) -> dict[int, Box]:
    path = root / BOXES
    boxes = {}
    for i, (v, where) in _id_table(path, 5, "<image_id> <x> <y> <width> <height>", cub.images).items():
        x, y, w, h = (to_float(t, where, name) for t, name in zip(v, ("x", "y", "width", "height")))
        boxes[i] = Box(x, y, x + w, y + h, where)
    _every_image_in(boxes, path, cub.images)
    return boxes


def evaluation_set(root: Path) -> EvalSet:
    """The test split, with the segmentation masks when ``segmentations/`` is there, else the boxes."""
    cub = read_cub(root)
    test = [i for i in cub.ids if not cub.train[i]]
    if (root / SEGMENTATIONS).is_dir():
        items = []
        for i in test:
            rel, where = cub.images[i]
            mask = (root / SEGMENTATIONS / rel).with_suffix(".png")
            if not mask.is_file():
                raise UsageError(f"{where}: no segmentation mask {mask} (segmentations/ is used when present)")
            items.append(EvalItem(root / "images" / rel, cub.labels[i], mask=mask, threshold=MASK_THRESHOLD))
        truth = f"segmentation masks ({SEGMENTATIONS}/, at least half of the annotators)"
    else:
        boxes = read_boxes(root, cub)
        items = [EvalItem(root / "images" / cub.images[i][0], cub.labels[i], boxes=lambda b=boxes[i]: [b])
                 for i in test]
        truth = f"bounding boxes ({BOXES})"
    return EvalSet(items, cub.classes, f"{NAME} test split", truth)
