"""``sib-bench``: how fast is each S-IB backend here, and how far from the memory limit.

Head mode (default) times, for each available backend, the eager reference
and ``torch.compile`` of the reference, the forward, the backward and the
forward+backward of the head (``sib_terms`` and the gradient of HSIC and BG
with respect to R) over batches and dtypes; it reports medians and
interquartile ranges, the peak extra memory, the achieved bandwidth over the
floor bytes of SPEC section 7 and its share of the machine's copy bandwidth
measured in the same run, and the error against the eager reference.

Step mode (``--step``) times a full training step (forward, loss, backward,
AdamW step) of a torchvision ResNet-50 and a small ViT with plain
cross-entropy and with S-IB in its exact and finite-difference modes.

    sib-bench                                   # head, this machine's defaults
    sib-bench --batch 8,32,128 --dtype float32,bfloat16 --json head.json --plot head.png
    sib-bench --step --model resnet50,vit_s_16 --step-batch 64 --json step.json
    sib-bench --from-json head.json --plot head.png --markdown RESULTS.md

Timings are medians over rotating input sets (CUDA events on GPU,
``perf_counter`` after warm-up on CPU); see ``sib_fast.bench.measure``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from sib_fast.cli_errors import OutputError, UsageError, atomic_write_text, check_output_file, os_reason

SCHEMA = "sib-bench/1"
PARTS = ("fwd", "bwd", "fwd_bwd")
PART_LABELS = {"fwd": "forward", "bwd": "backward", "fwd_bwd": "forward+backward"}
COMPILE_LANE = "reference+compile"
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
DEFAULT_BATCH = {"cpu": "4,16", "cuda": "8,32,128"}
# fixed upstream gradients of (hsic, bg): not 1, so a backward that ignores them shows up
UPSTREAM = (0.75, -1.25)


# ---------------------------------------------------------------- arguments


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sib-bench", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Head mode by default; --step for the training step; --from-json to re-render a record.")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write every number (rewritten after each row)")
    p.add_argument("--plot", metavar="PATH", help="head mode: time vs batch and roofline position (matplotlib)")
    p.add_argument("--markdown", metavar="PATH", help="append the table(s) with date, machine and commit")
    p.add_argument("--note", default="", help="a line recorded with the results (e.g. 'shared machine, noisy')")
    p.add_argument("--copy-mib", type=int, default=None,
                   help="buffer size of the copy-bandwidth measurement (default: 8x the cache, >= 256 MiB CPU, 1 GiB GPU)")
    p.add_argument("--from-json", metavar="PATH", help="print, plot or append a recorded run instead of running")

    head = p.add_argument_group("head mode")
    head.add_argument("--batch", default=None, help="batch sizes (default: cpu 4,16; cuda 8,32,128)")
    head.add_argument("--size", default="224", help="image size, N or HxW (default 224)")
    head.add_argument("--channels", type=int, default=3)
    head.add_argument("--dtype", default="float32", help="comma-separated: float32,bfloat16,float16,float64")
    head.add_argument("--backends", default="all",
                      help=f"comma-separated: reference, {COMPILE_LANE} (or compile), cpu, cuda, triton, all")
    head.add_argument("--no-compile", action="store_true", help="leave out torch.compile of the reference")
    head.add_argument("--compile-batch", default=None,
                      help="batches at which to run torch.compile (default: all); each shape compiles anew")
    head.add_argument("--window", type=int, default=31)
    head.add_argument("--warmup", type=int, default=2, help="untimed forward+backward calls per backend")
    head.add_argument("--min-reps", type=int, default=5)
    head.add_argument("--max-reps", type=int, default=30)
    head.add_argument("--min-time", type=float, default=1.0, help="seconds spent at least per measurement")
    head.add_argument("--quick", action="store_true", help="1 warm-up, 3 to 5 reps: a smoke test, not a measurement")
    head.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    head.add_argument("--no-check", action="store_true", help="skip the comparison with the eager reference")
    head.add_argument("--profile", action="store_true",
                      help="also list each row's largest GPU kernels (CPU: operators) in one forward+backward")

    step = p.add_argument_group("step mode")
    step.add_argument("--step", action="store_true", help="time full training steps instead of the head")
    step.add_argument("--model", default="resnet50,vit_s_16",
                      help="models as sib-train --arch takes them (torchvision, timm, sib_cnn), vit_s_16 (ViT-S/16: "
                           "12 layers, 6 heads, width 384) or tiny_cnn (smoke test)")
    step.add_argument("--step-batch", type=int, default=None, help="default: cpu 4, cuda 64")
    step.add_argument("--step-size", type=int, default=224)
    step.add_argument("--num-classes", type=int, default=1000)
    step.add_argument("--vjp", default="exact,finite_difference", help="S-IB modes to time")
    step.add_argument("--step-reps", type=int, default=5, help="timed steps per row (after 2 warm-up steps)")
    step.add_argument("--channels-last", action="store_true")
    return p


def resolve_device(text: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(f"--device must be cpu, cuda, cuda:N or auto, got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu or cuda, got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA GPU is available")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def select_lanes(spec: str, device: torch.device, no_compile: bool) -> list[str]:
    """The head lanes to run: eager reference first, then the fused backends, then torch.compile.

    torch.compile is last because its first call compiles for tens of seconds: a run cut short
    (Ctrl-C, a time limit) still has the fused rows of every shape it reached."""
    from sib_fast.backends.dispatch import BACKEND_NAMES, available_backends

    names = [n.strip() for n in spec.split(",") if n.strip()]
    lanes: list[str] = []
    for name in names:
        if name == "all":
            fused = [b for b in available_backends(device) if b != "reference"]
            if device.type == "cpu":
                fused = [b for b in fused if b != "triton"]  # the interpreter is for tests, not timing
            wanted = ["reference"] + fused + [COMPILE_LANE]
        elif name in ("compile", COMPILE_LANE):
            wanted = [COMPILE_LANE]
        elif name in BACKEND_NAMES:
            wanted = [name]
        else:
            raise UsageError(f"--backends: unknown backend {name!r}; choose from reference, {COMPILE_LANE}, "
                             f"{', '.join(BACKEND_NAMES[1:])}, all")
        lanes += [w for w in wanted if w not in lanes]
    if no_compile:
        lanes = [lane for lane in lanes if lane != COMPILE_LANE]
    if not lanes:
        raise UsageError("--backends selects nothing to run")
    # the eager reference is the yardstick of every row: always first
    return ["reference"] + [lane for lane in lanes if lane != "reference"]


# ---------------------------------------------------------------- record


def new_record(args, device: torch.device, mode: str) -> dict:
    from sib_fast.bench.machine import copy_bandwidth, git_state, library_versions, machine_info, now_utc

    record = {
        "schema": SCHEMA, "mode": mode, "created": now_utc(), "argv": sys.argv[1:] if args.argv is None else args.argv,
        "note": args.note, "device": str(device), "machine": machine_info(device),
        "versions": library_versions(), "git": git_state(),
        "settings": {"tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                     "tf32_cudnn": torch.backends.cudnn.allow_tf32},
    }
    record["copy_bandwidth"] = copy_bandwidth(device, None if args.copy_mib is None else args.copy_mib * 1024 ** 2)
    record["rows"] = []
    return record


def save_json(record: dict, path: str | None) -> None:
    """Rewrite the record at ``path`` atomically: a failure (``OutputError``) leaves the last one intact."""
    if not path:
        return
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"--json {path}: cannot make {path.parent}: {os_reason(exc)}") from None
    atomic_write_text(path, json.dumps(record, indent=1, sort_keys=False) + "\n", what="--json record")


def load_record(path: str) -> dict:
    """A record written by --json, for --from-json; one line (UsageError) when it is not one."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = os_reason(exc) if isinstance(exc, OSError) else "not a text file"
        raise UsageError(f"--from-json {path}: cannot read it: {reason}") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--from-json {path} is not JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
                         ) from None
    if not isinstance(record, dict) or record.get("schema") != SCHEMA or not isinstance(record.get("rows"), list):
        raise UsageError(f"--from-json {path} is not a {SCHEMA} record")
    return record


def check_outputs(args) -> None:
    """--json, --plot and --markdown must be writable before minutes of measuring, not after."""
    if args.json and not args.from_json:
        check_output_file(args.json, "--json")
    if args.markdown:
        check_output_file(args.markdown, "--markdown")
    if args.plot:
        check_output_file(args.plot, "--plot")
        ext = Path(args.plot).suffix.lstrip(".").lower()
        try:
            from matplotlib.backend_bases import FigureCanvasBase
        except ImportError:
            return  # said when plotting: the measurements are worth having without the plot
        kinds = FigureCanvasBase.get_supported_filetypes()
        if ext not in kinds:
            what = f".{ext} files" if ext else "a file without an extension"
            known = ", ".join("." + k for k in sorted(kinds))
            raise UsageError(f"--plot {args.plot}: matplotlib cannot write {what}; use one of {known}")


# ---------------------------------------------------------------- head mode


def lane_function(lane: str, window: int, temperature: float = 0.1, slope: float = 10.0):
    """``fn(R, x) -> (hsic, bg, mask)`` for a lane."""
    import sib_fast
    from sib_fast.backends import reference

    if lane == COMPILE_LANE:
        torch._dynamo.reset()  # each shape compiles anew; keep the cache from hitting its limit
        compiled = torch.compile(reference.sib_terms, dynamic=False)
        return lambda R, x: compiled(R, x, window, temperature, slope)
    return lambda R, x: tuple(sib_fast.sib_terms(R, x, window_size=window, temperature=temperature,
                                                 slope=slope, backend=lane))


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = expected.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    err = ((actual - expected).abs().max() / scale).item()
    return err if math.isfinite(err) else float("inf")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def bench_head_lane(lane, fn, inputs, upstream, device, args, reference_out) -> dict:
    """One row: warm-up, the three timings, peak memory and the error against the reference."""
    from sib_fast.bench.measure import peak_extra_memory, synchronize, time_calls

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
        row["max_rel_err"] = {"hsic": _relative_error(out[0], reference_out[0]),
                              "bg": _relative_error(out[1], reference_out[1]),
                              "dR": _relative_error(dR, reference_out[2])}
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
        from sib_fast.bench.profile import kernel_breakdown

        try:
            row["profile"] = kernel_breakdown(lambda: forward_backward(inputs[0]), device)
        except Exception as exc:  # the profiler failing is not the backend failing: keep the timings
            row["profile_error"] = _first_line(exc)
    return row


def _finish_row(row: dict, copy_GBps: float) -> None:
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


def _add_speedups(rows: list[dict]) -> None:
    """Each row's speed-up over the eager reference and over torch.compile of it (same shape)."""
    for key, lane in (("speedup_vs_reference", "reference"), ("speedup_vs_compiled", COMPILE_LANE)):
        base = next((r for r in rows if r["backend"] == lane and "timings" in r), None)
        for row in rows:
            if base is not None and "timings" in row:
                row[key] = {p: base["timings"][p]["median"] / row["timings"][p]["median"] for p in PARTS}


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


def run_head(args, device: torch.device, record: dict, config: dict) -> None:
    from sib_fast.bench.machine import available_ram_bytes, cache_bytes
    from sib_fast.bench.measure import floor_bytes, make_head_inputs, rotation_count
    from sib_fast.backends.dispatch import unavailable_reason
    from sib_fast.backends.reference import compute_dtype

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
                        row["error"] = _first_line(exc)
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                _finish_row(row, copy_GBps)
                shape_rows.append(row)
                record["rows"].append(row)
                _add_speedups(shape_rows)
                save_json(record, args.json)
            del inputs, reference_out
            if device.type == "cuda":
                torch.cuda.empty_cache()


# ---------------------------------------------------------------- tables


def _ms(stats: dict | None) -> str:
    if not stats:
        return "-"
    med, iqr = stats["median"] * 1e3, stats["iqr"] * 1e3
    digits = 3 if med < 1 else 2 if med < 100 else 1
    return f"{med:.{digits}f} ({iqr:.{digits}f})"


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def head_table(record: dict) -> str:
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
        lines.append(f"{head} {_ms(t['fwd'])} | {_ms(t['bwd'])} | {_ms(t['fwd_bwd'])} | {cpu_text}"
                     f"{_num(speed, '.2f')}x | {_num(speed_compiled, '.2f') + 'x' if speed_compiled else '-'} | "
                     f"{row['achieved_GBps']['fwd_bwd']:.2f} | "
                     f"{row['pct_of_copy_bw']['fwd_bwd']:.1f} | {mem_text} | {err_text} |")
    return "\n".join(lines)


def step_table(record: dict) -> str:
    from sib_fast.bench.step import step_table as table

    return table(record)


def _load_text(start, end) -> str:
    if start is None:
        return ""
    return f", load average {start:.1f}" + (f" -> {end:.1f}" if end is not None else "")


def short_error(row: dict) -> str:
    text = row.get("error", "not run")
    return text if len(text) <= 140 else text[:137] + "..."


def header_lines(record: dict) -> list[str]:
    from sib_fast.bench.machine import device_label

    git = record.get("git") or {}
    commit = (git.get("commit") or "unknown")[:12] + (" (uncommitted changes)" if git.get("dirty") else "")
    v = record.get("versions", {})
    machine = record.get("machine", {})
    dev_type = torch.device(record["device"]).type
    lines = [f"{record['created']}, {device_label(machine, dev_type)}, commit {commit}",
             f"torch {v.get('torch')}, python {v.get('python')}"
             + (f", triton {v['triton']}" if v.get("triton") else "")
             + (f", driver {machine['gpu'].get('driver')}" if machine.get("gpu") else "")
             + f", {machine.get('torch_threads')} CPU threads of {machine.get('logical_cpus')}"
             + _load_text(machine.get("loadavg_1min_at_start"), record.get("loadavg_1min_at_end")),
             f"copy bandwidth measured in this run: {record['copy_bandwidth']['GBps']:.1f} GB/s"
             + (f" (datasheet {machine['gpu']['datasheet_bandwidth_GBps']:.0f} GB/s)"
                if machine.get("gpu", {}).get("datasheet_bandwidth_GBps") else "")]
    if record.get("note"):
        lines.append(f"note: {record['note']}")
    return lines


def render(record: dict) -> str:
    text = "\n".join(header_lines(record)) + "\n\n"
    if record["mode"] == "head":
        s = record.get("head_settings", {})
        method = next((r.get("memory_method") for r in record["rows"] if r.get("memory_method")), None)
        text += (f"head: window {s.get('window')}; times in ms, median (IQR); floor = R and x read once, dR "
                 f"written once (SPEC 7); peak extra memory by {method or '-'}; error vs the eager reference "
                 f"(max of hsic, bg, dR)\n\n")
        text += head_table(record)
        if any(r.get("profile") for r in record["rows"]):
            from sib_fast.bench.profile import profile_table

            text += "\n\nkernels of one forward+backward (--profile):\n" + profile_table(record["rows"])
    else:
        text += step_table(record)
    return text + "\n"


def append_markdown(record: dict, path: str) -> None:
    title = "Head" if record["mode"] == "head" else "Training step"
    body = render(record)
    first, rest = body.split("\n", 1)
    section = f"\n### {title}: {first}\n\n" + "\n".join(f"{line}  " if line and not line.startswith("|") else line
                                                      for line in rest.splitlines()) + "\n"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(section)


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    threads = torch.get_num_threads()
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # main() may run inside another program (tests): leave it as found


def _run(args) -> int:
    from sib_fast.bench.machine import load_average

    try:
        check_outputs(args)
        if args.from_json:
            record = load_record(args.from_json)
        else:
            if args.quick:
                args.warmup, args.min_reps, args.max_reps, args.min_time = 1, 3, 5, 0.0
            if args.threads is not None:
                if args.threads < 1:
                    raise UsageError(f"--threads must be >= 1, got {args.threads}")
                torch.set_num_threads(args.threads)
            if args.copy_mib is not None and args.copy_mib < 1:
                raise UsageError(f"--copy-mib must be >= 1, got {args.copy_mib}")
            if args.min_reps < 1 or args.max_reps < args.min_reps or args.warmup < 0 or args.min_time < 0:
                raise UsageError("need --warmup >= 0, 1 <= --min-reps <= --max-reps and --min-time >= 0")
            device = resolve_device(args.device)
            if args.step:
                from sib_fast.bench.step import step_config

                config = step_config(args, device)
            else:
                config = head_config(args, device)
            record = new_record(args, device, "step" if args.step else "head")
            print("\n".join(header_lines(record)), file=sys.stderr, flush=True)
            try:
                if args.step:
                    from sib_fast.bench.step import run_step

                    run_step(args, device, record, config)
                else:
                    run_head(args, device, record, config)
            except OutputError as exc:  # --json failed mid-run: the rows measured so far go to stdout
                print(render(record))
                print(f"sib-bench: {exc}; the rows above are complete", file=sys.stderr)
                return 1
            except KeyboardInterrupt:
                record["interrupted"] = True
                record["loadavg_1min_at_end"] = load_average()
                save_json(record, args.json)
                print(render(record))
                print("sib-bench: interrupted; the rows above are complete", file=sys.stderr)
                return 130
            record["loadavg_1min_at_end"] = load_average()
            save_json(record, args.json)
    except UsageError as exc:
        print(f"sib-bench: {exc}", file=sys.stderr)
        return 2
    except OutputError as exc:
        print(f"sib-bench: {exc}", file=sys.stderr)
        return 1
    print(render(record))
    status = 0
    if args.plot:
        if record["mode"] != "head":
            print("sib-bench: --plot draws head-mode records; nothing plotted", file=sys.stderr)
        else:
            try:
                from sib_fast.bench.plot import plot_head

                plot_head(record, args.plot)
            except ImportError as exc:
                print(f"sib-bench: cannot plot ({exc}); install matplotlib", file=sys.stderr)
            except OSError as exc:
                print(f"sib-bench: cannot write the plot {args.plot}: {os_reason(exc)}", file=sys.stderr)
                status = 1
    if args.markdown:
        try:
            append_markdown(record, args.markdown)
        except OSError as exc:
            print(f"sib-bench: cannot append to {args.markdown}: {os_reason(exc)}", file=sys.stderr)
            status = 1
    return status
