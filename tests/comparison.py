"""Comparison against the float64 reference, with a report that says where it differs."""
from __future__ import annotations

import torch

# Error allowed relative to the reference's scale, per dtype of the backend's inputs.
RELATIVE_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 1e-4, torch.float16: 1e-4}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (both in float64)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = expected.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    return ((actual - expected).abs().max() / scale).item()


def assert_matches_reference(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != reference {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(e).all(), f"{what}: the reference itself is not finite"
    err = relative_error(a, e)
    if not err <= rtol:  # also catches NaN
        diff = (a - e).abs()
        worst = torch.unravel_index(torch.nan_to_num(diff, nan=float("inf")).argmax(), diff.shape)
        worst = tuple(int(i) for i in worst)
        bad = (diff > rtol * e.abs().max()).sum().item()
        raise AssertionError(
            f"{what}: relative error {err:.3e} > {rtol:.1e}; {bad} of {e.numel()} elements off; "
            f"worst at {worst}: got {a[worst].item():.10e}, reference {e[worst].item():.10e}; "
            f"reference max |.| {e.abs().max().item():.3e}")
