"""The generic layout (``--data-format folder``): an ImageFolder ``train/`` + ``val/``
(``DIR/SPLIT/CLASS/NAME.EXT``) for ``sib-train``, and ``images/`` + ``masks/``
(``DIR/images/CLASS/NAME.EXT`` and ``DIR/masks/CLASS/NAME.png``, non-zero = object) for
``sib-eval``, whose classes are the sorted class folders, as ImageFolder numbers them."""
from __future__ import annotations

from pathlib import Path

from sib_fast.cli_errors import UsageError
from sib_fast.datasets.common import EvalItem, EvalSet, torchvision_transforms
from sib_fast.training.data import read_image

NAME = "generic folders"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
FILES = {"train": ("train", "val"), "eval": ("images", "masks")}


def looks_like(root: Path) -> bool:
    return any(all((root / f).is_dir() for f in files) for files in FILES.values())


def missing_files(root: Path, purpose: str) -> list[str]:
    return [f"{f}/" for f in FILES[purpose] if not (root / f).is_dir()]


def training_sets(root: Path, train_tf, val_tf):
    """(train, val, classes): the ImageFolders ``root/train`` and ``root/val``, with the same classes."""
    torchvision_transforms()
    from torchvision import datasets

    try:
        # read_image names the file it cannot decode; SkipBadImages skips it (in the workers too)
        train = datasets.ImageFolder(str(root / "train"), train_tf, loader=read_image)
        val = datasets.ImageFolder(str(root / "val"), val_tf, loader=read_image)
    except (FileNotFoundError, RuntimeError, OSError) as exc:
        raise UsageError(f"--data {str(root)!r}: {exc}") from None
    if train.classes != val.classes:
        raise UsageError(f"--data {str(root)!r}: train/ and val/ have different class folders")
    return train, val, train.classes


def evaluation_set(root: Path) -> EvalSet:
    """Every image of ``images/CLASS/`` with its mask ``masks/CLASS/STEM.png``."""
    img_root, mask_root = root / "images", root / "masks"
    try:
        classes = sorted(d.name for d in img_root.iterdir() if d.is_dir())
        if not classes:
            raise UsageError(f"--data {root}: {img_root} has no class folders")
        items = []
        for ci, c in enumerate(classes):
            for f in sorted((img_root / c).iterdir()):
                if f.suffix.lower() in IMAGE_EXTS:
                    m = mask_root / c / (f.stem + ".png")
                    if not m.is_file():
                        raise UsageError(f"--data {root}: no mask {m} for image {f}")
                    items.append(EvalItem(f, ci, mask=m))
    except OSError as exc:  # an unreadable folder
        raise UsageError(f"--data {root}: cannot list {exc.filename}: {exc.strerror or exc}") from None
    if not items:
        raise UsageError(f"--data {root}: no images under {img_root}")
    return EvalSet(items, classes, root.name, "masks (masks/)")
