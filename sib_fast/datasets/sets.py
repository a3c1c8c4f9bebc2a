"""One entry point per command: ``training_sets`` (``sib-train``: the labelled train and validation
splits of a ``--data`` folder) and ``evaluation_set`` (``sib-eval``: the evaluation split's images
with their ground truth), each for the detected or forced format."""
from __future__ import annotations

from pathlib import Path

from sib_fast.datasets.common import EvalSet, subset, transforms_for
from sib_fast.datasets.detect import MODULES, detect_format
from sib_fast.training.data import IMAGENET_STATS, SkipBadImages


def training_sets(args):
    """(train, val, num_classes, normalisation stats) of the folder ``args.data`` (``args.data_format``,
    default auto), each split cut to ``--train-samples`` / ``--val-samples`` when they are > 0."""
    root = Path(args.data)
    fmt = detect_format(root, getattr(args, "data_format", "auto"), "train")
    train_tf, val_tf = transforms_for(args.image_size)
    train, val, classes = MODULES[fmt].training_sets(root, train_tf, val_tf)
    return (SkipBadImages(subset(train, args.train_samples, args.seed)),
            SkipBadImages(subset(val, args.val_samples, args.seed + 1)), len(classes), IMAGENET_STATS)


def evaluation_set(args) -> EvalSet:
    """The images, labels and ground truth ``sib-eval`` scores of the folder ``args.data``."""
    root = Path(args.data)
    return MODULES[detect_format(root, getattr(args, "data_format", "auto"), "eval")].evaluation_set(root)
