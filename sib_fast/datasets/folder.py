"""The generic layout: an ImageFolder ``train/`` + ``val/`` (``DIR/SPLIT/CLASS/NAME.EXT``) for
``sib-train``, and ``images/`` + ``masks/`` (``DIR/images/CLASS/NAME.EXT``, ``DIR/masks/CLASS/NAME.png``,
non-zero = object) for ``sib-eval``."""
from __future__ import annotations

from pathlib import Path

from sib_fast.cli_errors import UsageError
from sib_fast.datasets.common import torchvision_transforms
from sib_fast.training.data import read_image


def training_sets(root: Path, train_tf, val_tf, name: str):
    """(train, val, classes): the ImageFolders ``root/train`` and ``root/val``, with the same classes."""
    torchvision_transforms()
    from torchvision import datasets

    try:
        # read_image names the file it cannot decode; SkipBadImages skips it (in the workers too)
        train = datasets.ImageFolder(str(root / "train"), train_tf, loader=read_image)
        val = datasets.ImageFolder(str(root / "val"), val_tf, loader=read_image)
    except (FileNotFoundError, RuntimeError, OSError) as exc:
        raise UsageError(f"--data {name!r}: {exc}") from None
    if train.classes != val.classes:
        raise UsageError(f"--data {name!r}: train/ and val/ have different class folders")
    return train, val, train.classes
