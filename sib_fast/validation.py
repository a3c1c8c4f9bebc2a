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
