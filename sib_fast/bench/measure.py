"""Measurement primitives of ``sib-bench``: floor bytes, timing, peak memory, inputs.

Timing: CUDA events around each repetition on GPU (synchronised after each),
``time.perf_counter`` on CPU; warm-up calls first; the inputs rotate over
several sets whose total exceeds the cache, so repeated runs do not find
their inputs cached. Statistics are the median and the interquartile range.

Peak extra memory: on GPU ``torch.cuda.max_memory_allocated`` minus what was
allocated before the call; on CPU every allocation and free of torch's CPU
allocator recorded by the profiler (``profile_memory=True``), summed in time
order ("cpu-allocator"): it sees every tensor, including those the fused
kernels allocate with ``at::empty``, but not scratch memory that C++ code
allocates with ``new``/``std::vector``. Where the profiler's event tree is not
available it falls back to the growth of the resident set size
("rss-high-water", Linux ``VmHWM`` after resetting it), which sees everything
but also counts pages the allocator keeps.
"""
from __future__ import annotations

import ctypes
import gc
import math
import time
from typing import Callable

import torch

# ---------------------------------------------------------------- floor bytes


def floor_bytes(shape, dtype: torch.dtype, *, grad_x: bool = False) -> dict:
    """Bytes the head must move at least (docs/loss.md section 7), per measured part.

    forward:  read R and x once;
    backward: read R and x once, write dR once (and dx when x requires grad);
    fwd_bwd:  the floor (docs/loss.md section 7) of the whole head, read R and x once and write dR
              once (and dx): the forward's reads are not counted twice.
    The mask (B x H x W) and per-image scalars are left out: the floor is a
    lower bound.
    """
    numel = math.prod(shape)
    item = torch.empty((), dtype=dtype).element_size()
    tensor = numel * item
    writes = tensor * (2 if grad_x else 1)
    return {"tensor": tensor, "fwd": 2 * tensor, "bwd": 2 * tensor + writes, "fwd_bwd": 2 * tensor + writes}


# ---------------------------------------------------------------- statistics


def summarize(times) -> dict:
    """Median, quartiles, IQR, min, mean and count of a list of seconds."""
    xs = sorted(float(t) for t in times)
    if not xs:
        raise ValueError("no timings to summarize")

    def quantile(q):  # linear interpolation, numpy's default
        pos = q * (len(xs) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    q1, med, q3 = quantile(0.25), quantile(0.5), quantile(0.75)
    return {"median": med, "q1": q1, "q3": q3, "iqr": q3 - q1, "min": xs[0], "mean": sum(xs) / len(xs),
            "n": len(xs), "samples": [float(t) for t in times]}


# ---------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(run: Callable, prepare: Callable | None, inputs: list, device: torch.device, *,
               min_reps: int = 5, max_reps: int = 30, min_time: float = 1.0) -> dict:
    """Statistics of ``run(inputs[i], state)`` with ``state = prepare(inputs[i])`` untimed.

    Repeats at least ``min_reps`` and at most ``max_reps`` times, and until
    ``min_time`` seconds of wall time have passed; input sets rotate. Warm-up
    is the caller's job (the first calls of a backend may compile).
    """
    times, cpu_times = [], []
    began = time.perf_counter()
    i = 0
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - began < min_time):
        inp = inputs[i % len(inputs)]
        i += 1
        state = prepare(inp) if prepare is not None else None
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = run(inp, state)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            c0, t0 = time.process_time(), time.perf_counter()
            result = run(inp, state)
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
        del result, state
    stats = summarize(times)
    if cpu_times:  # CPU seconds of this process, all threads: less sensitive to other load than wall time
        stats["cpu_time_median"] = summarize(cpu_times)["median"]
    return stats


# ---------------------------------------------------------------- memory


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_peak_extra(run: Callable) -> tuple[int | None, object]:
    """Growth of the resident set's high-water mark during ``run()`` (Linux), and its result."""
    gc.collect()
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return None, run()
    base = _status_kib("VmRSS")
    result = run()
    peak = _status_kib("VmHWM")
    if base is None or peak is None:
        return None, result
    return max(0, peak - base) * 1024, result


def _profiler_allocations(prof) -> list[tuple[int, int]]:
    from torch._C._profiler import _EventType

    allocations = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            fields = node.extra_fields
            if fields.device.type == "cpu":
                allocations.append((node.start_time_ns, int(fields.alloc_size)))
        stack.extend(node.children)
    allocations.sort(key=lambda a: a[0])
    return allocations


def cpu_allocator_peak_extra(run: Callable) -> tuple[int, object]:
    """Peak of the bytes allocated through torch's CPU allocator during ``run()``, and its result."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = run()
    current = peak = 0
    for _, size in _profiler_allocations(prof):
        current += size
        peak = max(peak, current)
    return peak, result


def peak_extra_memory(run: Callable, device: torch.device) -> dict:
    """Peak memory that ``run()`` allocates beyond what existed before; its result is kept until the end.

    Returns {"bytes": int | None, "method": str}.
    """
    if device.type == "cuda":
        gc.collect()
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = run()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del result
        return {"bytes": int(peak), "method": "cuda-max-memory-allocated"}
    try:
        peak, result = cpu_allocator_peak_extra(run)
        del result
        return {"bytes": int(peak), "method": "cpu-allocator"}
    except Exception:  # the profiler's event tree is private API: fall back rather than fail
        peak, result = rss_peak_extra(run)
        del result
        return {"bytes": peak, "method": "rss-high-water"}


# ---------------------------------------------------------------- inputs


def make_head_inputs(batch: int, channels: int, height: int, width: int, dtype: torch.dtype,
                     device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A VJP-like map R (leaf, requires grad) and an image x, contiguous, of ``dtype``.

    R looks like an input gradient of a ReLU network: small (about 1e-4), a
    smooth object region of larger magnitude, 30 % exact zeros. The values
    matter to selection-based kernels, so benchmarks should not use plain
    Gaussian noise.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (batch, channels, height, width)
    ys = torch.arange(height, device=device, dtype=torch.float32).view(1, 1, height, 1)
    xs = torch.arange(width, device=device, dtype=torch.float32).view(1, 1, 1, width)
    cy = torch.rand(batch, 1, 1, 1, generator=gen, device=device) * height
    cx = torch.rand(batch, 1, 1, 1, generator=gen, device=device) * width
    sigma = max(height, width) / 6.0
    blob = torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * sigma * sigma))
    R = torch.randn(shape, generator=gen, device=device) * (0.1 + blob) * 1e-4
    R = R * (torch.rand(shape, generator=gen, device=device) >= 0.3)
    x = torch.rand(shape, generator=gen, device=device)
    return R.to(dtype).requires_grad_(True), x.to(dtype)


def rotation_count(set_bytes: int, cache: int, budget: int, *, most: int = 8) -> int:
    """How many input sets to rotate over so that their total exceeds twice the cache.

    At least 2 (so consecutive calls never see the same tensors) unless even
    2 sets would exceed ``budget`` bytes, at most ``most``.
    """
    want = max(2, min(most, math.ceil(2 * cache / max(1, set_bytes)) + 1))
    while want > 1 and want * set_bytes > budget:
        want -= 1
    return want
