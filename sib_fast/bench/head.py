"""``sib-bench`` head mode: the S-IB head's forward, backward and forward+backward per lane.

For each lane (the eager reference, each available fused backend, ``torch.compile`` of the
reference), batch and dtype: medians and interquartile ranges of the three parts, the peak
extra memory, the achieved bandwidth over the floor bytes of docs/loss.md section 7 and its share of
the copy bandwidth measured in the same run, and the error against the eager reference.
"""
from __future__ import annotations

import sys
import time

import torch

from sib_fast.backends.dispatch import unavailable_reason
from sib_fast.backends.reference import compute_dtype
from sib_fast.bench.lanes import COMPILE_LANE, UPSTREAM, lane_function, relative_error, select_lanes
from sib_fast.bench.machine import available_ram_bytes, cache_bytes
from sib_fast.bench.measure import (floor_bytes, make_head_inputs, peak_extra_memory, rotation_count, synchronize,
                                    time_calls)
from sib_fast.bench.profile import kernel_breakdown
from sib_fast.bench.record import PARTS, error_line, format_ms, save_json, short_error
from sib_fast.cli_errors import UsageError

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
DEFAULT_BATCH = {"cpu": "4,16", "cuda": "8,32,128"}


def _int_list(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{name} must be a comma-separated list of integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise UsageError(f"{name} must list positive integers, got {text!r}")
    return values


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        raise UsageError(f"--size must be N or HxW, got {text!r}") from None
    if len(dims) == 1:
        dims = dims * 2
    if len(dims) != 2 or min(dims) < 1:
        raise UsageError(f"--size must be N or HxW with positive sides, got {text!r}")
    return dims[0], dims[1]


def _dtypes(text: str) -> list[str]:
    names = [d.strip() for d in text.split(",") if d.strip()]
    bad = [d for d in names if d not in DTYPES]
    if not names or bad:
        raise UsageError(f"--dtype takes a comma-separated list of {', '.join(DTYPES)}, got {text!r}")
    return names


def head_config(args, device: torch.device) -> dict:
    """The head-mode settings from the arguments, checked before anything is measured."""
    batches = _int_list(args.batch or DEFAULT_BATCH[device.type], "--batch")
    compile_batches = _int_list(args.compile_batch, "--compile-batch") if args.compile_batch else batches
    height, width = _size(args.size)
    dtypes = _dtypes(args.dtype)
    if args.channels < 1:
        raise UsageError(f"--channels must be >= 1, got {args.channels}")
    if args.window < 1 or args.window % 2 == 0:
        raise UsageError(f"--window must be a positive odd integer, got {args.window}")
    if min(batches) < 2:
        raise UsageError("--batch: the head needs at least 2 images per batch (HSIC)")
    lanes = select_lanes(args.backends, device, args.no_compile)
    return {"batches": batches, "compile_batches": compile_batches, "height": height, "width": width,
            "channels": args.channels, "dtypes": dtypes, "lanes": lanes, "window": args.window,
            "warmup": args.warmup, "min_reps": args.min_reps, "max_reps": args.max_reps,
            "min_time": args.min_time, "upstream": list(UPSTREAM), "x_requires_grad": False,
            "forward": "grad enabled, as in training (saves what the backward needs)",
            "backward": "torch.autograd.grad of (hsic, bg) with respect to R, upstream gradients 'upstream'"}


def bench_head_lane(lane, fn, inputs, upstream, device, args, reference_out) -> dict:
    """One row: warm-up, the three timings, peak memory and the error against the reference."""
    def forward(inp, _state=None):
        R, x = inp
        return fn(R, x)

    def backward(inp, out):
        grads = upstream.get(out[0].dtype)
        if grads is None:  # a backend whose outputs are in another dtype than the reference's
            grads = upstream.setdefault(out[0].dtype, tuple(torch.tensor(u, dtype=out[0].dtype, device=device)
                                                            for u in UPSTREAM))
        return torch.autograd.grad((out[0], out[1]), (inp[0],), grads)[0]

    def forward_backward(inp, _state=None):
        return backward(inp, forward(inp))

    row: dict = {}
    t0 = time.perf_counter()
    out = forward(inputs[0])
    dR = backward(inputs[0], out)
    synchronize(device)
    row["first_call_s"] = time.perf_counter() - t0  # includes compilation for torch.compile and JIT kernels
    if reference_out is not None:
        row["max_rel_err"] = {"hsic": relative_error(out[0], reference_out[0]),
                              "bg": relative_error(out[1], reference_out[1]),
                              "dR": relative_error(dR, reference_out[2])}
    del out, dR
    for i in range(max(0, args.warmup - 1)):
        forward_backward(inputs[(i + 1) % len(inputs)])
    synchronize(device)

    reps = {"min_reps": args.min_reps, "max_reps": args.max_reps, "min_time": args.min_time}
    row["timings"] = {
        "fwd_bwd": time_calls(forward_backward, None, inputs, device, **reps),
        "fwd": time_calls(forward, None, inputs, device, **reps),
        "bwd": time_calls(backward, forward, inputs, device, **reps),
    }
    if not args.no_memory:
        fwd_mem = peak_extra_memory(lambda: forward(inputs[0]), device)
        both_mem = peak_extra_memory(lambda: forward_backward(inputs[0]), device)
        row["peak_extra_bytes"] = {"fwd": fwd_mem["bytes"], "fwd_bwd": both_mem["bytes"]}
        row["memory_method"] = both_mem["method"]
    if args.profile:
        try:
            row["profile"] = kernel_breakdown(lambda: forward_backward(inputs[0]), device)
        except Exception as exc:  # the profiler failing is not the backend failing: keep the timings
            row["profile_error"] = error_line(exc)
    return row


def finish_row(row: dict, copy_GBps: float) -> None:
    """Achieved bandwidth over the floor bytes and its share of the measured copy bandwidth."""
    if "timings" not in row:
        return
    row["achieved_GBps"], row["pct_of_copy_bw"] = {}, {}
    for part in PARTS:
        gbps = row["floor_bytes"][part] / row["timings"][part]["median"] / 1e9
        row["achieved_GBps"][part] = gbps
        row["pct_of_copy_bw"][part] = 100.0 * gbps / copy_GBps
    if row.get("peak_extra_bytes"):
        row["peak_extra_x_R"] = {k: (v / row["floor_bytes"]["tensor"] if v is not None else None)
                                 for k, v in row["peak_extra_bytes"].items()}


def add_speedups(rows: list[dict]) -> None:
    """Each row's speed-up over the eager reference and over torch.compile of it (same shape)."""
    for key, lane in (("speedup_vs_reference", "reference"), ("speedup_vs_compiled", COMPILE_LANE)):
        base = next((r for r in rows if r["backend"] == lane and "timings" in r), None)
        for row in rows:
            if base is not None and "timings" in row:
                row[key] = {p: base["timings"][p]["median"] / row["timings"][p]["median"] for p in PARTS}


def run_head(args, device: torch.device, record: dict, config: dict) -> None:
    """Every (dtype, batch, lane) row of ``config`` into ``record``, saved after each row."""
    record["head_settings"] = config
    batches, compile_batches, lanes = config["batches"], config["compile_batches"], config["lanes"]
    height, width, dtypes = config["height"], config["width"], config["dtypes"]
    copy_GBps = record["copy_bandwidth"]["GBps"]
    cache = cache_bytes(device)
    if device.type == "cuda":
        budget = int(torch.cuda.mem_get_info(device)[0] * 0.25)
    else:
        budget = int((available_ram_bytes() or 8 * 1024 ** 3) * 0.25)

    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for batch in batches:
            shape = (batch, args.channels, height, width)
            floors = floor_bytes(shape, dtype)
            n_sets = rotation_count(2 * floors["tensor"], cache, budget)
            inputs = [make_head_inputs(*shape, dtype, device, seed=args.seed + i) for i in range(n_sets)]
            out_dtype = compute_dtype(inputs[0][0])
            upstream = {out_dtype: (torch.tensor(UPSTREAM[0], dtype=out_dtype, device=device),
                                    torch.tensor(UPSTREAM[1], dtype=out_dtype, device=device))}
            shape_rows = []
            reference_out = None
            for lane in lanes:
                row = {"kind": "head", "backend": lane, "device": device.type, "dtype": dtype_name, "batch": batch,
                       "channels": args.channels, "height": height, "width": width, "window": args.window,
                       "floor_bytes": floors, "n_input_sets": n_sets}
                reason = None
                if lane == COMPILE_LANE and batch not in compile_batches:
                    reason = "skipped: --compile-batch"
                elif lane not in ("reference", COMPILE_LANE):
                    reason = unavailable_reason(lane, device.type)
                    reason = f"unavailable: {reason}" if reason else None
                if reason:
                    row["error"] = reason
                else:
                    print(f"  {dtype_name} B={batch} {lane} ...", file=sys.stderr, flush=True)
                    try:
                        fn = lane_function(lane, args.window)
                        check_against = None if (args.no_check or lane == "reference") else reference_out
                        row.update(bench_head_lane(lane, fn, inputs, upstream, device, args, check_against))
                        if lane == "reference" and not args.no_check:
                            out = fn(*inputs[0])
                            grads = upstream[out[0].dtype]
                            dR = torch.autograd.grad((out[0], out[1]), (inputs[0][0],), grads)[0]
                            reference_out = (out[0].detach(), out[1].detach(), dR)
                            row["max_rel_err"] = {"hsic": 0.0, "bg": 0.0, "dR": 0.0}
                    except Exception as exc:  # one failing backend must not end the run
                        row["error"] = error_line(exc)
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                finish_row(row, copy_GBps)
                shape_rows.append(row)
                record["rows"].append(row)
                add_speedups(shape_rows)
                save_json(record, args.json)
            del inputs, reference_out
            if device.type == "cuda":
                torch.cuda.empty_cache()


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def head_table(record: dict) -> str:
    """The head rows of a record as a Markdown table."""
    copy = record["copy_bandwidth"]["GBps"]
    # CPU seconds of the process next to wall time: on a loaded machine the gap shows the contention
    cpu_col = any("cpu_time_median" in r.get("timings", {}).get("fwd_bwd", {}) for r in record["rows"])
    lines = [
        "| dtype | B | shape | backend | forward ms | backward ms | fwd+bwd ms | "
        + ("fwd+bwd CPU-time ms | " if cpu_col else "")
        + f"fwd+bwd vs eager | vs compiled | fwd+bwd GB/s over floor | % of copy BW ({copy:.1f} GB/s) | "
        f"peak extra MB (x R) | max rel err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if cpu_col else ""),
    ]
    for row in record["rows"]:
        if row.get("kind") != "head":
            continue
        shape = f"{row['channels']}x{row['height']}x{row['width']}"
        head = f"| {row['dtype']} | {row['batch']} | {shape} | {row['backend']} |"
        if "timings" not in row:
            lines.append(f"{head} {short_error(row)} |" + " |" * (8 + cpu_col))
            continue
        t = row["timings"]
        speed = row.get("speedup_vs_reference", {}).get("fwd_bwd")
        speed_compiled = row.get("speedup_vs_compiled", {}).get("fwd_bwd")
        mem = row.get("peak_extra_bytes", {}).get("fwd_bwd")
        mem_x = row.get("peak_extra_x_R", {}).get("fwd_bwd")
        mem_text = "-" if mem is None else f"{mem / 1e6:.1f} ({mem_x:.2f})"
        err = row.get("max_rel_err")
        err_text = "-" if not err else f"{max(err.values()):.1e}"
        cpu_text = ""
        if cpu_col:
            cpu_s = t["fwd_bwd"].get("cpu_time_median")
            cpu_text = "- | " if cpu_s is None else f"{cpu_s * 1e3:.{3 if cpu_s < 1e-3 else 1}f} | "
        lines.append(f"{head} {format_ms(t['fwd'])} | {format_ms(t['bwd'])} | {format_ms(t['fwd_bwd'])} | "
                     f"{cpu_text}"
                     f"{_num(speed, '.2f')}x | {_num(speed_compiled, '.2f') + 'x' if speed_compiled else '-'} | "
                     f"{row['achieved_GBps']['fwd_bwd']:.2f} | "
                     f"{row['pct_of_copy_bw']['fwd_bwd']:.1f} | {mem_text} | {err_text} |")
    return "\n".join(lines)


