"""One entry point per command: ``training_sets`` (``sib-train``: the labelled train and validation
splits of a ``--data`` folder) and ``evaluation_items`` (``sib-eval``: the evaluation split's images
with their ground truth), each dispatching on the detected or forced format."""
from __future__ import annotations

from pathlib import Path

from sib_fast.datasets import folder
from sib_fast.datasets.common import subset, transforms_for
from sib_fast.datasets.detect import detect_format
from sib_fast.training.data import IMAGENET_STATS, SkipBadImages


def training_sets(args):
    """(train, val, num_classes, normalisation stats) of the folder ``args.data``."""
    root = Path(args.data)
    fmt = detect_format(root, getattr(args, "data_format", "auto"), "train")
    train_tf, val_tf = transforms_for(args.image_size)
    train, val, classes = folder.training_sets(root, train_tf, val_tf, args.data)
    return (SkipBadImages(subset(train, args.train_samples, args.seed)),
            SkipBadImages(subset(val, args.val_samples, args.seed + 1)), len(classes), IMAGENET_STATS)


def evaluation_items(args, log=print):
    raise NotImplementedError
