"""The functional API: ``spatial_mask`` and ``sib_terms``, validated and dispatched."""
from __future__ import annotations

from typing import NamedTuple

import torch

from sib_fast.backends.dispatch import backend_module, resolve_backend
from sib_fast.backends.random_features import projected_hsic
from sib_fast.backends.reference import whole_image_window
from sib_fast.validation import check_head_inputs, check_mask_inputs, check_random_features


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
              slope: float = 10.0, backend: str = "auto", hsic_features: int | None = None,
              projection_seed: int | None = None) -> SIBTerms:
    """HSIC, background variance and mask of R and x (docs/loss.md sections 3-5).

    With ``hsic_features`` F, hsic is the random-feature HSIC_F of docs/loss.md section 4b: U and
    V projected by the D x F Gaussian matrix of ``projection_seed`` (an int in [0, 2**63),
    required then), which the fused backends never store (docs/random_features.md). bg and
    the mask do not change. Differentiable with respect to R, and to x when it requires grad.
    """
    check_head_inputs(R, x, window_size, temperature, slope)
    check_random_features(R, hsic_features, projection_seed)
    if R.dtype != x.dtype:  # every backend reads R and x in one dtype; mixed inputs (rare) are promoted
        dtype = torch.promote_types(R.dtype, x.dtype)
        R, x = R.to(dtype), x.to(dtype)
    window = _window_for(R, window_size)
    if hsic_features is None:
        module = _backend_for(R, backend, temperature)
        return SIBTerms(*module.sib_terms(R, x, window, float(temperature), float(slope)))
    name = resolve_backend(R.device, backend, float(temperature), R.dtype, projection=True)
    module = backend_module(name)
    features, seed = int(hsic_features), int(projection_seed)
    if name == "reference":  # docs/loss.md section 4b as written, W materialised
        return SIBTerms(*module.sib_terms(R, x, window, float(temperature), float(slope), features, seed))
    # the fused head for bg and the mask (its own hsic unused), the fused projections for HSIC_F
    proj, sq, bg, mask = module.projected_terms(R, x, window, float(temperature), float(slope), features, seed)
    return SIBTerms(projected_hsic(proj, sq), bg, mask)
