"""Which layout a ``--data`` folder is in: ``detect_format`` recognises it from its files
(``--data-format auto``), or checks that a forced format's files are there; a folder that lacks
what its format needs is one line naming what is missing."""
from __future__ import annotations

from pathlib import Path

from sib_fast.cli_errors import UsageError
from sib_fast.datasets import cub, folder, imagenet, stanford_dogs

DATA_FORMATS = ("auto", "folder", "cub", "dogs", "imagenet")
MODULES = {"cub": cub, "dogs": stanford_dogs, "imagenet": imagenet, "folder": folder}
NAMES = {"cub": cub.NAME, "dogs": stanford_dogs.NAME, "imagenet": imagenet.NAME, "folder": folder.NAME}


def _looks_like(root: Path) -> str | None:
    """The format whose own files ``root`` has (in this order: the benchmarks' files are specific)."""
    if (root / "images.txt").is_file() and (root / "image_class_labels.txt").is_file():
        return "cub"
    if (root / "train_list.mat").is_file() or (root / "test_list.mat").is_file():
        return "dogs"
    if imagenet.looks_like(root):
        return "imagenet"
    if folder.looks_like(root):
        return "folder"
    return None


def detect_format(root: Path, forced: str = "auto", purpose: str = "train") -> str:
    """The format of ``root`` for ``purpose`` (``"train"``: sib-train, ``"eval"``: sib-eval)."""
    root = Path(root)
    if forced not in DATA_FORMATS:
        raise UsageError(f"--data-format must be one of {', '.join(DATA_FORMATS)}, got {forced!r}")
    if not root.is_dir():
        raise UsageError(f"--data {root}: no such folder")
    fmt = _looks_like(root) if forced == "auto" else forced
    if fmt is None:
        raise UsageError(f"--data {root}: no layout recognised: expected " + (
            "an ImageFolder train/ and val/" if purpose == "train" else "images/ and masks/")
            + ", CUB-200-2011's images.txt..., Stanford Dogs' train_list.mat... or ImageNet's train/WNID/ "
            "(docs/reproducing.md)")
    missing = MODULES[fmt].missing_files(root, purpose)
    if missing:
        how = "--data-format" if forced != "auto" else "detected as"
        raise UsageError(f"--data {root} ({how} {fmt}, {NAMES[fmt]}): missing {', '.join(missing)} "
                         f"(docs/reproducing.md)")
    return fmt
