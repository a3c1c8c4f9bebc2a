"""``sib-train``: train an image classifier with the S-IB loss (also ``python -m sib_fast.train``).

With no arguments it trains the small built-in CNN on the embedded ``SyntheticObjects`` data
on CPU (a few minutes on two cores) and prints a summary. ``--data PATH`` takes an ImageFolder
root with ``train/`` and ``val/``, or CUB-200-2011, Stanford Dogs or ImageNet as they ship; ``torchrun`` runs it on several GPUs or
nodes (DDP). Each epoch appends a line to ``OUTPUT/metrics.jsonl``, redraws
``OUTPUT/curves.png`` and writes ``OUTPUT/checkpoint.pt`` atomically (also every
``--checkpoint-every`` steps); ``--resume`` continues from it, mid-epoch too, and ``--eval-only``
scores it. ``--pretrained`` starts from a file's or a library cache's weights.

This module parses and checks the arguments; the run itself is ``sib_fast.training.loop.run``.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

from sib_fast import validation
from sib_fast.backends.dispatch import BACKEND_NAMES, BackendUnavailableError, resolve_backend
from sib_fast.cli_errors import UsageError, check_output_dir, run_command
from sib_fast.datasets import detect_format
from sib_fast.training import PROG, pretrained, schedule
from sib_fast.training.checkpoint import CHECKPOINT
from sib_fast.training.data import CLASSES, DEFAULT_MAX_BAD_IMAGES
from sib_fast.training.faults import TrainingStopped
from sib_fast.training.loop import run
from sib_fast.training.models import BUILTIN, check_arch, check_image_size
from sib_fast.training.norms import SUB_BATCH_NORMS
from sib_fast.training.prepare import AMP_DTYPES, OUTPUT_FILES
from sib_fast.training.step import VJP_MODES

PAPER_LR = 1e-4       # AdamW, the paper's ResNet-50 setting
SYNTHETIC_LR = 2e-3   # the built-in CNN from scratch on SyntheticObjects
SYNTHETIC_TRAIN_SAMPLES = 2048  # with 4 epochs: about two minutes on 2 CPU cores
SYNTHETIC_VAL_SAMPLES = 256


def default_window(image_size: int) -> int:
    """The S-IB box window scaled to the image: 31 at 224 (the paper), odd, at least 3."""
    w = round(31 * image_size / 224)
    return max(3, w if w % 2 else w + 1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Train an image classifier with the Spatial Information Bottleneck (S-IB) loss. "
        "With no arguments: the built-in CNN on the embedded synthetic dataset, on CPU, in a few minutes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data and model")
    g.add_argument("--data", default="synthetic",
                   help="'synthetic' (embedded SyntheticObjects, nothing to download) or a folder: an ImageFolder "
                        "root with train/ and val/, CUB-200-2011, Stanford Dogs or ImageNet as they ship "
                        "(docs/reproducing.md)")
    g.add_argument("--data-format", default="auto", choices=("auto", "folder", "cub", "dogs", "imagenet"),
                   dest="data_format",
                   help="the --data folder's layout (default: detected from its files; docs/reproducing.md)")
    g.add_argument("--arch", default="sib_cnn",
                   help=f"built-in ({', '.join(BUILTIN)}), a torchvision or a timm model name; random init "
                        "unless --pretrained")
    g.add_argument("--pretrained", default=None, metavar="SPEC",
                   help="start from these weights: a file (a state dict, or a checkpoint holding one, e.g. a "
                        "sib-train checkpoint.pt), or for a torchvision --arch its weights' name (IMAGENET1K_V2, "
                        "DEFAULT), for a timm --arch a pretrained tag (or 'default'), read from the library's "
                        "local cache only (nothing is downloaded); a classifier for another number of classes is "
                        "re-initialised")
    g.add_argument("--image-size", type=int, default=None, help="input side (default 64 synthetic, 224 folder)")
    g.add_argument("--num-classes", type=int, default=len(CLASSES), help="synthetic: number of shape classes (2-6)")
    g.add_argument("--train-samples", type=int, default=None,
                   help="synthetic: training images (default 2048); a folder: use a fixed random subset of this "
                        "many (default 0: all)")
    g.add_argument("--val-samples", type=int, default=None,
                   help="like --train-samples, for validation (default 256 synthetic, all of a folder)")
    g.add_argument("--spurious", type=float, default=0.0,
                   help="synthetic: probability that a training image's background encodes its label (0-1)")
    g.add_argument("--workers", type=int, default=None,
                   help="data-loading processes per GPU/process (default 0 synthetic, min(8, cores) folder)")
    g.add_argument("--max-bad-images", type=int, default=DEFAULT_MAX_BAD_IMAGES,
                   help="a folder: skip unreadable image files (each named once, counted in metrics.jsonl) and "
                        "stop when there are more than this many (0: stop at the first)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=4)
    g.add_argument("--batch-size", type=int, default=32, help="images per step per process (>= 2)")
    g.add_argument("--lr", type=float, default=None,
                   help="AdamW learning rate (default: the paper's 1e-4; 2e-3 with --data synthetic and no "
                        "--pretrained, where a small CNN learns from scratch in minutes)")
    g.add_argument("--lr-schedule", default="constant", choices=schedule.SCHEDULES,
                   help="the rate at each step: --lr throughout (the paper), half a cosine down to 0 at the end, "
                        "or --lr times --lr-gamma at each of --lr-step-epochs")
    g.add_argument("--warmup-epochs", type=float, default=0.0, metavar="E",
                   help="ramp the rate up linearly over the first E epochs (fractions allowed), any schedule")
    g.add_argument("--lr-step-epochs", default=None, metavar="E1,E2,...",
                   help="--lr-schedule step: the milestones in epochs, fractions allowed (default: 1/3 and 2/3 "
                        "of --epochs)")
    g.add_argument("--lr-gamma", type=float, default=None,
                   help=f"--lr-schedule step: the factor at each milestone (default {schedule.DEFAULT_GAMMA:g})")
    g.add_argument("--label-smoothing", type=float, default=0.0,
                   help="label smoothing of the cross-entropy term, in [0, 1)")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (the paper's 1e-4)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-nonfinite", type=int, default=5,
                   help="stop after this many non-finite losses in a row (each one skips its step)")
    g = p.add_argument_group("S-IB loss")
    g.add_argument("--no-sib", action="store_true", help="plain cross-entropy baseline, everything else the same")
    g.add_argument("--lambda-fg", type=float, default=0.01)
    g.add_argument("--lambda-bg", type=float, default=1000.0)
    g.add_argument("--window-size", type=int, default=None, help="odd box window (default scaled: 31 at 224)")
    g.add_argument("--temperature", type=float, default=0.1)
    g.add_argument("--slope", type=float, default=10.0)
    g.add_argument("--hsic-features", type=int, default=None, metavar="F",
                   help="random-feature HSIC (the authors' hsic_rand_feat, e.g. 512): the masked maps projected "
                        "to F dimensions by a Gaussian matrix drawn anew at every step, never stored "
                        "(docs/random_features.md); default: the exact HSIC")
    g.add_argument("--backend", default="auto", choices=BACKEND_NAMES + ("auto",), help="S-IB head backend")
    g.add_argument("--vjp", default="exact", choices=VJP_MODES,
                   help="exact: double backward (the paper); finite_difference: first-order passes only "
                        "(works with --compile and fused attention, less memory)")
    g.add_argument("--fd-eps", type=float, default=None,
                   help="finite_difference: relative step, ||eps*g|| = FD_EPS*||x|| (default 1e-3; 1e-4 in float64; 1e-2 with --amp)")
    g.add_argument("--sib-every", type=int, default=1, metavar="K",
                   help="lazy regularization: the S-IB terms every K-th step, weighted by K; plain cross-entropy "
                        "steps between (default 1: every step)")
    g.add_argument("--sib-lazy", default="merged", choices=("merged", "separate"),
                   help="--sib-every K: the weighted terms join the K-th step's cross-entropy (merged), or take "
                        "an optimizer step of their own after it, with the learning rate and AdamW's betas "
                        "compensated by K/(K+1) as in StyleGAN2 (separate)")
    g.add_argument("--sib-batch", type=int, default=None, metavar="N",
                   help="R and the S-IB terms on the first N images of each batch, by a separate forward pass; "
                        "cross-entropy on all of them (default: the whole batch)")
    g.add_argument("--sib-bn", default="frozen", choices=SUB_BATCH_NORMS,
                   help="--sib-batch: the BatchNorm statistics of that pass: the whole batch's of the step "
                        "(frozen), its own (batch) or the running ones (running); it never updates them")
    g.add_argument("--check-vjp", action="store_true",
                   help="before training, compare the head's gradient of --vjp finite_difference with the exact "
                        "one on the first batch (cosine; warns below 0.9, e.g. for ReLU or max-pool networks)")
    g = p.add_argument_group("speed")
    g.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
    g.add_argument("--amp", default="off", choices=tuple(AMP_DTYPES), help="autocast dtype of the forward passes")
    g.add_argument("--channels-last", action="store_true")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (needs --vjp finite_difference)")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads per process (default: the idle cores, at least 1; an oversubscribed CPU "
                        "runs small ops many times slower with several threads)")
    g = p.add_argument_group("output")
    g.add_argument("--output", default=os.path.join("runs", "sib_train"),
                   help="folder for metrics.jsonl, curves.png, checkpoint.pt, config.json")
    g.add_argument("--resume", action="store_true",
                   help="continue from OUTPUT/checkpoint.pt (from the middle of an epoch too: exactly where "
                        "the interrupted run was)")
    g.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help="also write OUTPUT/checkpoint.pt every N steps within an epoch (without it: at each "
                        "epoch's end only)")
    g.add_argument("--eval-only", action="store_true",
                   help="no training: score OUTPUT/checkpoint.pt on the --data validation split, print the "
                        "val metrics and write OUTPUT/eval.json")
    return p


def _finite(name, value, minimum=None, strict=False):
    if not math.isfinite(value) or (minimum is not None and (value <= minimum if strict else value < minimum)):
        rel = ">" if strict else ">="
        raise UsageError(f"--{name} must be a finite number {rel} {minimum}, got {value}")


def validate(args: argparse.Namespace) -> None:
    """Check every argument before any work; raise UsageError with one clear line."""
    synthetic = args.data == "synthetic"
    if not synthetic:
        # the layout (ImageFolder, CUB-200-2011, Stanford Dogs, ImageNet), or one line on what is missing
        detect_format(Path(args.data), args.data_format, "train")
    elif args.data_format != "auto":
        raise UsageError(f"--data-format {args.data_format} applies to a --data folder, not to synthetic data")
        if args.spurious:
            raise UsageError("--spurious applies to --data synthetic only")
    if args.check_vjp and args.no_sib:
        raise UsageError("--check-vjp compares the two VJP modes of the S-IB loss; it has no use with --no-sib")
    if args.image_size is None:
        args.image_size = 64 if synthetic else 224
    if args.lr is None:  # fine-tuning takes the paper's rate, on synthetic data too
        args.lr = SYNTHETIC_LR if synthetic and not args.pretrained else PAPER_LR
    if args.train_samples is None:
        args.train_samples = SYNTHETIC_TRAIN_SAMPLES if synthetic else 0
    if args.val_samples is None:
        args.val_samples = SYNTHETIC_VAL_SAMPLES if synthetic else 0
    if not 8 <= args.image_size <= 4096:
        raise UsageError(f"--image-size must be between 8 and 4096, got {args.image_size}")
    if args.window_size is None:
        args.window_size = default_window(args.image_size)
    if args.window_size <= 0 or args.window_size % 2 == 0:
        raise UsageError(f"--window-size must be a positive odd integer, got {args.window_size}")
    if synthetic and not 2 <= args.num_classes <= len(CLASSES):
        raise UsageError(f"--num-classes must be between 2 and {len(CLASSES)} for synthetic data, got {args.num_classes}")
    if args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}")
    if args.batch_size < 2:
        raise UsageError(f"--batch-size must be >= 2 (the HSIC term needs two images), got {args.batch_size}")
    if args.sib_every < 1:
        raise UsageError(f"--sib-every must be >= 1, got {args.sib_every}")
    if args.sib_batch is not None and args.sib_batch < 2:
        raise UsageError(f"--sib-batch must be >= 2 (the HSIC term needs two images), got {args.sib_batch}")
    if args.no_sib and (args.sib_every != 1 or args.sib_batch is not None or args.sib_lazy != "merged"):
        raise UsageError("--sib-every, --sib-lazy and --sib-batch make the S-IB terms cheaper; they have no use "
                         "with --no-sib")
    if args.train_samples < 0 or args.val_samples < 0:
        raise UsageError("--train-samples and --val-samples must be >= 0")
    if synthetic and (args.train_samples < args.batch_size or args.val_samples < 1):
        raise UsageError(f"--train-samples ({args.train_samples}) must be >= --batch-size ({args.batch_size}) "
                         f"and --val-samples >= 1 for synthetic data")
    if not 0.0 <= args.spurious <= 1.0:
        raise UsageError(f"--spurious must be a probability in [0, 1], got {args.spurious}")
    if not (math.isfinite(args.label_smoothing) and 0.0 <= args.label_smoothing < 1.0):
        raise UsageError(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        raise UsageError(f"--checkpoint-every must be >= 1 steps, got {args.checkpoint_every}")
    if args.eval_only and args.resume:
        raise UsageError("--eval-only scores OUTPUT/checkpoint.pt without training; it has no use with --resume")
    try:
        schedule.check(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    _finite("lr", args.lr, 0.0, strict=True)
    _finite("weight-decay", args.weight_decay, 0.0)
    _finite("lambda-fg", args.lambda_fg, 0.0)
    _finite("lambda-bg", args.lambda_bg, 0.0)
    _finite("temperature", args.temperature, 0.0, strict=True)
    _finite("slope", args.slope, 0.0, strict=True)
    if args.fd_eps is not None:
        _finite("fd-eps", args.fd_eps, 0.0, strict=True)
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    if args.workers is not None and args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    if args.max_nonfinite < 1:
        raise UsageError(f"--max-nonfinite must be >= 1, got {args.max_nonfinite}")
    if args.max_bad_images < 0:
        raise UsageError(f"--max-bad-images must be >= 0, got {args.max_bad_images}")
    try:  # the loss's own checks (window too large...), before any output exists
        validation.check_hyperparameters(args.window_size, args.temperature, args.slope)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"S-IB loss (--window-size, --temperature, --slope): {exc}") from None
    if args.hsic_features is not None:
        if args.no_sib:
            raise UsageError("--hsic-features sets the S-IB loss's HSIC; it has no use with --no-sib")
        try:
            validation.check_hsic_features(args.hsic_features)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"--hsic-features: {exc}") from None
    if args.compile and args.vjp == "exact" and not args.no_sib:
        raise UsageError("--compile needs --vjp finite_difference: torch.compile does not support the double "
                         "backward of --vjp exact")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available")
    try:
        check_arch(args.arch)
        check_image_size(args.arch, args.image_size)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.pretrained is not None and not args.resume and not args.eval_only:  # else the checkpoint's weights
        pretrained.locate(args.pretrained, args.arch)
    # a named backend that cannot run here, or not at this temperature, is a bad argument ('auto' falls
    # back, with a note that the run logs: resolving it here would use up that once-only warning)
    if args.backend != "auto":
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            resolve_backend(device, args.backend, args.temperature, torch.float32)
        except (BackendUnavailableError, ValueError) as exc:
            raise UsageError(f"--backend {args.backend}: {exc}") from None
    # last, once every other argument is known good: the output folder must be writable (creates nothing)
    check_output_dir(args.output, "--output", OUTPUT_FILES)
    for flag, wanted in (("--resume", args.resume), ("--eval-only", args.eval_only)):
        if wanted and not (Path(args.output) / CHECKPOINT).is_file():
            raise UsageError(f"{flag}: no checkpoint at {Path(args.output) / CHECKPOINT}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(PROG, lambda: validate(args), lambda: run(args), stopped=(TrainingStopped,),
                       interrupted=f"interrupted; the last checkpoint (if any) is {Path(args.output) / CHECKPOINT}")


if __name__ == "__main__":
    sys.exit(main())
