"""What the dataset formats share: the training and validation transforms of ``sib-train``, a
fixed random subset, and ``LabeledImages`` (a list of image files and labels as a torch Dataset)."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset, Subset

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
