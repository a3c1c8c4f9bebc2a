"""Where the head's time goes, for ``sib-bench --profile``: the GPU kernels (or, on CPU, the
operators) of one forward+backward, from ``torch.profiler``, with their share of the total.

The timings say how far a backend is from the floor; this says which kernel to look at.
Device time is what the kernels ran on the GPU (gaps between launches are not in it);
CPU time is each operator's self time.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

NAME_WIDTH = 90
# namespaces that only lengthen the demangled names of the CUDA backend's kernels
_NAMESPACES = ("sib_fast::cuda::", "(anonymous namespace)::", "c10::")


def short_name(name: str) -> str:
    """A kernel's name without its return type, parameter list and our namespaces, so that
    template arguments (which tell the backward's two passes apart) survive the cut."""
    name = name.removeprefix("void ")
    for ns in _NAMESPACES:
        name = name.replace(ns, "")
    depth = 0
    for i, ch in enumerate(name):
        depth += {"<": 1, ">": -1}.get(ch, 0)
        if ch == "(" and depth == 0 and i > 0:  # the parameter list
            name = name[:i]
            break
    return name if len(name) <= NAME_WIDTH else name[:NAME_WIDTH - 3] + "..."


def kernel_breakdown(run: Callable[[], object], device: torch.device, top: int = 10) -> dict:
    """Profiles one ``run()`` (warm it up first) and returns {"method", "total_us", "entries"};
    each entry {"name", "calls", "us", "share"}, the ``top`` largest first."""
    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    # a first session, thrown away, takes the profiler's start-up cost off the recorded events
    for _ in range(2):
        if on_gpu:
            torch.cuda.synchronize(device)
        with profile(activities=activities) as prof:
            run()
            if on_gpu:
                torch.cuda.synchronize(device)
    times: dict[str, list] = {}
    for event in prof.key_averages():
        if on_gpu:
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = event.self_device_time_total
        else:
            us = event.self_cpu_time_total
        if us > 0:
            entry = times.setdefault(short_name(event.key), [0, 0.0])
            entry[0] += event.count
            entry[1] += us
    total = sum(us for _, us in times.values())
    ranked = sorted(times.items(), key=lambda item: -item[1][1])[:top]
    return {"method": "device time of CUDA kernels" if on_gpu else "self CPU time of operators",
            "total_us": total,
            "entries": [{"name": name, "calls": calls, "us": us, "share": us / total if total else 0.0}
                        for name, (calls, us) in ranked]}


def profile_table(rows: list[dict]) -> str:
    """Markdown: for each profiled row, its largest kernels or operators."""
    lines = []
    for row in rows:
        prof = row.get("profile")
        if not prof:
            continue
        lines += ["", f"{row['backend']}, {row['dtype']}, B={row['batch']}: {prof['method']}, "
                      f"{prof['total_us'] / 1e3:.3f} ms in all", "",
                  "| kernel / operator | calls | ms | share |", "|---|---|---|---|"]
        for e in prof["entries"]:
            name = e["name"].replace("|", "\\|")
            lines.append(f"| `{name}` | {e['calls']} | {e['us'] / 1e3:.3f} | {100 * e['share']:.1f}% |")
    return "\n".join(lines)
