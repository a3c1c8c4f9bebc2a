"""``sib-eval``: compare the explanations of ``sib-train`` checkpoints against ground-truth masks
(also ``python -m sib_fast.evaluate``).

    sib-eval runs/baseline runs/sib --output report            # synthetic data, as trained
    sib-eval base=runs/baseline sib=runs/sib --data DIR --quick

Each positional argument is a checkpoint (``checkpoint.pt``) or the ``sib-train`` output folder
holding it, optionally ``LABEL=PATH``. The dataset is ``synthetic`` (the embedded
``SyntheticObjects`` validation split at the checkpoints' image size, classes and spurious-cue
setting; it never overlaps a training split) or a folder ``DIR`` with ``DIR/images/CLASS/NAME.EXT``
(class folders as in the ImageFolder the model was trained on) and ``DIR/masks/CLASS/NAME.png``
(non-zero = object), or a benchmark as it ships (CUB-200-2011's test split with its segmentations
or boxes, Stanford Dogs' test list, ImageNet's validation split with its boxes: boxes become the
mask of their union; ``--data-format`` forces the layout, docs/reproducing.md). Every model is
explained on the same images, in pixel space ([0, 1] values; the training normalisation is part
of the explained model), for the true class by default.

The report folder gets ``report.md`` (one table per metric: method x model, mean and 95%
bootstrap interval over images, accuracy beside it; and, when several checkpoints share a label
or training mode, a table over them), ``results.json`` (every per-image score), one
``grid_<method>.png`` per method (input, mask, each model's map) and ``training_curves.png``
(HSIC and BG of every run from its ``metrics.jsonl``, on one plot).

This module parses and checks the arguments; the work is ``sib_fast.evaluation.report.run``.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

from sib_fast.cli_errors import UsageError, check_output_dir, run_command
from sib_fast.datasets import DATA_FORMATS
from sib_fast.evaluation import PROG
from sib_fast.evaluation import localization as L
from sib_fast.evaluation.explain import CAPTUM_METHODS, METHODS, canonical_method
from sib_fast.evaluation.report import REPORT_FILES, run
from sib_fast.training.data import DEFAULT_MAX_BAD_IMAGES

QUICK = dict(num_images=8, ig_steps=8, smoothgrad_samples=4, steps=8, grid_images=4, n_boot=500)
FULL = dict(num_images=128, ig_steps=32, smoothgrad_samples=16, steps=20, grid_images=6, n_boot=2000)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Explain sib-train checkpoints (Captum and CAM methods) and "
                                "score the maps against ground-truth masks: report.md, image grids, training curves.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoints", nargs="+", metavar="[LABEL=]CKPT",
                   help="sib-train checkpoint.pt files or their output folders")
    p.add_argument("--data", default="synthetic", help="'synthetic' or a folder: DIR with images/CLASS/* and "
                   "masks/CLASS/*.png, or CUB-200-2011, Stanford Dogs or ImageNet as they ship (docs/reproducing.md)")
    p.add_argument("--data-format", default="auto", choices=DATA_FORMATS, dest="data_format",
                   help="the --data folder's layout (default: detected from its files)")
    p.add_argument("--output", default=os.path.join("runs", "sib_eval"), help="report folder")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated explanation methods")
    p.add_argument("--num-images", type=int, default=None, help=f"images to evaluate (default {FULL['num_images']}, "
                   f"--quick {QUICK['num_images']}; a folder: 0 = all)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--target", choices=("label", "pred"), default="label", help="explain the true or the predicted class")
    p.add_argument("--tolerance", type=float, default=None,
                   help="pointing game tolerance in pixels (default 15 at 224px, scaled to the image size)")
    p.add_argument("--topk", default="0.1", help="top-k IoU: fraction of pixels, or 'mask' for the object's area")
    p.add_argument("--steps", type=int, default=None, help=f"deletion/insertion steps (default {FULL['steps']})")
    p.add_argument("--baseline", choices=L.BASELINES, default="blur", help="deletion/insertion baseline")
    p.add_argument("--ig-steps", type=int, default=None, help=f"Integrated Gradients steps (default {FULL['ig_steps']})")
    p.add_argument("--smoothgrad-samples", type=int, default=None,
                   help=f"SmoothGrad samples (default {FULL['smoothgrad_samples']})")
    p.add_argument("--smoothgrad-noise", type=float, default=0.15, help="SmoothGrad noise std / input range")
    p.add_argument("--grid-images", type=int, default=None, help=f"rows of each image grid (default {FULL['grid_images']})")
    p.add_argument("--data-seed", type=int, default=0, help="synthetic: seed of the evaluation images")
    p.add_argument("--max-bad-images", type=int, default=DEFAULT_MAX_BAD_IMAGES,
                   help="a folder: skip unreadable images and masks (each named once, listed in results.json); "
                        "more than this many is an error (0: the first one is)")
    p.add_argument("--spurious", type=float, default=None,
                   help="synthetic: background-grating probability (default: the checkpoints'; in the val split the "
                        "grating's orientation is random)")
    p.add_argument("--image-size", type=int, default=None, help="default: the checkpoints' training size")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--quick", action="store_true", help="a small run (about a minute on a 2-core CPU): "
                   + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    return p


def validate(args) -> None:
    """Fill in the preset's defaults and check every argument before any work; UsageError with one line."""
    preset = QUICK if args.quick else FULL
    for k, v in preset.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.n_boot = preset["n_boot"]
    try:
        args.methods = list(dict.fromkeys(canonical_method(m) for m in args.methods.split(",") if m.strip()))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not args.methods:
        raise UsageError("--methods is empty")
    if any(m in CAPTUM_METHODS for m in args.methods):
        try:
            import captum  # noqa: F401
        except ImportError:
            raise UsageError("the Captum methods need captum: pip install \"captum>=0.9\" (or use "
                             "--methods gradcam,gradcam_pp,layercam)") from None
    if args.topk != "mask":
        try:
            args.topk = float(args.topk)
        except ValueError:
            raise UsageError(f"--topk must be a fraction in (0, 1] or 'mask', got {args.topk!r}") from None
        if not 0 < args.topk <= 1:
            raise UsageError(f"--topk must be a fraction in (0, 1] or 'mask', got {args.topk}")
    for name in ("num_images", "batch_size", "steps", "ig_steps", "smoothgrad_samples", "grid_images"):
        v = getattr(args, name)
        low = 0 if name in ("num_images", "grid_images") else 1
        if v < low:
            raise UsageError(f"--{name.replace('_', '-')} must be >= {low}, got {v}")
    if args.data == "synthetic" and args.data_format != "auto":
        raise UsageError(f"--data-format {args.data_format} applies to a --data folder, not to synthetic data")
    if args.data == "synthetic" and args.num_images < 1:
        raise UsageError("--num-images must be >= 1 for synthetic data")
    if args.tolerance is not None and not args.tolerance >= 0:
        raise UsageError(f"--tolerance must be >= 0 pixels, got {args.tolerance}")
    if args.spurious is not None and not 0 <= args.spurious <= 1:
        raise UsageError(f"--spurious must be in [0, 1], got {args.spurious}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available")
    if args.max_bad_images < 0:
        raise UsageError(f"--max-bad-images must be >= 0, got {args.max_bad_images}")
    if args.image_size is not None and not 8 <= args.image_size <= 4096:
        raise UsageError(f"--image-size must be between 8 and 4096, got {args.image_size}")
    if not math.isfinite(args.smoothgrad_noise) or args.smoothgrad_noise < 0:
        raise UsageError(f"--smoothgrad-noise must be a finite number >= 0, got {args.smoothgrad_noise}")
    # last: the report folder must be writable (checked now, created only when there is something to write)
    check_output_dir(args.output, "--output", REPORT_FILES + tuple(f"grid_{m}.png" for m in args.methods))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(PROG, lambda: validate(args), lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
