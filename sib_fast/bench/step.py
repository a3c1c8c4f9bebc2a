"""``sib-bench --step``: images/s and peak memory of a full training step.

Rows per model: plain cross-entropy; S-IB exact (double backward) with the reference head and
with each fused head; S-IB finite-difference with each fused head (with the reference head when no
fused one is available); plain cross-entropy again, last. A step is zero_grad, forward, loss,
backward into the parameters, AdamW step; its time is the median over ``--step-reps`` steps after
2 warm-up steps. The ratio of each row's step time to the plain step's, the faster of its two
measurements (a process's first steps run slower while its allocator grows), is the headline.

``--sib-modes`` adds the cheaper S-IB steps of ``sib_backward``: ``every=K`` (lazy: the S-IB
terms every K-th step, timed over whole cycles of K steps, so a row's step time is the amortized
one), ``batch=N`` or ``batch=B/n`` (R and the head on N images; ``bn=frozen|batch|running``) and
their combinations joined by ``+``, e.g. ``--sib-modes every=4,batch=B/8,every=4+batch=B/4``.

The S-IB rows call ``sib_fast.sib_backward(model, x, target, criterion, vjp=...)``. The exact
rows run ``scaled_dot_product_attention`` on its math backend: the fused (flash, memory-efficient)
kernels have no double backward, so a ViT's exact S-IB step costs what the math attention costs,
and its finite-difference rows keep the fused kernels. CNNs are unaffected. The models are
``sib-train --arch``'s (``sib_fast.training.models.build_model``).
"""
from __future__ import annotations

import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from sib_fast import SIBLoss, sib_backward
from sib_fast.bench.lanes import fused_backends
from sib_fast.bench.measure import rss_peak_extra, summarize, synchronize
from sib_fast.bench.record import error_line, format_ms, save_json, short_error
from sib_fast.cli_errors import UsageError
from sib_fast.training.models import build_model
from sib_fast.training.norms import SUB_BATCH_NORMS

WARMUP_STEPS = 2
DEFAULT_STEP_BATCH = {"cpu": 4, "cuda": 64}


def parse_sib_mode(text: str, batch: int) -> dict:
    """``every=K+batch=N|B/n+bn=MODE+separate`` -> the ``sib_backward`` keywords ``sib_every``,
    ``sib_batch``, ``sib_bn``, and ``separate``: the S-IB terms in an optimizer step of their own."""
    mode = {"sib_every": 1, "sib_batch": None, "sib_bn": "frozen", "separate": False}
    for part in text.split("+"):
        key, _, value = part.strip().partition("=")
        try:
            if key == "every":
                mode["sib_every"] = int(value)
            elif key == "batch":
                mode["sib_batch"] = batch // int(value[2:]) if value.startswith("B/") else int(value)
            elif key == "bn" and value in SUB_BATCH_NORMS:
                mode["sib_bn"] = value
            elif key == "separate" and not value:
                mode["separate"] = True
            else:
                raise ValueError
        except (ValueError, ZeroDivisionError):
            raise UsageError(f"--sib-modes: {part.strip()!r} is not every=K, batch=N, batch=B/n, "
                             f"bn={'|'.join(SUB_BATCH_NORMS)} or separate") from None
    if mode["sib_every"] < 1 or (mode["sib_batch"] is not None and not 2 <= mode["sib_batch"] <= batch):
        raise UsageError(f"--sib-modes {text!r}: needs every >= 1 and 2 <= batch <= --step-batch ({batch})")
    return mode


def mode_label(mode: dict) -> str:
    parts = [f"every {mode['sib_every']}"] if mode["sib_every"] > 1 else []
    if mode["sib_batch"] is not None:
        parts.append(f"batch {mode['sib_batch']} ({mode['sib_bn']})")
    if mode.get("separate"):
        parts.append("separate step")
    return ", ".join(parts)


def step_rows(fused: list[str], vjp_modes: list[str], sib_modes: list[dict] = ()) -> list[tuple]:
    """(row name, vjp mode, head backend, cheaper-step keywords) of the rows of one model."""
    rows = [("plain CE", None, None, {})]
    if "exact" in vjp_modes:
        rows.append(("S-IB exact", "exact", "reference", {}))
        rows += [("S-IB exact", "exact", b, {}) for b in fused]
    if "finite_difference" in vjp_modes:
        rows += [("S-IB finite-difference", "finite_difference", b, {}) for b in (fused or ["reference"])]
    head = (fused or ["reference"])[0]
    names = {"exact": "S-IB exact", "finite_difference": "S-IB finite-difference"}
    rows += [(f"{names[vjp]}, {mode_label(mode)}", vjp, head, mode) for vjp in vjp_modes for mode in sib_modes]
    # again at the end: the first steps of a process run slower (the allocator is still growing)
    rows.append(("plain CE (again)", None, None, {}))
    return rows


def make_step(model, optimizer, vjp, backend, mode=None):
    """A function of (x, target) doing one full training step, or with ``mode["sib_every"]`` = K a
    cycle of K steps (the S-IB step and K - 1 plain ones; with ``mode["separate"]``, K plain ones and
    the S-IB terms' own step): ``cycle_length`` batches per call."""
    if vjp is None:
        def step(x, target):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), target).backward()
            optimizer.step()
        step.cycle_length = 1
        return step
    criterion = SIBLoss(backend=backend)
    mode = dict(mode or {})
    separate = mode.pop("separate", False)
    every = mode.get("sib_every", 1)

    def step(x, target):
        for i in range(every):
            optimizer.zero_grad(set_to_none=True)
            # only the math attention has a double backward
            with sdpa_kernel(SDPBackend.MATH) if vjp == "exact" else nullcontext():
                if separate:
                    F.cross_entropy(model(x), target).backward()
                    if i == 0:
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                        sib_backward(model, x, target, criterion, vjp=vjp, sib_only=True, **mode)
                else:
                    sib_backward(model, x, target, criterion, vjp=vjp, step=i, **mode)
            optimizer.step()
    step.cycle_length = every
    return step


def _time_step(step, batches, device, reps):
    """Per-step times: each call's time over the steps it takes."""
    times = []
    for i in range(reps):
        x, y = batches[i % len(batches)]
        synchronize(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(x, y)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / step.cycle_length)
        else:
            t0 = time.perf_counter()
            step(x, y)
            times.append((time.perf_counter() - t0) / step.cycle_length)
    return summarize(times)


def _peak_memory(step, batch, device) -> dict:
    """Peak memory of one step: absolute and beyond what existed before (model, optimizer state, inputs)."""
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(*batch)
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_bytes": int(peak), "peak_extra_bytes": int(peak - base),
                "memory_method": "cuda-max-memory-allocated"}
    extra, _ = rss_peak_extra(lambda: step(*batch))
    return {"peak_bytes": None, "peak_extra_bytes": extra, "memory_method": "rss-high-water"}


def step_config(args, device: torch.device) -> dict:
    """The step-mode settings from the arguments, checked before anything is measured."""
    models = [m.strip() for m in args.model.split(",") if m.strip()]
    vjp_modes = [v.strip() for v in args.vjp.split(",") if v.strip()]
    bad = [v for v in vjp_modes if v not in ("exact", "finite_difference")]
    if not models or not vjp_modes or bad:
        raise UsageError("--model needs names and --vjp takes exact,finite_difference")
    batch = args.step_batch or DEFAULT_STEP_BATCH[device.type]
    if batch < 2:
        raise UsageError("--step-batch must be >= 2 (the S-IB head needs 2 images)")
    if args.step_reps < 1 or args.step_size < 1 or args.num_classes < 2:
        raise UsageError("need --step-reps >= 1, --step-size >= 1 and --num-classes >= 2")
    if any(m != "tiny_cnn" for m in models):
        try:
            import torchvision  # noqa: F401
        except ImportError:
            raise UsageError("step mode needs torchvision (pip install torchvision)") from None
    sib_modes = [parse_sib_mode(m, batch) for m in (args.sib_modes or "").split(",") if m.strip()]
    return {"models": models, "batch": batch, "sib_modes": sib_modes, "image_size": args.step_size, "num_classes": args.num_classes,
            "vjp_modes": vjp_modes, "fused": fused_backends(device), "reps": args.step_reps,
            "warmup": WARMUP_STEPS, "optimizer": "AdamW(lr=1e-4, weight_decay=1e-4)",
            "channels_last": args.channels_last,
            "exact_attention": "math (scaled_dot_product_attention)"}


def run_step(args, device: torch.device, record: dict, config: dict) -> None:
    """Every (model, row) of ``config`` into ``record``, saved after each row."""
    record["step_settings"] = config
    models, vjp_modes, fused, batch = config["models"], config["vjp_modes"], config["fused"], config["batch"]
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    for model_name in models:
        try:
            model = build_model(model_name, args.num_classes, args.step_size)
        except Exception as exc:
            raise UsageError(f"--model {model_name}: {error_line(exc)}") from None
        model = model.to(device=device, memory_format=memory_format).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
        batches = []
        for _ in range(2):
            x = torch.rand(batch, 3, args.step_size, args.step_size, generator=gen)
            y = torch.randint(0, args.num_classes, (batch,), generator=gen)
            batches.append((x.to(device=device, memory_format=memory_format), y.to(device)))
        model_rows = []
        for name, vjp, backend, mode in step_rows(fused, vjp_modes, config.get("sib_modes", [])):
            row = {"kind": "step", "model": model_name, "row": name, "vjp": vjp, "head_backend": backend,
                   "batch": batch, "image_size": args.step_size, "device": device.type, **mode}
            print(f"  {model_name} B={batch} {name} {backend or ''} ...", file=sys.stderr, flush=True)
            try:
                step = make_step(model, optimizer, vjp, backend, mode)
                for i in range(WARMUP_STEPS):
                    step(*batches[i % 2])
                row["timing"] = _time_step(step, batches, device, args.step_reps)
                row.update(_peak_memory(step, batches[0], device))
                row["images_per_s"] = batch / row["timing"]["median"]
            except Exception as exc:  # e.g. no double backward for an op: the finding, not a crash
                row["error"] = error_line(exc)
            finally:
                optimizer.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            record["rows"].append(row)
            model_rows.append(row)
            _plain_step_ratios(model_rows)
            save_json(record, args.json)
        del model, optimizer, batches


def _plain_step_ratios(rows: list[dict]) -> None:
    """Each row's step time over the plain step's, the faster of its two measurements."""
    plain = [r["timing"]["median"] for r in rows if r["vjp"] is None and "timing" in r]
    for row in rows:
        if "timing" in row:
            row["x_plain_step"] = row["timing"]["median"] / min(plain) if plain else None


def step_table(record: dict) -> str:
    """The step rows of a record, under a line saying what a step is, as Markdown."""
    s = record.get("step_settings", {})
    lines = [f"step: zero_grad, forward, loss, backward, {s.get('optimizer', 'AdamW')} step; median (IQR) of "
             f"{s.get('reps')} steps after {s.get('warmup')} warm-up; S-IB via sib_fast.sib_backward"
             + ("; exact rows: attention on SDPA's math backend (no double backward in the fused ones)"
                if s.get("exact_attention") else ""), "",
             "| model | B | size | row | head | step ms | images/s | x plain step | peak MB | peak extra MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in record["rows"]:
        if row.get("kind") != "step":
            continue
        head = (f"| {row['model']} | {row['batch']} | {row['image_size']} | {row['row']} | "
                f"{row['head_backend'] or '-'} |")
        if "timing" not in row:
            lines.append(f"{head} {short_error(row)} | | | | |")
            continue
        peak = row.get("peak_bytes")
        extra = row.get("peak_extra_bytes")
        ratio = row.get("x_plain_step")
        lines.append(f"{head} {format_ms(row['timing'])} | {row['images_per_s']:.1f} | "
                     f"{'-' if ratio is None else format(ratio, '.2f')} | "
                     f"{'-' if peak is None else format(peak / 1e6, '.0f')} | "
                     f"{'-' if extra is None else format(extra / 1e6, '.0f')} |")
    return "\n".join(lines)
