"""What the benchmarks run the S-IB head on: the device, the lanes (each backend, and
``torch.compile`` of the reference) as functions, their fixed upstream gradients, and the
error of a lane's result against the eager reference's.
"""
from __future__ import annotations

import math

import torch

from sib_fast import sib_terms
from sib_fast.backends import reference
from sib_fast.backends.dispatch import BACKEND_NAMES, available_backends
from sib_fast.cli_errors import UsageError

COMPILE_LANE = "reference+compile"
# fixed upstream gradients of (hsic, bg): not 1, so a backward that ignores them shows up
UPSTREAM = (0.75, -1.25)


def resolve_device(text: str) -> torch.device:
    """``--device``: cpu, cuda, cuda:N or auto (cuda when available), with an index on cuda."""
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


def fused_backends(device: torch.device) -> list[str]:
    """The fused backends worth timing on ``device``."""
    fused = [b for b in available_backends(device) if b != "reference"]
    if device.type == "cpu":
        fused = [b for b in fused if b != "triton"]  # the interpreter is for tests, not timing
    return fused


def select_lanes(spec: str, device: torch.device, no_compile: bool) -> list[str]:
    """The head lanes to run: eager reference first, then the fused backends, then torch.compile.

    torch.compile is last because its first call compiles for tens of seconds: a run cut short
    (Ctrl-C, a time limit) still has the fused rows of every shape it reached."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    lanes: list[str] = []
    for name in names:
        if name == "all":
            wanted = ["reference"] + fused_backends(device) + [COMPILE_LANE]
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


def lane_function(lane: str, window: int, temperature: float = 0.1, slope: float = 10.0):
    """``fn(R, x) -> (hsic, bg, mask)`` for a lane."""
    if lane == COMPILE_LANE:
        torch._dynamo.reset()  # each shape compiles anew; keep the cache from hitting its limit
        compiled = torch.compile(reference.sib_terms, dynamic=False)
        return lambda R, x: compiled(R, x, window, temperature, slope)
    return lambda R, x: tuple(sib_terms(R, x, window_size=window, temperature=temperature, slope=slope,
                                        backend=lane))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference over the largest expected magnitude; inf when not finite."""
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = expected.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    err = ((actual - expected).abs().max() / scale).item()
    return err if math.isfinite(err) else float("inf")
