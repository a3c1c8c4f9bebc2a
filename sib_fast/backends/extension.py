"""The ``cpu`` and ``cuda`` backends: the fused ops of the compiled extension ``sib_fast._C``.

The op schemas live in ``csrc/sib_head_schema.h`` and the kernels in ``csrc/cpu`` and
``csrc/cuda``; the dispatcher picks the kernel by device. Importing this module loads the
library and registers the ops' autograd formula and fake kernels (``backends/autograd.py``).
"""
from __future__ import annotations

import torch

import sib_fast._C  # noqa: F401  (loads the library, which registers the ops)
from sib_fast.backends.autograd import projected_head, register_head_ops, register_projection_ops

register_head_ops("sib_fast")
register_projection_ops("sib_fast")
_forward = torch.ops.sib_fast.sib_head_forward
_projection = torch.ops.sib_fast.masked_projection_forward
_projected_head = projected_head("sib_fast")


def sib_terms(R, x, window_size, temperature, slope):
    hsic, bg, mask, *_ = _forward(R, x, window_size, temperature, slope)
    return hsic, bg, mask


def spatial_mask(R, window_size, temperature, slope):
    # The mask is a by-product of the head; x = R.detach() only feeds the HSIC it ignores.
    return _forward(R, R.detach(), window_size, temperature, slope)[2]


def masked_projection(R, x, mask, features, seed):
    """(proj, sq) of docs/loss.md section 4b's fused projection, W never stored (docs/random_features.md)."""
    return _projection(R, x, mask, features, seed)


def projected_terms(R, x, window_size, temperature, slope, features, seed):
    """(proj, sq, bg, mask) of the random-feature HSIC's fused path: one autograd node whose backward
    adds the head's gradient into the projection's (on CPU in place; CUDA adds a second tensor)."""
    return _projected_head(R, x, window_size, temperature, slope, features, seed)
