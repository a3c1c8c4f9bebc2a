"""Machine description and measured copy bandwidth for ``sib-bench``.

Everything a benchmark record needs to be comparable later: the CPU model or
GPU name and driver, library versions, the git commit of the code that ran,
and the machine's own memory bandwidth measured in the same run (a large
tensor copy, counted as bytes read plus bytes written, the same convention as
the floor bytes of docs/loss.md section 7).
"""
from __future__ import annotations

import datetime
import importlib.metadata
import math
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import torch

_LIBRARIES = ("torch", "torchvision", "triton", "numpy", "matplotlib", "pytest-benchmark", "sib_fast")


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def cpu_model() -> str:
    text = _read("/proc/cpuinfo") or ""
    for line in text.splitlines():
        if line.lower().startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def last_level_cache_bytes() -> int | None:
    """The CPU's largest cache in bytes (Linux sysfs), or None if unknown."""
    sizes = []
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        text = _read(str(index / "size"))
        if not text:
            continue
        text = text.strip().upper()
        scale = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * scale)
        except ValueError:
            continue
    return max(sizes) if sizes else None


def total_ram_bytes() -> int | None:
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return None


def available_ram_bytes() -> int | None:
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def _nvidia_smi_driver() -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0].strip() if out.strip() else None


def gpu_info(device: torch.device) -> dict:
    """Name, driver, memory and the datasheet bandwidth (from clock x bus width) of a CUDA device."""
    props = torch.cuda.get_device_properties(device)
    info = {
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "total_memory_bytes": int(props.total_memory),
        "multiprocessors": int(props.multi_processor_count),
        "driver": _nvidia_smi_driver(),
        "cuda_runtime": torch.version.cuda,
        "l2_cache_bytes": getattr(props, "L2_cache_size", None),
    }
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None)
    if clock_khz and bus_bits:
        # double data rate: two transfers per memory clock
        info["datasheet_bandwidth_GBps"] = 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9
    return info


def library_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    versions["torch"] = torch.__version__  # with its local tag (+cu130, +cpu)
    versions["torch_cuda"] = torch.version.cuda
    return versions


def git_state() -> dict:
    """Commit (and whether the tree has uncommitted changes) of the checkout this package runs from."""
    root = Path(__file__).resolve().parent.parent
    state = {"commit": None, "dirty": None}
    if shutil.which("git") is None:
        return state
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=20)
        if commit.returncode != 0:
            return state
        state["commit"] = commit.stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=20)
        state["dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return state


def load_average() -> float | None:
    """The 1-minute load average: above the core count, other work competed for the CPUs."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def machine_info(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_bytes": total_ram_bytes(),
        "cpu_last_level_cache_bytes": last_level_cache_bytes(),
        "loadavg_1min_at_start": load_average(),
    }
    if device.type == "cuda":
        info["gpu"] = gpu_info(device)
    return info


def device_label(machine: dict, device_type: str) -> str:
    """A short name of the machine that ran: the GPU name, or the CPU model and thread count."""
    if device_type == "cuda" and machine.get("gpu"):
        return machine["gpu"]["name"]
    return f"{machine.get('cpu_model', 'CPU')} ({machine.get('torch_threads')} threads)"


def cache_bytes(device: torch.device) -> int:
    """The cache that could flatter repeated runs on ``device`` (GPU L2, CPU last level)."""
    if device.type == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", None)
        return int(l2) if l2 else 64 * 1024 ** 2
    return last_level_cache_bytes() or 64 * 1024 ** 2


def copy_bandwidth(device: torch.device, nbytes: int | None = None, reps: int = 15) -> dict:
    """Measured copy bandwidth of ``device`` in GB/s: (bytes read + bytes written) / time of dst.copy_(src).

    The buffers are at least 8 times the cache (so the copy streams from
    memory); the median of ``reps`` copies after two warm-up copies.
    """
    if nbytes is None:
        floor = 1024 ** 3 if device.type == "cuda" else 256 * 1024 ** 2
        nbytes = max(floor, 8 * cache_bytes(device))
        if device.type == "cpu":
            avail = available_ram_bytes()
            if avail:
                nbytes = min(nbytes, avail // 8)
        else:
            free, _ = torch.cuda.mem_get_info(device)
            nbytes = min(nbytes, free // 8)
    n = max(1, nbytes // 4)
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(reps + 2):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            elapsed = time.perf_counter() - t0
        if i >= 2:
            times.append(elapsed)
    times.sort()
    median = times[len(times) // 2] if len(times) % 2 else 0.5 * (times[len(times) // 2 - 1] + times[len(times) // 2])
    moved = 2 * n * 4
    del src, dst
    return {"GBps": moved / median / 1e9, "bytes_moved": moved, "median_s": median,
            "best_GBps": moved / min(times) / 1e9, "reps": reps,
            "method": "dst.copy_(src) of a float32 buffer, (read + write bytes) / median time"}


def finite_or_none(value):
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None
