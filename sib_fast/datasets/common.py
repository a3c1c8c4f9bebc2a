"""What the dataset formats share: the training and validation transforms of ``sib-train``, a
fixed random subset, ``LabeledImages`` (a list of image files and labels as a torch Dataset),
the reading of annotation files (a fault names the file and the line) and the evaluation items."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Dataset, Subset

from sib_fast.cli_errors import UsageError
from sib_fast.datasets.boxes import Box
from sib_fast.training.data import read_image
from sib_fast.training.faults import TrainingStopped


def torchvision_transforms():
    try:
        from torchvision import transforms
    except ImportError:
        raise TrainingStopped("--data PATH needs torchvision: pip install torchvision") from None
    return transforms


def transforms_for(size: int):
    """(train, val) transforms: a random resized crop and flip; the shorter side to size*256/224 and
    a centre crop (the view ``sib-eval`` explains)."""
    transforms = torchvision_transforms()
    train_tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor()])
    val_tf = transforms.Compose([transforms.Resize(round(size * 256 / 224)), transforms.CenterCrop(size),
                                 transforms.ToTensor()])
    return train_tf, val_tf


def subset(dataset, n: int, seed: int):
    """``n`` items of ``dataset`` drawn once with ``seed``, in their order (all when n <= 0 or n >= len)."""
    if n <= 0 or n >= len(dataset):
        return dataset
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    return Subset(dataset, sorted(idx.tolist()))


class LabeledImages(Dataset):
    """``(transform(image), label)`` of ``samples`` [(path, label)], the images read by ``read_image``
    (an undecodable file raises ``BadImageError`` naming it, which ``SkipBadImages`` skips).
    ``classes`` and ``samples`` as in torchvision's ImageFolder."""

    def __init__(self, samples: list[tuple[str, int]], classes: list[str], transform=None):
        self.samples, self.classes, self.transform = samples, classes, transform
        self.targets = [label for _, label in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        image = read_image(path)
        if self.transform is not None:
            image = self.transform(image)
        return image, label


# ----------------------------------------------------------------------------- annotation files

def read_rows(path: Path, fields: int, what: str) -> list[tuple[int, list[str]]]:
    """(line number, fields) of each non-blank line of a whitespace-separated text file; the last
    field takes the rest of the line. A line with fewer fields is a UsageError naming it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = Path(path).read_bytes()[:exc.start].count(b"\n") + 1
        raise UsageError(f"{path}, line {line}: not UTF-8 text") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(None, fields - 1)
        if len(parts) != fields:
            raise UsageError(f"{path}, line {n}: expected {what}, got {line.strip()[:80]!r}")
        rows.append((n, parts))
    return rows


def to_int(text: str, where: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"{where}: {what} {text!r} is not an integer") from None


def to_float(text: str, where: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"{where}: {what} {text!r} is not a number") from None


def missing_image(image: Path, where: str) -> UsageError:
    return UsageError(f"{where}: no image file {image}")


@dataclass
class EvalItem:
    """One evaluation image, its class and its ground truth: a mask file (``> threshold`` is the
    object) or ``boxes()`` (its boxes, read when the image is loaded)."""
    image: Path
    label: int
    mask: Path | None = None
    threshold: int = 0
    boxes: Callable[[], list[Box]] | None = None


@dataclass
class EvalSet:
    """What ``sib-eval`` explains: the items, the class names (the model's output order), the split's
    name and what the ground truth is, for the report."""
    items: list[EvalItem]
    classes: list[str]
    name: str
    truth: str
