"""Stanford Dogs (``--data-format dogs``), as its three archives unpack into one ``--data`` folder:
``Images/BREED/NAME.jpg`` (images.tar), ``Annotation/BREED/NAME`` (annotation.tar: one PASCAL VOC
XML file per image, without an extension) and ``train_list.mat`` / ``test_list.mat`` (lists.tar:
MATLAB files whose ``file_list``, ``annotation_list`` and ``labels`` (1..120) name each split's
images, their annotation and their class). Read with scipy (``pip install scipy``).

``sib-train`` trains on the train list and validates on the test list; ``sib-eval`` scores the
test list against the union of each image's boxes. A fault is one line naming the file and the
entry (the row of the lists) or, in an XML file, the line."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sib_fast.cli_errors import UsageError
from sib_fast.datasets.common import EvalItem, EvalSet, LabeledImages, missing_image
from sib_fast.datasets.voc import read_voc

NAME = "Stanford Dogs"
LISTS = {"train": "train_list.mat", "test": "test_list.mat"}
TRAIN_FILES = ("train_list.mat", "test_list.mat", "Images")
EVAL_FILES = ("test_list.mat", "Images", "Annotation")


def missing_files(root: Path, purpose: str) -> list[str]:
    return [f for f in (TRAIN_FILES if purpose == "train" else EVAL_FILES) if not (root / f).exists()]


@dataclass
class Entry:
    image: str        # under Images/
    annotation: str   # under Annotation/
    label: int        # 0-based
    where: str        # "FILE, entry N"


def _strings(value, path: Path, field: str, n: int | None) -> list[str]:
    """A MATLAB cell array of strings (as loadmat gives it: an object array of 1-element arrays)."""
    import numpy as np

    out = []
    for k, v in enumerate(np.asarray(value, dtype=object).reshape(-1), 1):
        while isinstance(v, np.ndarray) and v.dtype == object and v.size == 1:
            v = v.reshape(-1)[0]
        if isinstance(v, np.ndarray) and v.dtype.kind == "U" and v.size == 1:
            v = str(v.reshape(-1)[0])
        if not isinstance(v, str) or not v:
            raise UsageError(f"{path}, entry {k}: {field} is not a file name")
        out.append(v)
    if n is not None and len(out) != n:
        raise UsageError(f"{path}: {field} has {len(out)} entries, file_list {n}")
    return out


def read_list(root: Path, split: str) -> list[Entry]:
    """The entries of ``train_list.mat`` or ``test_list.mat``, checked (labels in range, files present)."""
    path = root / LISTS[split]
    try:
        import numpy as np
        from scipy.io import loadmat
    except ImportError:
        raise UsageError(f"{path}: Stanford Dogs' lists are MATLAB files, read with scipy: pip install scipy") from None
    try:
        mat = loadmat(str(path))
    except Exception as exc:  # scipy's readers raise many kinds on a damaged file
        raise UsageError(f"{path}: not a MATLAB file scipy can read ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    for field in ("file_list", "annotation_list", "labels"):
        if field not in mat:
            found = ", ".join(k for k in mat if not k.startswith("__"))
            raise UsageError(f"{path}: no variable {field!r} (it has {found})")
    files = _strings(mat["file_list"], path, "file_list", None)
    notes = _strings(mat["annotation_list"], path, "annotation_list", len(files))
    labels = np.asarray(mat["labels"]).reshape(-1)
    if labels.size != len(files):
        raise UsageError(f"{path}: labels has {labels.size} entries, file_list {len(files)}")
    entries = []
    for k, (f, a, y) in enumerate(zip(files, notes, labels.tolist()), 1):
        where = f"{path}, entry {k}"
        if not (isinstance(y, (int, float)) and float(y).is_integer() and y >= 1):
            raise UsageError(f"{where}: label {y!r} is not a class number 1, 2, ...")
        if not (root / "Images" / f).is_file():
            raise missing_image(root / "Images" / f, where)
        entries.append(Entry(f, a, int(y) - 1, where))
    return entries


def class_names(lists: list[list[Entry]]) -> list[str]:
    """The breed folder of each label; one label in two folders is an error naming the entry."""
    names: dict[int, tuple[str, str]] = {}
    for entries in lists:
        for e in entries:
            folder = e.image.split("/")[0] if "/" in e.image else f"class {e.label + 1}"
            old = names.setdefault(e.label, (folder, e.where))
            if old[0] != folder:
                raise UsageError(f"{e.where}: label {e.label + 1} is {folder!r} here but {old[0]!r} at {old[1]}")
    k = max(names) + 1 if names else 0
    return [names.get(i, (f"class {i + 1}",))[0] for i in range(k)]


def training_sets(root: Path, train_tf, val_tf):
    """(train, val, classes): the train list, and the test list as validation."""
    train, test = read_list(root, "train"), read_list(root, "test")
    classes = class_names([train, test])

    def dataset(entries, tf):
        return LabeledImages([(str(root / "Images" / e.image), e.label) for e in entries], classes, tf)

    return dataset(train, train_tf), dataset(test, val_tf), classes


def _annotation(root: Path, e: Entry) -> Path:
    path = root / "Annotation" / e.annotation
    if not path.is_file() and path.with_suffix(".xml").is_file():  # a copy that added the extension
        path = path.with_suffix(".xml")
    if not path.is_file():
        raise UsageError(f"{e.where}: no annotation file {root / 'Annotation' / e.annotation}")
    return path


def evaluation_set(root: Path) -> EvalSet:
    """The test list with its boxes (each image's XML is read when the image is)."""
    test = read_list(root, "test")
    train = read_list(root, "train") if (root / LISTS["train"]).is_file() else []
    classes = class_names([train, test])

    def boxes(e):
        return lambda: [box for _, box, _ in read_voc(_annotation(root, e)).objects]

    items = [EvalItem(root / "Images" / e.image, e.label, boxes=boxes(e)) for e in test]
    return EvalSet(items, classes, f"{NAME} test list", "bounding boxes (Annotation/, PASCAL VOC XML)")

