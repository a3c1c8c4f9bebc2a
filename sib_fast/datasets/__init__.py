"""The image datasets that ``sib-train`` and ``sib-eval`` read from a ``--data`` folder, in the
layouts the benchmarks ship (docs/reproducing.md): CUB-200-2011 (``cub``), Stanford Dogs
(``dogs``), ImageNet (``imagenet``) and the generic layout (``folder``: an ImageFolder
``train/`` + ``val/`` for training, ``images/`` + ``masks/`` for evaluation). ``--data-format auto``
detects the layout from the folder's files (``detect``).

``training_sets`` gives the labelled train and validation splits (the official ones) as torch
Datasets; ``evaluation_set`` the images of the evaluation split with their ground truth (mask
files, or boxes that ``boxes`` turns into masks at the evaluation view)."""
from sib_fast.datasets.detect import DATA_FORMATS, detect_format
from sib_fast.datasets.sets import evaluation_set, training_sets

__all__ = ["DATA_FORMATS", "detect_format", "evaluation_set", "training_sets"]
