"""What lets ``sib-train --resume`` continue from the middle of an epoch (``--checkpoint-every N``)
exactly as the uninterrupted run went on: the same batches in the same order, the same random
augmentations, the same RNG.

- ``SkipSampler`` wraps the training sampler: its order is drawn as before (from the loader's
  generator, reseeded at each epoch), then the batches already trained are skipped as indices,
  without loading their images.
- ``ItemSeeded`` wraps the training set: inside a DataLoader worker, each image's random
  augmentation is seeded from (run seed, epoch, index), so it does not depend on which worker
  loads it or on how many images that worker loaded before (which a resumed run changes). In the
  main process (``--workers 0``) the augmentations draw from the process's RNG, which the
  checkpoint saves, and nothing is reseeded.
"""
from __future__ import annotations

import itertools
import random

import torch
from torch.utils.data import Dataset, Sampler, get_worker_info


class SkipSampler(Sampler):
    """``inner``'s indices without the first ``skip`` (set for one epoch, then back to 0)."""

    def __init__(self, inner: Sampler):
        self.inner = inner
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:  # DistributedSampler's
        self.inner.set_epoch(epoch)

    def __len__(self) -> int:
        return max(len(self.inner) - self.skip, 0)

    def __iter__(self):
        return itertools.islice(iter(self.inner), self.skip, None)


class ItemSeeded(Dataset):
    """``dataset[i]``; in a DataLoader worker, with torch's and Python's RNG seeded from
    ``(seed, epoch, i)`` first. ``epoch`` is set before each epoch's loader starts its workers."""

    def __init__(self, dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        if get_worker_info() is not None:  # a worker's own RNG: reseeding it disturbs nothing else
            s = (self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(index)
            torch.manual_seed(s % 2 ** 63)
            random.seed(s)
        return self.dataset[index]

    def __getattr__(self, name):  # .classes, .samples... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)
