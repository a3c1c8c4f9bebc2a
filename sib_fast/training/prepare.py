"""The first phases of a ``sib-train`` run: ``setup`` builds what it needs (seeds, threads, head
backend, data loaders, model and its ``--pretrained`` weights, optimizer, learning-rate schedule,
output folder), ``resume`` restores a checkpoint into it (one written at an epoch's end or, by
``--checkpoint-every``, in the middle of one), ``start`` wraps the model (compile, DDP) and writes
the opening lines. ``RunState`` carries it all to the epochs (``sib_fast.training.loop``)."""
from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from sib_fast.backends.dispatch import BackendUnavailableError, backend_choice, resolve_backend
from sib_fast.cli_errors import OutputError, UsageError, atomic_write_text, os_reason, remove_stale_temporaries
from sib_fast.loss import SIBLoss
from sib_fast.training import PROG
from sib_fast.training.checkpoint import CHECKPOINT, EVAL_KEYS, TRAIN_KEYS, load_checkpoint
from sib_fast.training.data import SYNTHETIC_STATS, SyntheticObjects, skip_bad_collate
from sib_fast.training.distributed import Dist, shard
from sib_fast.training.faults import BadImages, TrainingStopped
from sib_fast.training.history import CURVES, METRICS, read_metrics
from sib_fast.training import pretrained, schedule
from sib_fast.training.models import build_model
from sib_fast.training.resumable import ItemSeeded, SkipSampler
from sib_fast.training.step import (DoubleBackwardUnsupportedError, non_smooth_layers, rng_state,
                                    separate_step_compensation, set_rng_state, vjp_agreement)

CONFIG = "config.json"
EVAL = "eval.json"  # --eval-only's result
OUTPUT_FILES = (CHECKPOINT, METRICS, CURVES, CONFIG, EVAL)
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}
# --resume: these define the run (its data, model, loss and sampling) and must match the checkpoint;
# the others may change (--lr, --weight-decay, --epochs, --lambda-fg/bg, --backend...): they take
# effect and the log names them
RESUME_KEYS = ("data", "arch", "image_size", "num_classes", "no_sib", "vjp", "window_size", "temperature",
               "slope", "seed", "batch_size", "train_samples", "spurious", "amp", "pretrained", "hsic_features")
NOT_COMPARED = ("output", "resume", "eval_only")


def lr_factor(args) -> float:
    """What the schedule's learning rate is multiplied by: ``separate_step_compensation`` under
    ``--sib-lazy separate`` (S-IB's own optimizer step every K-th batch), else 1."""
    separate = not args.no_sib and getattr(args, "sib_lazy", "merged") == "separate"
    return separate_step_compensation(args.sib_every) if separate else 1.0


def adamw_betas(args) -> tuple[float, float]:
    """AdamW's (0.9, 0.999), raised to ``lr_factor``: the moments keep their time constant per batch."""
    c = lr_factor(args)
    return 0.9**c, 0.999**c


@dataclass
class RunState:
    """One run, from ``setup`` to the last epoch: what setup built, and the counters that ``resume``
    restores and each epoch advances."""
    args: argparse.Namespace
    d: Dist
    log: Callable[..., None]      # print on the main process, silent on the others
    t_start: float
    threads_note: str             # for the opening line: the CPU threads, and why so few
    backend: str                  # the S-IB head backend, resolved once
    amp_dtype: torch.dtype | None
    normalize: Callable[[torch.Tensor], torch.Tensor]  # on the device, before the model
    train_set: Dataset
    val_set: Dataset
    num_classes: int
    loader_gen: torch.Generator   # reseeded at each epoch: the batches do not depend on where a run resumed
    sampler: SkipSampler          # skips the batches a mid-epoch checkpoint had trained
    train_items: ItemSeeded       # the training set, its augmentations seeded per image in the workers
    train_loader: DataLoader
    val_loader: DataLoader
    raw_model: nn.Module          # the module itself: the optimizer, checkpoints and --check-vjp use it
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    criterion: SIBLoss
    bad_images: BadImages
    notes: list[str]              # logged after the opening line
    steps_per_epoch: int
    lr_schedule: schedule.Schedule
    pretrained: dict | None = None  # --pretrained: what was loaded, for the checkpoint
    model: nn.Module | None = None  # what the steps call: raw_model, compiled and DDP-wrapped as asked (start)
    run_name: str = ""
    start_epoch: int = 0
    start_batch: int = 0          # a mid-epoch checkpoint: the batches of start_epoch already trained
    partial: dict | None = None   # ... and this rank's sums over them (loop.EpochTotals)
    step: int = 0
    records: list[dict] = field(default_factory=list)
    nonfinite_total: int = 0
    consecutive_nonfinite: int = 0  # across epoch boundaries: a run of them stops the run
    changed_line: str = ""        # --resume: the arguments that changed, for the log
    meter_batch: tuple | None = None  # the fixed batch gradient_shares measures on (loop.measure_shares)
    shares_start: dict | None = None  # its reading before the first epoch of this process

    @property
    def out(self) -> Path:
        return Path(self.args.output)


def make_datasets(args, cache: bool = False):
    """(train, val, num_classes, normalisation stats) of ``--data``: synthetic, or a folder in one of the
    layouts of ``sib_fast.datasets`` (detected, or ``--data-format``)."""
    if args.data == "synthetic":
        kw = dict(image_size=args.image_size, num_classes=args.num_classes, seed=args.seed, cache=cache)
        train = SyntheticObjects("train", length=args.train_samples, spurious=args.spurious, **kw)
        val = SyntheticObjects("val", length=args.val_samples, **kw)
        return train, val, args.num_classes, SYNTHETIC_STATS
    from sib_fast.datasets import training_sets
    return training_sets(args)


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


def _head_backend(args, d: Dist, notes: list[str]) -> str:
    """Resolved once, so that a missing backend is one line and a fallback one note (on every run
    of a process: the note comes from ``backend_choice``, not from the once-only warning)."""
    try:  # R is float32 here, under --amp too
        backend, note = backend_choice(d.device, args.backend, args.temperature, torch.float32)
    except (BackendUnavailableError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the note says it
        resolve_backend(d.device, args.backend, args.temperature, torch.float32)  # loads the module
    if note is not None:
        notes.append(note)
    return backend


def _normalizer(stats, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    mean = torch.tensor(stats[0], device=device).view(1, -1, 1, 1)
    std = torch.tensor(stats[1], device=device).view(1, -1, 1, 1)

    def normalize(x):
        return (x.float() - mean) / std

    return normalize


def _make_output_folder(out: Path, notes: list[str]) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot make the output folder {out}: {os_reason(exc)}") from None
    for f in remove_stale_temporaries(out, OUTPUT_FILES):
        notes.append(f"removed {f.name}, a temporary file left by a process that was killed while writing")


def _model_notes(args, model: nn.Module) -> list[str]:
    notes = []
    kinks = non_smooth_layers(model) if args.vjp == "finite_difference" and not args.no_sib else []
    if kinks:
        notes.append(f"{args.arch} has {', '.join(kinks)} layers: finite differences do not follow the exact "
                     "gradient across their kinks (docs/vjp_modes.md); --check-vjp measures how far")
    if args.amp != "off" and not args.no_sib:
        notes.append(f"--amp {args.amp}: R carries half-precision rounding, and the S-IB gradient falls on the few "
                     "pixels of R's quantile ranks, which that noise reorders: the head's gradient direction is "
                     "largely noise (docs/vjp_modes.md, 'Precision'); use --amp off where it matters")
    return notes


def setup(args, d: Dist) -> RunState:
    """Seeds, threads, head backend, loaders, model, output folder, optimizer: a run ready to resume or start.
    The order is the seeds' order: the model's initial weights follow from ``--seed``."""
    t_start = time.time()
    log = print if d.main else (lambda *a, **k: None)
    torch.manual_seed(args.seed)
    threads_note = ""
    if d.device.type == "cpu":
        threads, threads_note = cpu_threads(args.threads, d.world)
        torch.set_num_threads(threads)
    notes: list[str] = []
    backend = _head_backend(args, d, notes)

    workers = args.workers
    if workers is None:
        workers = 0 if args.data == "synthetic" else min(8, max(1, (os.cpu_count() or 1) // max(1, d.world)))
    # synthetic images are rendered once and kept (about 50 KB each at 64px) when loading in-process
    train_set, val_set, num_classes, stats = make_datasets(args, cache=workers == 0)
    train_set = ItemSeeded(train_set, args.seed)
    loader_gen = torch.Generator()
    if d.enabled:
        from torch.utils.data.distributed import DistributedSampler
        inner = DistributedSampler(train_set, num_replicas=d.world, rank=d.rank, shuffle=True,
                                   seed=args.seed, drop_last=True)
    else:
        inner = RandomSampler(train_set, generator=loader_gen)
    sampler = SkipSampler(inner)
    pin = d.device.type == "cuda"
    # skip_bad_collate: (x, y, mask or None, skipped files); the files travel with the batch from the workers
    train_loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, num_workers=workers,
                              drop_last=True, pin_memory=pin, generator=loader_gen, collate_fn=skip_bad_collate)
    # its own generator: starting the loader draws a worker seed, which must not come from the RNG the
    # checkpoints save (a resumed process would draw it where the uninterrupted one did not)
    val_loader = DataLoader(shard(val_set, d), batch_size=args.batch_size, shuffle=False,
                            num_workers=workers, pin_memory=pin, collate_fn=skip_bad_collate,
                            generator=torch.Generator().manual_seed(args.seed))
    if len(train_loader) == 0:
        raise TrainingStopped(f"the training set ({len(train_set)} images over {d.world} processes) is smaller "
                              f"than one batch of {args.batch_size}")

    model = build_model(args.arch, num_classes, args.image_size)
    loaded = None
    if args.pretrained and not args.resume and not args.eval_only:  # else the checkpoint's weights replace them
        source = pretrained.locate(args.pretrained, args.arch)
        left_out, line = pretrained.load_into(model, source, num_classes)
        notes.append(line)
        loaded = dict(spec=args.pretrained, kind=source.kind, file=str(source.path), left_out=left_out)
    model = model.to(d.device)
    if d.main:  # only now: a bad argument or input leaves no folder behind
        _make_output_folder(Path(args.output), notes)
    notes += _model_notes(args, model)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    torch.manual_seed(args.seed + 1 + d.rank)  # dropout etc. differ between ranks
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                  betas=adamw_betas(args))
    scaler = torch.amp.GradScaler(d.device.type, enabled=args.amp == "fp16")
    criterion = SIBLoss(lambda_fg=args.lambda_fg, lambda_bg=args.lambda_bg, window_size=args.window_size,
                        temperature=args.temperature, slope=args.slope, backend=backend,
                        hsic_features=getattr(args, "hsic_features", None))
    steps = len(train_loader)
    return RunState(args=args, d=d, log=log, t_start=t_start, threads_note=threads_note, backend=backend,
                    amp_dtype=AMP_DTYPES[args.amp], normalize=_normalizer(stats, d.device), train_set=train_set,
                    val_set=val_set, num_classes=num_classes, loader_gen=loader_gen, sampler=sampler,
                    train_items=train_set, train_loader=train_loader, val_loader=val_loader, raw_model=model,
                    optimizer=optimizer, scaler=scaler, criterion=criterion, bad_images=BadImages(d, log),
                    notes=notes, steps_per_epoch=steps, lr_schedule=schedule.from_args(args, steps),
                    pretrained=loaded)


# ----------------------------------------------------------------------------- resume

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


def resume(r: RunState, ckpt: dict) -> None:
    """Restore ``read_resume_checkpoint``'s checkpoint into ``r``: weights, optimizer, counters, RNG, history,
    and for a mid-epoch checkpoint where in the epoch it was and the epoch's sums so far."""
    args, d = r.args, r.d
    try:
        r.raw_model.load_state_dict(ckpt["model"])
        r.optimizer.load_state_dict(ckpt["optimizer"])
        r.scaler.load_state_dict(ckpt["scaler"])
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"--resume: {r.out / CHECKPOINT} does not fit this model and optimizer: "
                         f"{first[:300]}") from None
    # the optimizer state brings the old learning rate and weight decay back: the arguments win (the
    # rate is set again at every step, by the schedule)
    for group in r.optimizer.param_groups:
        group["lr"], group["weight_decay"], group["betas"] = args.lr, args.weight_decay, adamw_betas(args)
    partial = ckpt.get("partial")
    if partial is not None and len(partial) != d.world:
        raise UsageError(f"--resume: {r.out / CHECKPOINT} was written in the middle of an epoch by {len(partial)} "
                         f"process(es); resume it with as many (now {d.world})")
    if ckpt["changed"]:
        r.changed_line = "; changed: " + ", ".join(f"--{k.replace('_', '-')} {a!r} -> {b!r}"
                                                   for k, a, b in ckpt["changed"])
    r.start_epoch, r.step = int(ckpt["epoch"]), int(ckpt["step"])
    r.nonfinite_total = int(ckpt.get("nonfinite_total", 0))
    r.pretrained = ckpt.get("pretrained")
    r.bad_images = BadImages(d, r.log, ckpt.get("bad_images"))
    r.bad_images.saved_epoch = int(ckpt["epoch"])
    if partial is not None:
        mine = partial[d.rank]
        r.start_batch, r.partial = int(ckpt["batch"]), mine
        r.consecutive_nonfinite = int(mine["consecutive_nonfinite"])
        r.bad_images = BadImages(d, r.log, mine["known"])
        r.bad_images.epoch_new, r.bad_images.total = dict(mine["epoch_new"]), int(mine["bad_total"])
        r.bad_images.saved_epoch = int(ckpt["epoch"])
    set_rng_state(ckpt["rng"][min(d.rank, len(ckpt["rng"]) - 1)], d.device)
    r.records = [rec for rec in ckpt["records"] if rec["epoch"] <= r.start_epoch]
    if r.start_epoch >= args.epochs:
        r.log(f"{PROG}: the checkpoint already has {r.start_epoch} epoch(s) (--epochs {args.epochs}); nothing to do")


# ----------------------------------------------------------------------------- start

def start(r: RunState) -> None:
    """Compile and DDP-wrap the model as asked, write config.json, log the run's opening lines and --check-vjp."""
    args, d = r.args, r.d
    model = r.raw_model
    if args.compile:
        model = torch.compile(model)
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    r.model = model
    if d.main:
        atomic_write_text(r.out / CONFIG, json.dumps(vars(args), indent=2) + "\n", what="config")
    mode = "CE only (--no-sib)" if args.no_sib else f"S-IB, vjp={args.vjp}, head backend={r.backend}"
    r.run_name = f"{args.arch} on {'SyntheticObjects' if args.data == 'synthetic' else args.data}, {mode}"
    r.log(f"{PROG}: {r.run_name}; {len(r.train_set)} train / {len(r.val_set)} val images of {args.image_size}px, "
          f"{r.num_classes} classes; batch {args.batch_size} x {d.world} process(es) on {d.device.type}; "
          f"window {args.window_size}; lr {args.lr:g}{_schedule_words(args)}; amp {args.amp}{r.threads_note}; "
          f"output {r.out}")
    for note in r.notes:
        r.log(f"{PROG}: note: {note}")
    if args.resume:
        where = (f"in epoch {r.start_epoch + 1} after batch {r.start_batch}" if r.partial is not None
                 else f"after epoch {r.start_epoch}")
        r.log(f"{PROG}: resuming {where} (step {r.step}){r.changed_line}")
    if args.check_vjp and d.main:
        saved = rng_state(d.device)  # its batch's augmentations must not move the run's RNG
        r.log(_vjp_check_line(r))
        set_rng_state(saved, d.device)


def _schedule_words(args) -> str:
    words = "" if args.lr_schedule == "constant" else f" {args.lr_schedule}"
    if args.lr_schedule == "step":
        words += f" x{args.lr_gamma:g} at epochs {','.join(f'{m:g}' for m in args.lr_step_epochs)}"
    if args.warmup_epochs:
        words += f", warmup {args.warmup_epochs:g} epoch(s)"
    if args.label_smoothing:
        words += f"; label smoothing {args.label_smoothing:g}"
    if lr_factor(args) != 1.0:
        c = lr_factor(args)
        words += f"; S-IB steps of their own (--sib-lazy separate): rate x{c:.3g}, AdamW betas ^{c:.3g}"
    return words


def read_eval_checkpoint(args) -> dict:
    """``OUTPUT/checkpoint.pt`` for --eval-only: its weights, epoch and step (one line, exit 2 if not usable)."""
    path = Path(args.output) / CHECKPOINT
    ckpt = load_checkpoint(path, EVAL_KEYS)
    old = ckpt["args"].get("arch")
    if old is not None and old != args.arch:
        raise UsageError(f"--eval-only: {path} holds a {old!r} model, not --arch {args.arch!r}")
    return ckpt


def _vjp_check_line(r: RunState) -> str:
    """--check-vjp: the cosine of the two VJP modes' head gradients on the first batch, as a log line."""
    args = r.args
    x, y, _, _ = next(iter(r.train_loader))
    if x is None or x.shape[0] < 2:
        return f"{PROG}: --check-vjp: the first batch has fewer than two readable images; nothing to compare"
    x = r.normalize(x.to(r.d.device))
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    try:
        cos = vjp_agreement(r.raw_model, x, y.to(r.d.device), r.criterion, fd_eps=args.fd_eps,
                            autocast_dtype=r.amp_dtype)
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
