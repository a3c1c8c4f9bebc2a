"""ImageNet (ILSVRC2012 CLS-LOC, ``--data-format imagenet``) in either of its usual layouts:

- ``--data ROOT`` with ``ROOT/train/WNID/*.JPEG`` and ``ROOT/val/``, the validation images either
  in ``val/WNID/`` folders or flat (``val/ILSVRC2012_val_00000001.JPEG``...);
- the Kaggle download (``imagenet-object-localization-challenge``): ``ROOT/LOC_synset_mapping.txt``,
  ``ROOT/LOC_val_solution.csv``, ``ROOT/ILSVRC/Data/CLS-LOC/{train,val}`` and
  ``ROOT/ILSVRC/Annotations/CLS-LOC/val/*.xml``.

The classes are the sorted wnids of ``train/`` (else of ``LOC_synset_mapping.txt``). A flat
validation image's label, and every validation image's boxes for ``sib-eval``, come from
``ROOT/LOC_val_solution.csv``'s row (``ImageId,PredictionString``: ``WNID xmin ymin xmax
ymax`` per box) when that file is there, else from its PASCAL VOC XML (``ILSVRC2012_bbox_val_v3.tgz``:
``NAME.xml`` beside the image, or in the Kaggle annotations folder). A fault is one line naming the
file and the line."""
from __future__ import annotations

import csv
import re
from pathlib import Path

from sib_fast.cli_errors import UsageError
from sib_fast.datasets.boxes import Box
from sib_fast.datasets.common import EvalItem, EvalSet, LabeledImages, read_rows, to_float, torchvision_transforms
from sib_fast.datasets.voc import read_voc

NAME = "ImageNet"
WNID = re.compile(r"^n\d{8}$")
KAGGLE_DATA = Path("ILSVRC", "Data", "CLS-LOC")
KAGGLE_BOXES = Path("ILSVRC", "Annotations", "CLS-LOC", "val")
SOLUTION = "LOC_val_solution.csv"
SYNSETS = "LOC_synset_mapping.txt"
IMAGE_EXTS = (".jpeg", ".jpg", ".png")


def data_root(root: Path) -> Path:
    """Where ``train/`` and ``val/`` are: ``ROOT`` or the Kaggle download's ``ILSVRC/Data/CLS-LOC``."""
    return root / KAGGLE_DATA if (root / KAGGLE_DATA).is_dir() else root


def wnid_folders(folder: Path) -> list[str] | None:
    """The sorted class folders of ``folder`` when every one is a wnid, else None."""
    try:
        names = sorted(d.name for d in folder.iterdir() if d.is_dir())
    except OSError:
        return None
    return names if names and all(WNID.match(n) for n in names) else None


def looks_like(root: Path) -> bool:
    return (root / SYNSETS).is_file() or wnid_folders(data_root(root) / "train") is not None


def missing_files(root: Path, purpose: str) -> list[str]:
    d = data_root(root)
    missing = []
    if purpose == "train" and wnid_folders(d / "train") is None:
        missing.append("train/WNID/ folders")
    if purpose == "eval" and wnid_folders(d / "train") is None and not (root / SYNSETS).is_file():
        missing.append(f"train/WNID/ folders or {SYNSETS} (the class list)")
    if not (d / "val").is_dir():
        missing.append("val/")
    return missing


def _classes(root: Path) -> list[str]:
    found = wnid_folders(data_root(root) / "train")
    if found is not None:
        return found
    path = root / SYNSETS
    rows = read_rows(path, 2, "<wnid> <names>") if path.is_file() else []
    for n, (wnid, _) in rows:
        if not WNID.match(wnid):
            raise UsageError(f"{path}, line {n}: {wnid!r} is not a wnid (n followed by 8 digits)")
    return sorted(w for _, (w, _) in rows)


def read_solution(path: Path, index: dict[str, int]) -> dict[str, tuple[int, list[Box], str]]:
    """ImageId -> (class index, boxes, "FILE, line N") of LOC_val_solution.csv."""
    out = {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
                raise UsageError(f"{path}, line 1: expected the header ImageId,PredictionString")
            for row in reader:
                where = f"{path}, line {reader.line_num}"
                if not row or not "".join(row).strip():
                    continue
                if len(row) != 2:
                    raise UsageError(f"{where}: expected ImageId,PredictionString, got {len(row)} fields")
                image, tokens = row[0].strip(), row[1].split()
                if image in out:
                    raise UsageError(f"{where}: {image} again (first at {out[image][2]})")
                if not tokens or len(tokens) % 5:
                    raise UsageError(f"{where}: PredictionString must be groups of 'WNID xmin ymin xmax ymax'")
                boxes = []
                for k in range(0, len(tokens), 5):
                    wnid = tokens[k]
                    if wnid not in index:
                        raise UsageError(f"{where}: {wnid!r} is not one of the {len(index)} classes")
                    x0, y0, x1, y1 = (to_float(t, where, "a box corner") for t in tokens[k + 1:k + 5])
                    boxes.append(Box(x0 - 1, y0 - 1, x1, y1, where))  # inclusive 1-based, as the XML
                out[image] = (index[tokens[0]], boxes, where)
    except csv.Error as exc:
        raise UsageError(f"{path}: not CSV ({exc})") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text") from None
    return out


class _Val:
    """The validation images, their labels and where their boxes are."""

    def __init__(self, root: Path, classes: list[str]):
        self.root, self.classes = root, classes
        self.index = {c: k for k, c in enumerate(classes)}
        val = data_root(root) / "val"
        self.solution = read_solution(root / SOLUTION, self.index) if (root / SOLUTION).is_file() else None
        try:
            folders = wnid_folders(val)
            if folders is not None:
                unknown = [w for w in folders if w not in self.index]
                if unknown:
                    raise UsageError(f"{val / unknown[0]}: a validation class that train/ does not have")
                images = [(f, self.index[w]) for w in folders for f in sorted((val / w).iterdir())
                          if f.suffix.lower() in IMAGE_EXTS]
            else:
                images = [(f, None) for f in sorted(val.iterdir()) if f.suffix.lower() in IMAGE_EXTS]
        except OSError as exc:
            raise UsageError(f"cannot list {exc.filename}: {exc.strerror or exc}") from None
        if not images:
            raise UsageError(f"{val}: no validation images (.JPEG) there or in its WNID/ folders")
        if self.solution is not None:
            names = {f.stem for f, _ in images}
            for image, (_, _, where) in self.solution.items():
                if image not in names:
                    raise UsageError(f"{where}: no validation image {image} under {val}")
        self.images = [(f, y if y is not None else self._label(f)) for f, y in images]

    def _xml(self, image: Path) -> Path | None:
        for p in (image.with_suffix(".xml"), self.root / KAGGLE_BOXES / (image.stem + ".xml")):
            if p.is_file():
                return p
        return None

    def _label(self, image: Path) -> int:
        if self.solution is not None:
            if image.stem not in self.solution:
                raise UsageError(f"{image}: no row for {image.stem} in {self.root / SOLUTION}")
            return self.solution[image.stem][0]
        xml = self._xml(image)
        if xml is None:
            raise UsageError(f"{image}: no label: expected {self.root / SOLUTION} or {image.stem}.xml beside it "
                             "(docs/reproducing.md)")
        objects = read_voc(xml).objects
        if not objects:
            raise UsageError(f"{xml}: no <object>, so no label for {image.name}")
        name, _, where = objects[0]
        if name not in self.index:
            raise UsageError(f"{where}: the object's <name> {name!r} is not one of the "
                             f"{len(self.index)} classes")
        return self.index[name]

    def boxes(self, image: Path):
        """A function giving ``image``'s boxes (read then), or a UsageError now when it has none."""
        if self.solution is not None:
            if image.stem not in self.solution:
                raise UsageError(f"{image}: no row for {image.stem} in {self.root / SOLUTION}")
            found = self.solution[image.stem][1]
            return lambda: found
        xml = self._xml(image)
        if xml is None:
            raise UsageError(f"{image}: no boxes: expected {self.root / SOLUTION} or {image.stem}.xml beside it "
                             "(docs/reproducing.md)")
        return lambda: [box for _, box, _ in read_voc(xml).objects]


def training_sets(root: Path, train_tf, val_tf):
    """(train, val, classes): ``train/`` as an ImageFolder, the validation images with their labels."""
    torchvision_transforms()
    from torchvision import datasets

    from sib_fast.training.data import read_image

    try:
        train = datasets.ImageFolder(str(data_root(root) / "train"), train_tf, loader=read_image)
    except (FileNotFoundError, RuntimeError, OSError) as exc:
        raise UsageError(f"--data {root}: {exc}") from None
    val = _Val(root, train.classes)
    return train, LabeledImages([(str(f), y) for f, y in val.images], train.classes, val_tf), train.classes


def evaluation_set(root: Path) -> EvalSet:
    """The validation images with their labels and boxes."""
    classes = _classes(root)
    if not classes:
        raise UsageError(f"--data {root}: no class list (train/WNID/ folders or {SYNSETS})")
    val = _Val(root, classes)
    items = [EvalItem(f, y, boxes=val.boxes(f)) for f, y in val.images]
    source = SOLUTION if val.solution is not None else "PASCAL VOC XML"
    return EvalSet(items, classes, f"{NAME} validation split", f"bounding boxes ({source})")
