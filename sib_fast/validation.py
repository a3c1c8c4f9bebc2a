"""Argument checks of docs/loss.md section 8, run before any work.

Every message names the argument and says what was expected, so a user can
fix the call without reading the source.
"""
from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_map(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), got {t.dtype}")
    if t.dim() != 4:
        raise ValueError(f"{name} must have shape (B, C, H, W), got {tuple(t.shape)}")
    B, C, H, W = t.shape
    if B < 2:
        raise ValueError(f"{name} must hold a batch of at least 2 images (HSIC needs B >= 2), got B={B}")
    if C * H * W < 2:
        raise ValueError(f"{name} must hold at least 2 values per image (C*H*W >= 2), got {C}x{H}x{W}")


def check_hyperparameters(window_size, temperature, slope) -> None:
    if isinstance(window_size, bool) or not isinstance(window_size, numbers.Integral):
        raise TypeError(f"window_size must be an int, got {type(window_size).__name__}")
    if window_size <= 0 or window_size % 2 == 0:
        raise ValueError(f"window_size must be a positive odd integer, got {window_size}")
    for name, value in (("temperature", temperature), ("slope", slope)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value}")


def check_mask_inputs(R, window_size, temperature, slope) -> None:
    _check_map("R", R)
    check_hyperparameters(window_size, temperature, slope)


def check_head_inputs(R, x, window_size, temperature, slope) -> None:
    _check_map("R", R)
    _check_map("x", x)
    if R.shape != x.shape:
        raise ValueError(f"R and x must have the same shape, got R {tuple(R.shape)} and x {tuple(x.shape)}")
    if R.device != x.device:
        raise ValueError(f"R and x must be on the same device, got R on {R.device} and x on {x.device}")
    check_hyperparameters(window_size, temperature, slope)


MAX_PROJECTION_SEED = 2**63 - 1  # seeds are 0 .. 2**63 - 1 (random_features.keys reads 63 bits)
MAX_HSIC_FEATURES = 2**31 - 1
MAX_PROJECTED_VALUES = 2**32  # the generator's row index d is 32 bits


def check_hsic_features(hsic_features) -> None:
    """None, or the number of random features F of docs/loss.md section 4b: an int >= 1."""
    if hsic_features is None:
        return
    if isinstance(hsic_features, bool) or not isinstance(hsic_features, numbers.Integral):
        raise TypeError(f"hsic_features must be an int (the number of random features F) or None, "
                        f"got {type(hsic_features).__name__}")
    if not 1 <= hsic_features <= MAX_HSIC_FEATURES:
        raise ValueError(f"hsic_features must be between 1 and {MAX_HSIC_FEATURES}, got {hsic_features}")


def check_random_features(R, hsic_features, projection_seed) -> None:
    """docs/loss.md section 4b's arguments: F an int >= 1, the seed an int in [0, 2**63), both or neither."""
    if hsic_features is None:
        if projection_seed is not None:
            raise ValueError("projection_seed is only used with hsic_features (the random-feature HSIC); "
                             "pass hsic_features=F or leave projection_seed out")
        return
    check_hsic_features(hsic_features)
    if projection_seed is None:
        raise TypeError("projection_seed is required with hsic_features: an int in [0, 2**63) that fixes the "
                        "random matrix W (SIBLoss draws one per call)")
    if isinstance(projection_seed, bool) or not isinstance(projection_seed, numbers.Integral):
        raise TypeError(f"projection_seed must be an int, got {type(projection_seed).__name__}")
    if not 0 <= projection_seed <= MAX_PROJECTION_SEED:
        raise ValueError(f"projection_seed must be between 0 and 2**63 - 1, got {projection_seed}")
    values = R[0].numel()
    if values > MAX_PROJECTED_VALUES:
        raise ValueError(f"R must hold at most 2**32 values per image (C*H*W) for hsic_features, got {values}")
