"""``sib-train``: train an image classifier with the S-IB loss (also ``python -m sib_fast.train``).

With no arguments it trains the small built-in CNN on the embedded ``SyntheticObjects`` data
on CPU (a few minutes on two cores) and prints a summary. ``--data PATH`` takes an ImageFolder
root with ``train/`` and ``val/`` (the ImageNet layout); ``torchrun`` runs it on several GPUs or
nodes (DDP). Each epoch appends a line to ``OUTPUT/metrics.jsonl``, redraws
``OUTPUT/curves.png`` and writes ``OUTPUT/checkpoint.pt`` atomically; ``--resume`` continues
from it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, Subset

from sib_fast.training.checkpoint import TRAIN_KEYS, load_checkpoint, save_checkpoint
from sib_fast.cli_errors import (OutputError, UsageError, atomic_write, atomic_write_text, check_output_dir, os_reason,
                                 remove_stale_temporaries)
from sib_fast.training.data import (CLASSES, DEFAULT_MAX_BAD_IMAGES, SkipBadImages, SyntheticObjects, read_image,
                           skip_bad_collate)
from sib_fast.backends.dispatch import BACKEND_NAMES, BackendUnavailableError, resolve_backend
from sib_fast.loss import SIBLoss
from sib_fast.training.models import BUILTIN, build_model, check_arch
from sib_fast.training.step import (VJP_MODES, DoubleBackwardUnsupportedError, non_smooth_layers, sib_backward,
                                    vjp_agreement)
from sib_fast.vjp import input_vjp

PROG = "sib-train"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CURVES = "curves.png"
CONFIG = "config.json"
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}
# input normalisation, applied on the device: synthetic images are in [0, 1]; ImageNet statistics
SYNTHETIC_STATS = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
PAPER_LR = 1e-4       # AdamW, the paper's ResNet-50 setting
SYNTHETIC_LR = 2e-3   # the built-in CNN from scratch on SyntheticObjects
SYNTHETIC_TRAIN_SAMPLES = 2048  # with 4 epochs: about two minutes on 2 CPU cores
SYNTHETIC_VAL_SAMPLES = 256
OUTPUT_FILES = (CHECKPOINT, METRICS, CURVES, CONFIG)
# --resume: these define the run (its data, model, loss and sampling) and must match the checkpoint;
# the others may change (--lr, --weight-decay, --epochs, --lambda-fg/bg, --backend...): they take
# effect and the log names them
RESUME_KEYS = ("data", "arch", "image_size", "num_classes", "no_sib", "vjp", "window_size", "temperature",
               "slope", "seed", "batch_size", "train_samples", "spurious", "amp")
NOT_COMPARED = ("output", "resume")


class TrainingStopped(Exception):
    """The run cannot go on (non-finite losses, a model without double backward...): one line, status 1."""


# ----------------------------------------------------------------------------- arguments

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
                   help="'synthetic' (embedded SyntheticObjects, nothing to download) or an ImageFolder root "
                        "with train/ and val/ subfolders (the ImageNet layout)")
    g.add_argument("--arch", default="sib_cnn",
                   help=f"built-in ({', '.join(BUILTIN)}), a torchvision or a timm model name; random init")
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
                   help="AdamW learning rate (default: the paper's 1e-4; 2e-3 with --data synthetic, where a "
                        "small CNN learns from scratch in minutes)")
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
    g.add_argument("--backend", default="auto", choices=BACKEND_NAMES + ("auto",), help="S-IB head backend")
    g.add_argument("--vjp", default="exact", choices=VJP_MODES,
                   help="exact: double backward (the paper); finite_difference: first-order passes only "
                        "(works with --compile and fused attention, less memory)")
    g.add_argument("--fd-eps", type=float, default=None,
                   help="finite_difference: relative step, ||eps*g|| = FD_EPS*||x|| (default 1e-3; 1e-4 in float64; 1e-2 with --amp)")
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
    g.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint.pt")
    return p


def _finite(name, value, minimum=None, strict=False):
    if not math.isfinite(value) or (minimum is not None and (value <= minimum if strict else value < minimum)):
        rel = ">" if strict else ">="
        raise UsageError(f"--{name} must be a finite number {rel} {minimum}, got {value}")


def validate(args: argparse.Namespace) -> None:
    """Check every argument before any work; raise UsageError with one clear line."""
    synthetic = args.data == "synthetic"
    if not synthetic:
        root = Path(args.data)
        if not root.is_dir():
            raise UsageError(f"--data {args.data!r}: no such folder (use 'synthetic' or an ImageFolder root "
                             "with train/ and val/)")
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise UsageError(f"--data {args.data!r} has no {split}/ subfolder (expected the ImageNet layout: "
                                 "ROOT/train/CLASS/*.jpeg and ROOT/val/CLASS/*.jpeg)")
        if args.spurious:
            raise UsageError("--spurious applies to --data synthetic only")
    if args.check_vjp and args.no_sib:
        raise UsageError("--check-vjp compares the two VJP modes of the S-IB loss; it has no use with --no-sib")
    if args.image_size is None:
        args.image_size = 64 if synthetic else 224
    if args.lr is None:
        args.lr = SYNTHETIC_LR if synthetic else PAPER_LR
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
    if args.train_samples < 0 or args.val_samples < 0:
        raise UsageError("--train-samples and --val-samples must be >= 0")
    if synthetic and (args.train_samples < args.batch_size or args.val_samples < 1):
        raise UsageError(f"--train-samples ({args.train_samples}) must be >= --batch-size ({args.batch_size}) "
                         f"and --val-samples >= 1 for synthetic data")
    if not 0.0 <= args.spurious <= 1.0:
        raise UsageError(f"--spurious must be a probability in [0, 1], got {args.spurious}")
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
    from sib_fast.validation import check_hyperparameters
    try:  # the loss's own checks (window too large...), before any output exists
        check_hyperparameters(args.window_size, args.temperature, args.slope)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"S-IB loss (--window-size, --temperature, --slope): {exc}") from None
    if args.compile and args.vjp == "exact" and not args.no_sib:
        raise UsageError("--compile needs --vjp finite_difference: torch.compile does not support the double "
                         "backward of --vjp exact")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available")
    try:
        check_arch(args.arch)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
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
    if args.resume and not (Path(args.output) / CHECKPOINT).is_file():
        raise UsageError(f"--resume: no checkpoint at {Path(args.output) / CHECKPOINT}")


def read_resume_checkpoint(args) -> dict:
    """``OUTPUT/checkpoint.pt`` for --resume, checked against the arguments (one line, exit 2 if not usable)."""
    path = Path(args.output) / CHECKPOINT
    ckpt = load_checkpoint(path, TRAIN_KEYS)
    old = ckpt["args"]
    fixed = [k for k in RESUME_KEYS if k in old and old[k] != getattr(args, k)]
    if fixed:
        raise UsageError(f"--resume: {path} was written with different " + ", ".join(
            f"--{k.replace('_', '-')} ({old[k]!r}, now {getattr(args, k)!r})" for k in fixed)
            + "; these cannot change within a run: use a new --output")
    ckpt["changed"] = [(k, old[k], v) for k, v in vars(args).items()
                       if k not in RESUME_KEYS and k not in NOT_COMPARED and k in old and old[k] != v]
    ckpt["records"] = read_metrics(Path(args.output) / METRICS)
    return ckpt


# ----------------------------------------------------------------------------- distributed

class Dist:
    """torchrun's environment (DDP over env://), or a single process."""

    def __init__(self, device_arg: str | None):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() if device_arg is None else device_arg == "cuda"
        if use_cuda:
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        self.enabled = self.world > 1
        if self.enabled and not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        return self.sum([float(flag)])[0] > 0

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- data

def _subset(dataset, n: int, seed: int):
    if n <= 0 or n >= len(dataset):
        return dataset
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    return Subset(dataset, sorted(idx.tolist()))


def make_datasets(args, cache: bool = False):
    """(train, val, num_classes, normalisation stats, has_masks)."""
    if args.data == "synthetic":
        kw = dict(image_size=args.image_size, num_classes=args.num_classes, seed=args.seed, cache=cache)
        train = SyntheticObjects("train", length=args.train_samples, spurious=args.spurious, **kw)
        val = SyntheticObjects("val", length=args.val_samples, **kw)
        return train, val, args.num_classes, SYNTHETIC_STATS, True
    try:
        from torchvision import datasets, transforms
    except ImportError:
        raise TrainingStopped("--data PATH needs torchvision: pip install torchvision") from None
    size = args.image_size
    train_tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor()])
    val_tf = transforms.Compose([transforms.Resize(round(size * 256 / 224)), transforms.CenterCrop(size),
                                 transforms.ToTensor()])
    root = Path(args.data)
    try:
        # read_image names the file it cannot decode; SkipBadImages skips it (in the workers too)
        train = datasets.ImageFolder(str(root / "train"), train_tf, loader=read_image)
        val = datasets.ImageFolder(str(root / "val"), val_tf, loader=read_image)
    except (FileNotFoundError, RuntimeError, OSError) as exc:
        raise UsageError(f"--data {args.data!r}: {exc}") from None
    if train.classes != val.classes:
        raise UsageError(f"--data {args.data!r}: train/ and val/ have different class folders")
    return (SkipBadImages(_subset(train, args.train_samples, args.seed)),
            SkipBadImages(_subset(val, args.val_samples, args.seed + 1)), len(train.classes), IMAGENET_STATS, False)


def cpu_threads(requested: int | None, world: int) -> tuple[int, str]:
    """Threads per process on CPU: ``requested``, else the idle cores (1-minute load average)."""
    if requested is not None:
        return requested, f"; {requested} CPU thread(s)"
    cores = os.cpu_count() or 1
    per_process = max(1, cores // max(1, world))
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    threads = max(1, min(per_process, int(cores - load + 0.5)))
    busy = f", the CPU is busy: load {load:.1f} on {cores} cores" if threads < per_process else ""
    return threads, f"; {threads} CPU thread(s){busy}"


def _shard(dataset, d: Dist):
    return Subset(dataset, range(d.rank, len(dataset), d.world)) if d.enabled else dataset


# ----------------------------------------------------------------------------- checkpoints and logs

def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)      # DDP
    return getattr(model, "_orig_mod", model)    # torch.compile


def weights_finite(model: nn.Module) -> bool:
    tensors = [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def read_metrics(path: Path) -> list[dict]:
    """The records of metrics.jsonl; a damaged line is a UsageError (resuming would drop it from the file)."""
    if not path.exists():
        return []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--resume: cannot read {path}: {exc}") from None
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            r = None
        if not isinstance(r, dict) or not isinstance(r.get("epoch"), int):
            raise UsageError(f"--resume: {path} line {n} is not a metrics record; repair or remove that line")
        records.append(r)
    return records


def write_metrics(path: Path, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records), what="metrics")


def plot_curves(records: list[dict], path: Path) -> None:
    """curves.png: one panel per metric, x = epoch (matplotlib without pyplot: no GUI backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [("cross-entropy", [("train_ce", "train")]),
              ("accuracy", [("train_acc", "train"), ("val_acc", "val")]),
              ("HSIC (higher: R follows the object)", [("train_hsic", "train"), ("val_hsic", "val")]),
              ("background variance BG", [("train_bg", "train"), ("val_bg", "val")]),
              ("saliency mass on the object", [("val_fg_fraction", "val"), ("val_fg_area", "object area")]),
              ("throughput (images/s)", [("images_per_s", "train")])]
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(13, 7))  # no constrained layout: it costs seconds on a busy CPU
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.08, top=0.9, wspace=0.25, hspace=0.4)
    FigureCanvasAgg(fig)
    epochs = [r["epoch"] for r in records]
    for i, (title, series) in enumerate(panels):
        ax = fig.add_subplot(2, 3, i + 1)
        for key, label in series:
            pts = [(e, r[key]) for e, r in zip(epochs, records) if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        if title.startswith("background"):
            if any(r.get("train_bg") or r.get("val_bg") for r in records):
                ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(f"sib-train: {records[-1].get('run', '')}" if records else "sib-train")
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90), what="plot")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model, loader, d: Dist, normalize, criterion, amp_dtype, channels_last, saliency_batches=2,
             on_bad=lambda bad: None):
    """Validation accuracy, and on the first batches the S-IB statistics of R (and, with masks,
    the fraction of |R| that falls on the object). ``on_bad`` gets each batch's skipped files."""
    was_training = model.training
    model.eval()
    correct = total = 0
    hsic_sum = bg_sum = n_sal = fg_sum = area_sum = n_fg = 0.0
    autocast = (torch.autocast(d.device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    for i, (x, y, mask, bad) in enumerate(loader):
        on_bad(bad)
        if x is None:  # every image of the batch was unreadable
            continue
        x, y = normalize(x.to(d.device, non_blocking=True)), y.to(d.device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if i < saliency_batches and x.shape[0] >= 2:
            with torch.enable_grad():
                xg = x.detach().requires_grad_(True)
                with autocast:
                    logits = model(xg)
                R = input_vjp(logits, xg, create_graph=False).float()
            terms = criterion_terms(criterion, R, x)
            hsic_sum += float(terms.hsic) * x.shape[0]
            bg_sum += float(terms.bg) * x.shape[0]
            n_sal += x.shape[0]
            if mask is not None:
                mask = mask.to(d.device).flatten(1)
                sal = R.abs().sum(dim=1).flatten(1)
                fg_sum += float((sal * mask).sum(1).div(sal.sum(1).clamp_min(1e-30)).sum())
                area_sum += float(mask.mean(1).sum())
                n_fg += x.shape[0]
        else:
            with autocast:
                logits = model(x)
        correct += int((logits.argmax(1) == y).sum())
        total += x.shape[0]
    correct, total, hsic_sum, bg_sum, n_sal, fg_sum, area_sum, n_fg = d.sum(
        [correct, total, hsic_sum, bg_sum, n_sal, fg_sum, area_sum, n_fg])
    model.train(was_training)
    return dict(val_acc=correct / max(total, 1),
                val_hsic=hsic_sum / n_sal if n_sal else None, val_bg=bg_sum / n_sal if n_sal else None,
                val_fg_fraction=fg_sum / n_fg if n_fg else None, val_fg_area=area_sum / n_fg if n_fg else None)


def criterion_terms(criterion: SIBLoss, R, x):
    from sib_fast.functional import sib_terms
    return sib_terms(R, x.to(R.dtype), window_size=criterion.window_size, temperature=criterion.temperature,
                     slope=criterion.slope, backend=criterion.backend)


# ----------------------------------------------------------------------------- training

def _nonfinite_cause(args, last: dict) -> str:
    if not last.get("input_finite", True):
        return "the input batch holds NaN/Inf values: check the data"
    if args.amp == "fp16":
        return "float16 overflow: try --amp bf16 or --amp off"
    if not last.get("weights_finite", True) or not math.isfinite(last.get("ce", 0.0)):
        return f"the network diverged (the cross-entropy is not finite): lower --lr (now {args.lr:g})"
    if not (math.isfinite(last.get("hsic", 0.0)) and math.isfinite(last.get("bg", 0.0))):
        return "the S-IB head is not finite: R overflowed; lower --lr or check the model's output scale"
    if not math.isfinite(last.get("loss", 0.0)):
        return f"exp(BG) overflowed: lower --lambda-bg (now {args.lambda_bg:g}) or --lr"
    return f"the gradient is not finite: lower --lr (now {args.lr:g})"


def run(args, resume_state: dict | None = None) -> dict:
    """Train; ``resume_state``: ``read_resume_checkpoint(args)`` (read here when None and --resume)."""
    if args.resume and resume_state is None:
        resume_state = read_resume_checkpoint(args)
    d = Dist(args.device)
    out = Path(args.output)
    log = print if d.main else (lambda *a, **k: None)
    t_start = time.time()
    try:
        return _run(args, d, out, log, t_start, resume_state)
    finally:
        d.close()


class BadImages:
    """Unreadable image files met so far (path -> reason), named once each on the main process and
    merged over the ranks at each epoch's end; ``total`` counts them over every rank."""

    def __init__(self, d: Dist, log, known: dict | None = None):
        self.d = d
        self.known = dict(known or {})
        self.warned = set(self.known)        # a resumed run named these already
        self.epoch_new: dict = {}            # this rank, this epoch
        self.total = len(self.known)         # all ranks
        self.pending = 0                     # this rank's new ones since the last count
        self.write = log
        self.saved_epoch = 0                 # the epoch of checkpoint.pt, for the message that stops the run

    def note(self, bad) -> None:
        for path, reason in bad:
            if path in self.known:
                continue
            self.known[path] = self.epoch_new[path] = reason
            self.pending += 1
            if self.d.main:
                self.warn(path, reason)

    def warn(self, path, reason) -> None:
        self.warned.add(path)
        self.write(f"{PROG}: warning: skipped unreadable image {path} ({reason})")

    def merge(self) -> list[str]:
        """At an epoch's end: every rank's new files; returns them sorted (for metrics.jsonl)."""
        new = dict(self.epoch_new)
        if self.d.enabled:
            gathered = [None] * self.d.world
            dist.all_gather_object(gathered, self.epoch_new)
            for g in gathered:
                new.update(g)
        for path, reason in new.items():
            self.known.setdefault(path, reason)
            if self.d.main and path not in self.warned:
                self.warn(path, reason)
        self.epoch_new, self.pending, self.total = {}, 0, len(self.known)
        return sorted(new)

    def check(self, limit: int) -> None:
        if self.total <= limit:
            return
        names = sorted(self.known)
        if self.d.enabled:  # every rank gets here at the same step: the count is a sum over ranks
            gathered = [None] * self.d.world
            dist.all_gather_object(gathered, names)
            names = sorted(set().union(*gathered))
        shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        kept = f"; the checkpoint of epoch {self.saved_epoch} is intact" if self.saved_epoch else ""
        raise TrainingStopped(f"{self.total} unreadable image files in --data, more than --max-bad-images {limit}: "
                              f"{shown}; repair or remove them (or raise --max-bad-images){kept}")


def _run(args, d: Dist, out: Path, log, t_start: float, resume_state: dict | None) -> dict:
    torch.manual_seed(args.seed)
    threads_note = ""
    if d.device.type == "cpu":
        threads, threads_note = cpu_threads(args.threads, d.world)
        torch.set_num_threads(threads)
    amp_dtype = AMP_DTYPES[args.amp]
    # the S-IB head backend: resolve once, so that a missing one is one line and the fallback a note
    notes = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:  # R is float32 here, under --amp too
            backend = resolve_backend(d.device, args.backend, args.temperature, torch.float32)
        except (BackendUnavailableError, ValueError) as exc:
            raise UsageError(str(exc)) from None
    notes += [str(w.message).removeprefix("sib_fast: ") for w in caught]

    workers = args.workers
    if workers is None:
        workers = 0 if args.data == "synthetic" else min(8, max(1, (os.cpu_count() or 1) // max(1, d.world)))
    # synthetic images are rendered once and kept (about 50 KB each at 64px) when loading in-process
    train_set, val_set, num_classes, stats, _ = make_datasets(args, cache=workers == 0)
    mean = torch.tensor(stats[0], device=d.device).view(1, -1, 1, 1)
    std = torch.tensor(stats[1], device=d.device).view(1, -1, 1, 1)

    def normalize(x):
        return (x.float() - mean) / std

    loader_gen = torch.Generator()
    if d.enabled:
        from torch.utils.data.distributed import DistributedSampler
        sampler = DistributedSampler(train_set, num_replicas=d.world, rank=d.rank, shuffle=True,
                                     seed=args.seed, drop_last=True)
    else:
        sampler = RandomSampler(train_set, generator=loader_gen)
    pin = d.device.type == "cuda"
    # skip_bad_collate: (x, y, mask or None, skipped files); the files travel with the batch from the workers
    train_loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, num_workers=workers,
                              drop_last=True, pin_memory=pin, generator=loader_gen, collate_fn=skip_bad_collate)
    val_loader = DataLoader(_shard(val_set, d), batch_size=args.batch_size, shuffle=False,
                            num_workers=workers, pin_memory=pin, collate_fn=skip_bad_collate)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise TrainingStopped(f"the training set ({len(train_set)} images over {d.world} processes) is smaller "
                              f"than one batch of {args.batch_size}")

    model = build_model(args.arch, num_classes, args.image_size).to(d.device)
    raw_model = model
    if d.main:  # only now: a bad argument or input leaves no folder behind
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot make the output folder {out}: {os_reason(exc)}") from None
        for f in remove_stale_temporaries(out, OUTPUT_FILES):
            notes.append(f"removed {f.name}, a temporary file left by a process that was killed while writing")
    kinks = non_smooth_layers(model) if args.vjp == "finite_difference" and not args.no_sib else []
    if kinks:
        notes.append(f"{args.arch} has {', '.join(kinks)} layers: finite differences do not follow the exact "
                     "gradient across their kinks (README, 'The two VJP modes'); --check-vjp measures how far")
    if args.amp != "off" and not args.no_sib:
        notes.append(f"--amp {args.amp}: R carries half-precision rounding, and the S-IB gradient falls on the few "
                     "pixels of R's quantile ranks, which that noise reorders: the head's gradient direction is "
                     "largely noise (README, 'Precision'); use --amp off where it matters")
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    torch.manual_seed(args.seed + 1 + d.rank)  # dropout etc. differ between ranks
    optimizer = torch.optim.AdamW(raw_model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(d.device.type, enabled=args.amp == "fp16")
    criterion = SIBLoss(lambda_fg=args.lambda_fg, lambda_bg=args.lambda_bg, window_size=args.window_size,
                        temperature=args.temperature, slope=args.slope, backend=backend)

    start_epoch, step, records = 0, 0, []
    nonfinite_total = 0
    ckpt_path = out / CHECKPOINT
    changed_line = ""
    bad_images = BadImages(d, log)
    if args.resume:
        ckpt = resume_state
        try:
            raw_model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scaler.load_state_dict(ckpt["scaler"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UsageError(f"--resume: {ckpt_path} does not fit this model and optimizer: {first[:300]}") from None
        # the optimizer state brings the old learning rate and weight decay back: the arguments win
        for group in optimizer.param_groups:
            group["lr"], group["weight_decay"] = args.lr, args.weight_decay
        if ckpt["changed"]:
            changed_line = "; changed: " + ", ".join(f"--{k.replace('_', '-')} {a!r} -> {b!r}"
                                                     for k, a, b in ckpt["changed"])
        start_epoch, step = int(ckpt["epoch"]), int(ckpt["step"])
        nonfinite_total = int(ckpt.get("nonfinite_total", 0))
        bad_images = BadImages(d, log, ckpt.get("bad_images"))
        bad_images.saved_epoch = int(ckpt["epoch"])
        set_rng_state(ckpt["rng"][min(d.rank, len(ckpt["rng"]) - 1)], d.device)
        records = [r for r in ckpt["records"] if r["epoch"] <= start_epoch]
        if start_epoch >= args.epochs:
            log(f"{PROG}: the checkpoint already has {start_epoch} epoch(s) (--epochs {args.epochs}); nothing to do")

    if args.compile:
        model = torch.compile(model)
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)

    if d.main:
        atomic_write_text(out / CONFIG, json.dumps(vars(args), indent=2) + "\n", what="config")
    mode = "CE only (--no-sib)" if args.no_sib else f"S-IB, vjp={args.vjp}, head backend={backend}"
    run_name = f"{args.arch} on {'SyntheticObjects' if args.data == 'synthetic' else args.data}, {mode}"
    log(f"{PROG}: {run_name}; {len(train_set)} train / {len(val_set)} val images of {args.image_size}px, "
        f"{num_classes} classes; batch {args.batch_size} x {d.world} process(es) on {d.device.type}; "
        f"window {args.window_size}; lr {args.lr:g}; amp {args.amp}{threads_note}; output {out}")
    for note in notes:
        log(f"{PROG}: note: {note}")
    if args.resume:
        log(f"{PROG}: resuming after epoch {start_epoch} (step {step}){changed_line}")

    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        tqdm = None

    if args.check_vjp and d.main:
        log(_vjp_check_line(raw_model, train_loader, normalize, criterion, args, amp_dtype, d.device))

    params = [p for p in raw_model.parameters() if p.requires_grad]
    # a skipped step must not leave its batch in the running statistics either (NaN inputs would)
    buffers = [b for b in raw_model.buffers() if b.is_floating_point() or b.dtype == torch.long]
    consecutive = 0
    last_record = records[-1] if records else None
    for epoch in range(start_epoch, args.epochs):
        model.train()
        loader_gen.manual_seed(args.seed * 100_003 + epoch)
        if d.enabled:
            sampler.set_epoch(epoch)
        if d.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d.device)
        sums = dict(loss=0.0, ce=0.0, hsic=0.0, bg=0.0, correct=0.0, seen=0.0, steps=0.0)
        skipped = 0
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{args.epochs}", unit="step", leave=False,
                   disable=None if d.main else True, dynamic_ncols=True) if tqdm else None
        t0 = time.time()
        images = 0
        if bar is not None and not bar.disable:
            bad_images.write = bar.write  # a warning line above the bar, not through it
        for x, y, _, bad_files in train_loader:
            bad_images.note(bad_files)
            usable = x is not None and x.shape[0] >= 2  # the HSIC term needs two images
            # every rank must agree to skip (DDP's backward is collective); one all-reduce for both counts
            new_bad, unusable = d.sum([float(bad_images.pending), float(not usable)])
            bad_images.total += int(new_bad)
            bad_images.pending = 0
            bad_images.check(args.max_bad_images)
            if unusable:
                step += 1
                if bar is not None:
                    bar.update(1)
                continue
            x = normalize(x.to(d.device, non_blocking=True))
            y = y.to(d.device, non_blocking=True)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            optimizer.zero_grad(set_to_none=True)
            saved_buffers = [b.detach().clone() for b in buffers]
            try:
                if args.no_sib:
                    with (torch.autocast(d.device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()):
                        logits = model(x)
                    ce = F.cross_entropy(logits.float(), y)
                    scaler.scale(ce).backward()
                    parts = [ce.detach(), ce.detach(), torch.full_like(ce, math.nan), torch.full_like(ce, math.nan)]
                    logits = logits.detach()
                else:
                    st = sib_backward(model, x, y, criterion, vjp=args.vjp, fd_eps=args.fd_eps,
                                      autocast_dtype=amp_dtype, grad_scaler=scaler)
                    parts, logits = [st.loss, st.ce, st.hsic, st.bg], st.logits
            except DoubleBackwardUnsupportedError as exc:
                raise TrainingStopped(str(exc).replace("vjp='finite_difference' (sib-train: --vjp finite_difference)",
                                                       "--vjp finite_difference")) from None
            grads = [p.grad for p in params if p.grad is not None]
            gnorm = torch.nn.utils.get_total_norm(grads) if grads and not scaler.is_enabled() else torch.zeros(())
            vals = torch.stack([*(t.detach().double().reshape(()).cpu() for t in parts),
                                (logits.argmax(1) == y).sum().double().cpu(), gnorm.double().cpu(),
                                torch.isfinite(x).all().double().cpu()]).tolist()
            loss_v, ce_v, hsic_v, bg_v, correct, gnorm_v, input_ok = vals
            bad = not (math.isfinite(loss_v) and math.isfinite(gnorm_v))
            if d.any(bad):
                optimizer.zero_grad(set_to_none=True)
                for b, v in zip(buffers, saved_buffers):
                    b.data.copy_(v)
                if scaler.is_enabled():
                    scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
                skipped += 1
                nonfinite_total += 1
                consecutive += 1
                last = dict(loss=loss_v, ce=ce_v, hsic=hsic_v if not args.no_sib else 0.0,
                            bg=bg_v if not args.no_sib else 0.0, input_finite=bool(input_ok),
                            weights_finite=weights_finite(raw_model))
                if consecutive >= args.max_nonfinite:
                    if bar is not None:
                        bar.close()
                    raise TrainingStopped(
                        f"stopped at epoch {epoch + 1}, step {step + 1}: {consecutive} non-finite losses in a row "
                        f"({nonfinite_total} in all); likely cause: {_nonfinite_cause(args, last)}")
            else:
                consecutive = 0
                scaler.step(optimizer)
                scaler.update()
                n = x.shape[0]
                for k, v in (("loss", loss_v), ("ce", ce_v), ("hsic", hsic_v), ("bg", bg_v)):
                    sums[k] += v * n
                sums["correct"] += correct
                sums["seen"] += n
                sums["steps"] += 1
            step += 1
            images += x.shape[0] * d.world
            if bar is not None:
                rate = images / max(time.time() - t0, 1e-9)
                post = {"ce": f"{ce_v:.3f}", "img/s": f"{rate:.1f}"}
                if not args.no_sib:
                    post.update(hsic=f"{hsic_v:.3f}", bg=f"{bg_v:.2e}")
                if skipped:
                    post["skipped"] = skipped
                bar.set_postfix(post, refresh=False)
                bar.update(1)
        if bar is not None:
            bar.close()
        bad_images.write = log
        train_time = time.time() - t0
        agg = d.sum([sums[k] for k in ("loss", "ce", "hsic", "bg", "correct", "seen")])
        seen = max(agg[5], 1.0)
        evals = evaluate(model.module if d.enabled else model, val_loader, d, normalize, criterion, amp_dtype,
                         args.channels_last, on_bad=bad_images.note)
        bad_before = len(bad_images.known) - len(bad_images.epoch_new)
        new_bad_files = bad_images.merge()
        bad_images.check(args.max_bad_images)
        if agg[5] == 0:
            raise TrainingStopped(f"epoch {epoch + 1} trained on no batch: the images of --data {args.data} are "
                                  f"unreadable ({bad_images.total} skipped so far)")
        in_sync = None
        if d.enabled:  # parameters must be identical on every rank
            checksum = float(sum(p.detach().double().sum() for p in raw_model.parameters()))
            gathered = [None] * d.world
            dist.all_gather_object(gathered, checksum)
            in_sync = all(c == gathered[0] for c in gathered)
        record = dict(
            epoch=epoch + 1, step=step, run=run_name,
            train_loss=agg[0] / seen, train_ce=agg[1] / seen,
            train_hsic=None if args.no_sib else agg[2] / seen, train_bg=None if args.no_sib else agg[3] / seen,
            train_acc=agg[4] / seen, **evals,
            images_per_s=images / max(train_time, 1e-9), epoch_time_s=train_time,
            peak_mem_mb=peak_memory_mb(d.device), peak_mem_kind="cuda_allocated" if d.device.type == "cuda" else "cpu_rss",
            nonfinite_skipped=skipped, bad_images=len(bad_images.known) - bad_before,
            bad_images_total=len(bad_images.known), bad_image_files=new_bad_files, world_size=d.world, vjp=None if args.no_sib else args.vjp,
            backend=None if args.no_sib else backend, amp=args.amp)
        if in_sync is not None:
            record["ranks_in_sync"] = in_sync
        records.append(record)
        last_record = record
        if d.main:
            write_metrics(out / METRICS, records)
            plot_curves(records, out / CURVES)
            log(_epoch_line(record, args))
            if in_sync is False:
                log(f"{PROG}: warning: the parameters differ between ranks after epoch {epoch + 1}")
        finite = weights_finite(raw_model)
        if not finite:
            raise TrainingStopped(f"the weights are not finite after epoch {epoch + 1}; no checkpoint written; "
                                  f"lower --lr (now {args.lr:g})")
        rngs = [rng_state(d.device)]
        if d.enabled:
            rngs = [None] * d.world
            dist.all_gather_object(rngs, rng_state(d.device))
        if d.main:
            save_checkpoint(ckpt_path, dict(
                format=1, model=raw_model.state_dict(), optimizer=optimizer.state_dict(),
                scaler=scaler.state_dict(), epoch=epoch + 1, step=step, rng=rngs,
                nonfinite_total=nonfinite_total, bad_images=bad_images.known, args=vars(args)))
        bad_images.saved_epoch = epoch + 1
        if d.enabled:
            dist.barrier()

    summary = dict(epochs=args.epochs, steps=step, seconds=time.time() - t_start, num_classes=num_classes,
                   nonfinite_skipped=nonfinite_total, final=last_record, output=str(out))
    if d.main:
        log(_summary(summary, args))
    return summary


def _vjp_check_line(model, loader, normalize, criterion, args, amp_dtype, device) -> str:
    """--check-vjp: the cosine of the two VJP modes' head gradients on the first batch, as a log line."""
    x, y, _, _ = next(iter(loader))
    if x is None or x.shape[0] < 2:
        return f"{PROG}: --check-vjp: the first batch has fewer than two readable images; nothing to compare"
    x = normalize(x.to(device))
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    try:
        cos = vjp_agreement(model, x, y.to(device), criterion, fd_eps=args.fd_eps, autocast_dtype=amp_dtype)
    except DoubleBackwardUnsupportedError as exc:
        return f"{PROG}: --check-vjp: the exact mode cannot run on this model ({exc.__cause__}); nothing to compare"
    line = (f"{PROG}: --check-vjp: finite-difference vs exact head gradient on the first batch: "
            f"cosine {cos:.5f}")
    if not cos >= 0.9:
        line += ("; warning: the two modes disagree. Finite differences need a smooth network: ReLUs or max "
                 "pooling add jumps that the double backward does not see (use --vjp exact for such models, "
                 "the paper's semantics); under --amp the head gradient is noisy in both modes; a smaller "
                 "--fd-eps helps only a smooth network")
    return line


def _fmt(v, spec=".3f"):
    return "n/a" if v is None else format(v, spec)


def _epoch_line(r: dict, args) -> str:
    s = (f"epoch {r['epoch']}/{args.epochs}: train CE {_fmt(r['train_ce'])} acc {_fmt(r['train_acc'])} | "
         f"val acc {_fmt(r['val_acc'])}")
    if r.get("train_hsic") is not None:
        s += f" | HSIC {_fmt(r['train_hsic'])} BG {_fmt(r['train_bg'], '.2e')}"
    if r.get("val_fg_fraction") is not None:
        s += f" | saliency on object {_fmt(r['val_fg_fraction'])}"
    s += f" | {r['images_per_s']:.1f} img/s, {r['epoch_time_s']:.0f}s"
    if r["nonfinite_skipped"]:
        s += f" | {r['nonfinite_skipped']} non-finite step(s) skipped"
    if r.get("bad_images"):
        s += f" | {r['bad_images']} unreadable image(s) skipped"
    return s


def _summary(s: dict, args) -> str:
    r = s["final"] or {}
    m, sec = divmod(int(round(s["seconds"])), 60)
    lines = [f"{PROG}: done in {m}m{sec:02d}s, {s['epochs']} epoch(s), {s['steps']} steps"]
    if r:
        lines.append(f"  val accuracy {_fmt(r.get('val_acc'))} (train {_fmt(r.get('train_acc'))}, chance "
                     f"{1 / s['num_classes']:.3f}), "
                     f"train CE {_fmt(r.get('train_ce'))}, {r.get('images_per_s', 0):.1f} images/s")
        if r.get("val_hsic") is not None:
            lines.append(f"  val HSIC {_fmt(r.get('val_hsic'))}, BG {_fmt(r.get('val_bg'), '.2e')}"
                         + (f", saliency mass on the object {_fmt(r.get('val_fg_fraction'))} "
                            f"(object area {_fmt(r.get('val_fg_area'))})" if r.get("val_fg_fraction") is not None else ""))
    lines.append(f"  non-finite steps skipped: {s['nonfinite_skipped']}")
    out = Path(s["output"])
    lines.append(f"  wrote {out / METRICS}, {out / CURVES}, {out / CHECKPOINT}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        try:
            validate(args)
        except (ValueError, TypeError) as exc:  # a check deeper down (sib_fast.validation...) refused a value
            raise UsageError(str(exc)) from None
        resume_state = read_resume_checkpoint(args) if args.resume else None
        run(args, resume_state)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except (TrainingStopped, OutputError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # any other read or write fault: what and where, in one line
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the last checkpoint (if any) is {Path(args.output) / CHECKPOINT}",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
