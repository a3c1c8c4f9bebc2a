"""The ``sib-train`` run: ``run`` goes through the phases, setup, resume, start (``training.prepare``),
then ``train_epoch`` (with a checkpoint every ``--checkpoint-every`` steps) and ``end_epoch``
(held-out pass, metrics.jsonl, curves.png, checkpoint) for each epoch, and returns the summary it
prints; ``--eval-only`` is ``score_checkpoint``."""
from __future__ import annotations

import contextlib
import json
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from sib_fast.cli_errors import UsageError, atomic_write_text
from sib_fast.training import PROG
from sib_fast.training.checkpoint import CHECKPOINT, save_checkpoint
from sib_fast.training.distributed import Dist
from sib_fast.training.faults import TrainingStopped, nonfinite_cause, weights_finite
from sib_fast.training.held_out import evaluate, top5_correct
from sib_fast.training.history import CURVES, METRICS, plot_curves, write_metrics
from sib_fast.training.prepare import (EVAL, RunState, lr_factor, read_eval_checkpoint, read_resume_checkpoint, resume,
                                       setup, start)
from sib_fast.training.shares import gradient_shares
from sib_fast.training.step import DoubleBackwardUnsupportedError, rng_state, sib_backward, unwrap_ddp

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover - tqdm is a dependency
    tqdm = None

SUMMED = ("loss", "ce", "hsic", "bg")  # the loss terms an epoch averages over its images


def run(args, resume_state: dict | None = None) -> dict:
    """Train; ``resume_state``: ``read_resume_checkpoint(args)`` (read here when None and --resume)."""
    if args.eval_only:
        return score_checkpoint(args, read_eval_checkpoint(args))
    if args.resume and resume_state is None:
        resume_state = read_resume_checkpoint(args)
    d = Dist(args.device)
    try:
        r = setup(args, d)
        if args.resume:
            resume(r, resume_state)
        start(r)
        if not args.no_sib:
            r.shares_start = measure_shares(r)
            _log_shares(r, r.shares_start)
        for epoch in range(r.start_epoch, args.epochs):
            end_epoch(r, epoch, train_epoch(r, epoch))
        return finish(r)
    finally:
        d.close()


@dataclass
class EpochTotals:
    """One epoch's training on this rank: loss terms summed over images, steps taken and skipped."""
    sums: dict = field(default_factory=lambda: dict.fromkeys((*SUMMED, "correct", "correct5", "seen", "steps",
                                                               "sib_seen", "sib_steps"), 0.0))
    skipped: int = 0       # non-finite steps
    images: int = 0        # over every rank
    seconds: float = 0.0


def _separate(args) -> bool:
    """``--sib-lazy separate``: the S-IB terms in an optimizer step of their own (``_separate_sib_step``)."""
    return not args.no_sib and args.sib_lazy == "separate"


def _forward_backward(r: RunState, x, y):
    """The loss's parts (loss, CE, HSIC, BG; 0-dim), the logits and whether the S-IB terms were taken
    (``--sib-every``), the gradient accumulated in the weights."""
    args = r.args
    try:
        if args.no_sib or _separate(args):
            autocast = torch.autocast(r.d.device.type, dtype=r.amp_dtype) if r.amp_dtype else contextlib.nullcontext()
            with autocast:
                logits = r.model(x)
            ce = F.cross_entropy(logits.float(), y, label_smoothing=args.label_smoothing)
            r.scaler.scale(ce).backward()
            return [ce.detach(), ce.detach(), torch.full_like(ce, math.nan), torch.full_like(ce, math.nan)], \
                logits.detach(), False
        # every rank counts the same steps, so every rank takes the same steps as S-IB steps
        st = sib_backward(r.model, x, y, r.criterion, vjp=args.vjp, fd_eps=args.fd_eps,
                          autocast_dtype=r.amp_dtype, grad_scaler=r.scaler, sib_batch=args.sib_batch,
                          sib_bn=args.sib_bn, sib_every=args.sib_every, step=r.step,
                          label_smoothing=args.label_smoothing)
        return [st.loss, st.ce, st.hsic, st.bg], st.logits, st.sib_step
    except DoubleBackwardUnsupportedError as exc:
        raise _no_double_backward(exc) from None


def _separate_sib_step(r: RunState, x, y, t: EpochTotals) -> tuple[float, float] | None:
    """``--sib-lazy separate``, after the cross-entropy step of every K-th batch: an optimizer step
    of K x the S-IB terms alone on the same batch (StyleGAN2's lazy regularization; the rate and
    betas carry ``lr_factor``). Returns its (HSIC, BG), or None where it was not finite on some
    rank: then it is skipped and counted, the weights as before it."""
    args = r.args
    r.optimizer.zero_grad(set_to_none=True)
    try:
        st = sib_backward(r.model, x, y, r.criterion, vjp=args.vjp, fd_eps=args.fd_eps, autocast_dtype=r.amp_dtype,
                          grad_scaler=r.scaler, sib_batch=args.sib_batch, sib_bn=args.sib_bn,
                          sib_every=args.sib_every, step=r.step, label_smoothing=args.label_smoothing, sib_only=True)
    except DoubleBackwardUnsupportedError as exc:
        raise _no_double_backward(exc) from None
    grads = [p.grad for p in r.raw_model.parameters() if p.grad is not None]
    gnorm = torch.nn.utils.get_total_norm(grads) if grads and not r.scaler.is_enabled() else torch.zeros(())
    loss_v, hsic_v, bg_v, gnorm_v = torch.stack([st.loss.double().cpu(), st.hsic.double().cpu(),
                                                 st.bg.double().cpu(), gnorm.double().cpu()]).tolist()
    if r.d.any(not (math.isfinite(loss_v) and math.isfinite(gnorm_v))):
        r.optimizer.zero_grad(set_to_none=True)
        if r.scaler.is_enabled():
            r.scaler.update(r.scaler.get_scale() * r.scaler.get_backoff_factor())
        t.skipped += 1
        r.nonfinite_total += 1
        return None
    r.scaler.step(r.optimizer)
    r.scaler.update()
    return hsic_v, bg_v


def _no_double_backward(exc: DoubleBackwardUnsupportedError) -> TrainingStopped:
    return TrainingStopped(str(exc).replace("vjp='finite_difference' (sib-train: --vjp finite_difference)",
                                            "--vjp finite_difference"))


def measure_shares(r: RunState) -> dict:
    """``grad_ratio_fg`` and ``grad_ratio_bg`` of ``gradient_shares`` on a fixed batch (the first of
    the validation set), each rank on its own; None where not finite or no batch is readable."""
    if r.meter_batch is None:
        x, y, _, _ = next(iter(r.val_loader))
        if x is None or x.shape[0] < 2:
            return {"grad_ratio_fg": None, "grad_ratio_bg": None}
        x = r.normalize(x.to(r.d.device))
        if r.args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        r.meter_batch = (x, y.to(r.d.device))
    was_training = r.raw_model.training
    r.raw_model.train()  # as the steps run it, whatever the held-out pass left
    try:
        shares = gradient_shares(r.raw_model, *r.meter_batch, r.criterion, vjp=r.args.vjp, fd_eps=r.args.fd_eps,
                                 autocast_dtype=r.amp_dtype)
    except DoubleBackwardUnsupportedError as exc:
        raise _no_double_backward(exc) from None
    finally:
        r.raw_model.train(was_training)
    return {k: v if math.isfinite(v) else None
            for k, v in (("grad_ratio_fg", shares.ratio_fg), ("grad_ratio_bg", shares.ratio_bg))}


def _log_shares(r: RunState, shares: dict) -> None:
    fg, bg = shares["grad_ratio_fg"], shares["grad_ratio_bg"]
    if fg is None or bg is None:
        return
    r.log(f"{PROG}: S-IB gradient shares at the start: lambda_fg exp(-HSIC) {fg:.2e}, lambda_bg exp(BG) {bg:.2e} "
          f"of cross-entropy's weight gradient")
    if fg < 0.01 and bg < 0.01:
        r.log(f"{PROG}: note: the S-IB terms move the weights by less than 1% of cross-entropy (--lambda-fg "
              f"{r.args.lambda_fg:g}, --lambda-bg {r.args.lambda_bg:g}): at these weights S-IB barely changes "
              f"training; see 'Choosing lambda' in docs/training.md")


def train_epoch(r: RunState, epoch: int) -> EpochTotals:
    """One pass over the training set (the rest of it, after a mid-epoch checkpoint). A step whose
    loss or gradient is not finite on any rank is skipped on every rank (weights, statistics and
    grad scale as before it); ``--max-nonfinite`` of them in a row stop the run. The learning
    rate is set at every step (``--lr-schedule``)."""
    args, d, bad_images = r.args, r.d, r.bad_images
    r.model.train()
    r.loader_gen.manual_seed(args.seed * 100_003 + epoch)
    r.train_items.epoch = epoch
    if d.enabled:
        r.sampler.set_epoch(epoch)
    first = r.start_batch if epoch == r.start_epoch else 0
    r.sampler.skip = first * args.batch_size
    if d.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(d.device)
    params = [p for p in r.raw_model.parameters() if p.requires_grad]
    # a skipped step must not leave its batch in the running statistics either (NaN inputs would)
    buffers = [b for b in r.raw_model.buffers() if b.is_floating_point() or b.dtype == torch.long]
    t = EpochTotals()
    if first and r.partial is not None:
        t.sums.update(r.partial["sums"])
        t.skipped, t.images, t.seconds = int(r.partial["skipped"]), int(r.partial["images"]), r.partial["seconds"]
    bar = tqdm(total=r.steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}/{args.epochs}", unit="step",
               leave=False, disable=None if d.main else True, dynamic_ncols=True) if tqdm else None
    t0 = time.time() - t.seconds
    if bar is not None and not bar.disable:
        bad_images.write = bar.write  # a warning line above the bar, not through it
    for batch, (x, y, _, bad_files) in enumerate(r.train_loader, first):
        bad_images.note(bad_files)
        usable = x is not None and x.shape[0] >= 2  # the HSIC term needs two images
        # every rank must agree to skip (DDP's backward is collective); one all-reduce for both counts
        new_bad, unusable = d.sum([float(bad_images.pending), float(not usable)])
        bad_images.total += int(new_bad)
        bad_images.pending = 0
        bad_images.check(args.max_bad_images)
        if unusable:
            r.step += 1
            if bar is not None:
                bar.update(1)
            _maybe_checkpoint(r, epoch, batch, t, t0)
            continue
        x = r.normalize(x.to(d.device, non_blocking=True))
        y = y.to(d.device, non_blocking=True)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        lr = r.lr_schedule.lr(epoch * r.steps_per_epoch + batch) * lr_factor(args)
        for group in r.optimizer.param_groups:
            group["lr"] = lr
        r.optimizer.zero_grad(set_to_none=True)
        saved_buffers = [b.detach().clone() for b in buffers]
        parts, logits, sib_step = _forward_backward(r, x, y)
        grads = [p.grad for p in params if p.grad is not None]
        gnorm = torch.nn.utils.get_total_norm(grads) if grads and not r.scaler.is_enabled() else torch.zeros(())
        vals = torch.stack([*(p.detach().double().reshape(()).cpu() for p in parts),
                            (logits.argmax(1) == y).sum().double().cpu(), gnorm.double().cpu(),
                            torch.isfinite(x).all().double().cpu()]).tolist()
        loss_v, ce_v, hsic_v, bg_v, correct, gnorm_v, input_ok = vals
        correct5 = top5_correct(logits, y)
        if d.any(not (math.isfinite(loss_v) and math.isfinite(gnorm_v))):
            r.optimizer.zero_grad(set_to_none=True)
            for b, v in zip(buffers, saved_buffers):
                b.data.copy_(v)
            if r.scaler.is_enabled():
                r.scaler.update(r.scaler.get_scale() * r.scaler.get_backoff_factor())
            t.skipped += 1
            r.nonfinite_total += 1
            r.consecutive_nonfinite += 1
            if r.consecutive_nonfinite >= args.max_nonfinite:
                if bar is not None:
                    bar.close()
                last = dict(loss=loss_v, ce=ce_v, hsic=hsic_v if sib_step else 0.0,
                            bg=bg_v if sib_step else 0.0, input_finite=bool(input_ok),
                            weights_finite=weights_finite(r.raw_model))
                raise TrainingStopped(
                    f"stopped at epoch {epoch + 1}, step {r.step + 1}: {r.consecutive_nonfinite} non-finite losses "
                    f"in a row ({r.nonfinite_total} in all); likely cause: {nonfinite_cause(args, last)}")
        else:
            r.consecutive_nonfinite = 0
            r.scaler.step(r.optimizer)
            r.scaler.update()
            if _separate(args) and r.step % args.sib_every == 0:
                taken = _separate_sib_step(r, x, y, t)
                if taken is not None:
                    sib_step, (hsic_v, bg_v) = True, taken
            n = x.shape[0]
            for k, v in zip(SUMMED[:2], (loss_v, ce_v)):
                t.sums[k] += v * n
            if sib_step:  # HSIC and BG of the steps that took them
                t.sums["hsic"] += hsic_v * n
                t.sums["bg"] += bg_v * n
                t.sums["sib_seen"] += n
                t.sums["sib_steps"] += 1
            t.sums["correct"] += correct
            t.sums["correct5"] += correct5
            t.sums["seen"] += n
            t.sums["steps"] += 1
        r.step += 1
        t.images += x.shape[0] * d.world
        if bar is not None:
            post = {"ce": f"{ce_v:.3f}", "img/s": f"{t.images / max(time.time() - t0, 1e-9):.1f}"}
            if sib_step:
                post.update(hsic=f"{hsic_v:.3f}", bg=f"{bg_v:.2e}")
            if t.skipped:
                post["skipped"] = t.skipped
            bar.set_postfix(post, refresh=False)
            bar.update(1)
        _maybe_checkpoint(r, epoch, batch, t, t0)
    r.sampler.skip = 0
    if bar is not None:
        bar.close()
    bad_images.write = r.log
    t.seconds = time.time() - t0
    return t


def _maybe_checkpoint(r: RunState, epoch: int, batch: int, t: EpochTotals, t0: float) -> None:
    """``--checkpoint-every N``: after every N-th step but an epoch's last (``end_epoch`` writes that one),
    a checkpoint from which ``--resume`` goes on with the next batch: each rank's RNG and sums so far."""
    n = r.args.checkpoint_every
    if not n or r.step % n or batch + 1 >= r.steps_per_epoch:
        return
    if not weights_finite(r.raw_model):
        raise TrainingStopped(f"the weights are not finite at step {r.step} of epoch {epoch + 1}; no checkpoint "
                              f"written; lower --lr (now {r.args.lr:g})")
    bad = r.bad_images
    mine = dict(sums=dict(t.sums), skipped=t.skipped, images=t.images, seconds=time.time() - t0,
                consecutive_nonfinite=r.consecutive_nonfinite, known=dict(bad.known), epoch_new=dict(bad.epoch_new),
                bad_total=bad.total)
    partial, rngs = zip(*r.d.gather((mine, rng_state(r.d.device))))
    if r.d.main:
        save_checkpoint(r.out / CHECKPOINT, _checkpoint_state(r, epoch, list(rngs), batch=batch + 1,
                                                             partial=list(partial)))
    if r.d.enabled:
        dist.barrier()


def _checkpoint_state(r: RunState, epochs_done: int, rngs: list, **extra) -> dict:
    """checkpoint.pt: what --resume restores (``extra``: where in an epoch, for a mid-epoch one), the
    --pretrained weights it started from and the schedule (for the record: the rate follows from the step)."""
    return dict(format=1, model=r.raw_model.state_dict(), optimizer=r.optimizer.state_dict(),
                scaler=r.scaler.state_dict(), epoch=epochs_done, step=r.step, rng=rngs,
                nonfinite_total=r.nonfinite_total, bad_images=r.bad_images.known, args=vars(r.args),
                pretrained=r.pretrained, lr_schedule=r.lr_schedule.record(), **extra)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _epoch_record(r: RunState, epoch: int, t: EpochTotals) -> dict:
    """The epoch's metrics.jsonl record: training sums over every rank and the held-out pass."""
    args, d, bad_images = r.args, r.d, r.bad_images
    agg = d.sum([t.sums[k] for k in (*SUMMED, "correct", "seen", "sib_seen", "sib_steps", "correct5")])
    seen = max(agg[5], 1.0)
    sib_seen = agg[6]
    evals = evaluate(unwrap_ddp(r.model), r.val_loader, d, r.normalize, r.criterion, r.amp_dtype,
                     args.channels_last, on_bad=bad_images.note, num_classes=r.num_classes)
    bad_before = len(bad_images.known) - len(bad_images.epoch_new)
    new_bad_files = bad_images.merge()
    bad_images.check(args.max_bad_images)
    if agg[5] == 0:
        raise TrainingStopped(f"epoch {epoch + 1} trained on no batch: the images of --data {args.data} are "
                              f"unreadable ({bad_images.total} skipped so far)")
    record = dict(
        epoch=epoch + 1, step=r.step, run=r.run_name,
        train_loss=agg[0] / seen, train_ce=agg[1] / seen,
        train_hsic=agg[2] / sib_seen if sib_seen else None, train_bg=agg[3] / sib_seen if sib_seen else None,
        sib_steps=int(agg[7]) // d.world,
        train_acc=agg[4] / seen, train_acc5=agg[8] / seen if r.num_classes > 5 else None, **evals,
        lr=r.lr_schedule.lr((epoch + 1) * r.steps_per_epoch - 1) * lr_factor(args),
        images_per_s=t.images / max(t.seconds, 1e-9), epoch_time_s=t.seconds,
        peak_mem_mb=peak_memory_mb(d.device), peak_mem_kind="cuda_allocated" if d.device.type == "cuda" else "cpu_rss",
        nonfinite_skipped=t.skipped, bad_images=len(bad_images.known) - bad_before,
        bad_images_total=len(bad_images.known), bad_image_files=new_bad_files, world_size=d.world,
        vjp=None if args.no_sib else args.vjp, backend=None if args.no_sib else r.backend, amp=args.amp,
        **(dict.fromkeys(("grad_ratio_fg", "grad_ratio_bg")) if args.no_sib else measure_shares(r)))
    if r.shares_start is not None and epoch == r.start_epoch:
        record.update(grad_ratio_fg_start=r.shares_start["grad_ratio_fg"],
                      grad_ratio_bg_start=r.shares_start["grad_ratio_bg"])
    if d.enabled:  # parameters must be identical on every rank
        checksums = d.gather(float(sum(p.detach().double().sum() for p in r.raw_model.parameters())))
        record["ranks_in_sync"] = all(c == checksums[0] for c in checksums)
    return record


def end_epoch(r: RunState, epoch: int, t: EpochTotals) -> None:
    """The held-out pass, metrics.jsonl, curves.png and the epoch's line, then the checkpoint
    (none when the weights are not finite: the previous one stays)."""
    args, d = r.args, r.d
    record = _epoch_record(r, epoch, t)
    r.records.append(record)
    if d.main:
        write_metrics(r.out / METRICS, r.records)
        plot_curves(r.records, r.out / CURVES)
        r.log(_epoch_line(record, args))
        if record.get("ranks_in_sync") is False:
            r.log(f"{PROG}: warning: the parameters differ between ranks after epoch {epoch + 1}")
    if not weights_finite(r.raw_model):
        raise TrainingStopped(f"the weights are not finite after epoch {epoch + 1}; no checkpoint written; "
                              f"lower --lr (now {args.lr:g})")
    rngs = d.gather(rng_state(d.device))  # each rank's, so that a resumed rank draws what it would have
    if d.main:
        save_checkpoint(r.out / CHECKPOINT, _checkpoint_state(r, epoch + 1, rngs))
    r.bad_images.saved_epoch = epoch + 1
    if d.enabled:
        dist.barrier()


def finish(r: RunState) -> dict:
    """The run's summary (printed on the main process)."""
    args = r.args
    summary = dict(epochs=args.epochs, steps=r.step, seconds=time.time() - r.t_start, num_classes=r.num_classes,
                   nonfinite_skipped=r.nonfinite_total, final=r.records[-1] if r.records else None,
                   output=str(r.out))
    r.log(_summary(summary))
    return summary


def _fmt(v, spec=".3f"):
    return "n/a" if v is None else format(v, spec)


def _epoch_line(rec: dict, args) -> str:
    s = (f"epoch {rec['epoch']}/{args.epochs}: train CE {_fmt(rec['train_ce'])} acc {_fmt(rec['train_acc'])}"
         f"{_top5(rec, 'train')} | val acc {_fmt(rec['val_acc'])}{_top5(rec, 'val')}")
    if rec.get("train_hsic") is not None:
        s += f" | HSIC {_fmt(rec['train_hsic'])} BG {_fmt(rec['train_bg'], '.2e')}"
    if rec.get("val_fg_fraction") is not None:
        s += f" | saliency on object {_fmt(rec['val_fg_fraction'])}"
    s += f" | {rec['images_per_s']:.1f} img/s, {rec['epoch_time_s']:.0f}s"
    if rec["nonfinite_skipped"]:
        s += f" | {rec['nonfinite_skipped']} non-finite step(s) skipped"
    if rec.get("bad_images"):
        s += f" | {rec['bad_images']} unreadable image(s) skipped"
    return s


def _top5(rec: dict, split: str) -> str:
    v = rec.get(f"{split}_acc5")
    return "" if v is None else f" top-5 {_fmt(v)}"


def _summary(s: dict) -> str:
    rec = s["final"] or {}
    m, sec = divmod(int(round(s["seconds"])), 60)
    lines = [f"{PROG}: done in {m}m{sec:02d}s, {s['epochs']} epoch(s), {s['steps']} steps"]
    if rec:
        lines.append(f"  val accuracy {_fmt(rec.get('val_acc'))}{_top5(rec, 'val')} (train {_fmt(rec.get('train_acc'))}, chance "
                     f"{1 / s['num_classes']:.3f}), "
                     f"train CE {_fmt(rec.get('train_ce'))}, {rec.get('images_per_s', 0):.1f} images/s")
        if rec.get("val_hsic") is not None:
            lines.append(f"  val HSIC {_fmt(rec.get('val_hsic'))}, BG {_fmt(rec.get('val_bg'), '.2e')}"
                         + (f", saliency mass on the object {_fmt(rec.get('val_fg_fraction'))} "
                            f"(object area {_fmt(rec.get('val_fg_area'))})"
                            if rec.get("val_fg_fraction") is not None else ""))
    lines.append(f"  non-finite steps skipped: {s['nonfinite_skipped']}")
    out = Path(s["output"])
    lines.append(f"  wrote {out / METRICS}, {out / CURVES}, {out / CHECKPOINT}")
    return "\n".join(lines)


def score_checkpoint(args, ckpt: dict) -> dict:
    """--eval-only: the held-out pass of ``OUTPUT/checkpoint.pt``'s weights on --data's validation split,
    printed and written to ``OUTPUT/eval.json``; nothing else in the folder changes."""
    d = Dist(args.device)
    try:
        r = setup(args, d)
        try:
            r.raw_model.load_state_dict(ckpt["model"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UsageError(f"--eval-only: {r.out / CHECKPOINT} does not fit --arch {args.arch} with "
                             f"{r.num_classes} classes: {first[:300]}") from None
        evals = evaluate(r.raw_model, r.val_loader, d, r.normalize, r.criterion, r.amp_dtype, args.channels_last,
                         on_bad=r.bad_images.note, num_classes=r.num_classes)
        r.bad_images.merge()
        r.bad_images.check(args.max_bad_images)
        where = "mid-epoch, " if "partial" in ckpt else ""
        result = dict(checkpoint=str(r.out / CHECKPOINT), epoch=ckpt.get("epoch"), step=ckpt.get("step"),
                      mid_epoch=bool(where), data=args.data, val_images=len(r.val_set), num_classes=r.num_classes,
                      **evals, bad_images_total=len(r.bad_images.known))
        if d.main:
            atomic_write_text(r.out / EVAL, json.dumps(result, indent=2) + "\n", what="eval")
        line = (f"{PROG}: --eval-only: {r.out / CHECKPOINT} ({where}epoch {ckpt.get('epoch')}, step "
                f"{ckpt.get('step')}) on {len(r.val_set)} val images: acc {_fmt(evals['val_acc'])}"
                f"{_top5(evals, 'val')}")
        if evals.get("val_hsic") is not None:
            line += f" | HSIC {_fmt(evals['val_hsic'])} BG {_fmt(evals['val_bg'], '.2e')}"
        if evals.get("val_fg_fraction") is not None:
            line += f" | saliency on object {_fmt(evals['val_fg_fraction'])}"
        r.log(line + f"; wrote {r.out / EVAL}")
        return result
    finally:
        d.close()
