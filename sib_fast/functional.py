"""The functional API: ``spatial_mask`` and ``sib_terms``, validated and dispatched."""
from __future__ import annotations

from typing import NamedTuple

import torch

from sib_fast.backends.dispatch import backend_module, resolve_backend
from sib_fast.backends.reference import whole_image_window
from sib_fast.validation import check_head_inputs, check_mask_inputs


class SIBTerms(NamedTuple):
    """The S-IB head's outputs (docs/loss.md sections 3-5).

    ``hsic`` and ``bg`` are 0-dim, ``mask`` is (B, H, W); all in float32, or
    float64 when an input is float64.
    """
    hsic: torch.Tensor
    bg: torch.Tensor
    mask: torch.Tensor


def _backend_for(R: torch.Tensor, backend: str, temperature: float):
    return backend_module(resolve_backend(R.device, backend, float(temperature), R.dtype))


def _window_for(R: torch.Tensor, window_size: int) -> int:
    # every window from whole_image_window up gives the same mask (M = 1/2): run the smallest,
    # so that any odd window, 2**64 + 1 included, fits the kernels' integers
    return min(int(window_size), whole_image_window(R.shape[2], R.shape[3]))


def spatial_mask(R: torch.Tensor, *, window_size: int = 31, temperature: float = 0.1,
                 slope: float = 10.0, backend: str = "auto") -> torch.Tensor:
    """The soft foreground mask M (B, H, W) of the VJP map R (docs/loss.md section 3)."""
    check_mask_inputs(R, window_size, temperature, slope)
    module = _backend_for(R, backend, temperature)
    return module.spatial_mask(R, _window_for(R, window_size), float(temperature), float(slope))


def sib_terms(R: torch.Tensor, x: torch.Tensor, *, window_size: int = 31, temperature: float = 0.1,
              slope: float = 10.0, backend: str = "auto") -> SIBTerms:
    """HSIC, background variance and mask of R and x (docs/loss.md sections 3-5).

    Differentiable with respect to R, and to x when it requires grad.
    """
    check_head_inputs(R, x, window_size, temperature, slope)
    if R.dtype != x.dtype:  # every backend reads R and x in one dtype; mixed inputs (rare) are promoted
        dtype = torch.promote_types(R.dtype, x.dtype)
        R, x = R.to(dtype), x.to(dtype)
    module = _backend_for(R, backend, temperature)
    return SIBTerms(*module.sib_terms(R, x, _window_for(R, window_size), float(temperature), float(slope)))
