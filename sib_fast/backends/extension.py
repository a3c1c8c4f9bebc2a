"""The ``cpu`` and ``cuda`` backends: the fused ops of the extension ``sib_fast._C``.

The op schemas live in ``csrc/sib_head.cpp`` and the kernels in ``csrc/cpu``
and ``csrc/cuda``; the dispatcher picks the kernel by device. This module adds
what Python registers for them: the autograd formula (the fused backward op)
and fake kernels, so the ops trace under ``torch.compile``.
"""
from __future__ import annotations

import torch

import sib_fast._C  # noqa: F401  (loads the library, which registers the ops)
from sib_fast.backends.dispatch import refuse_higher_order_gradient
from sib_fast.backends.reference import compute_dtype

# Layout of the saved tensors; must match csrc/sib_head.h.
IMAGE_STATS = 6  # lo, q80, hi, t2, background sum, background sum of squares
QUANTILES = 4  # Q(a, 0.05), Q(a, 0.80), Q(a, 0.95), Q(d, 0.80)
RANK_WINDOW = 18  # ranks floor(t) - 8 .. floor(t) + 9 (SPEC section 2)

_forward = torch.ops.sib_fast.sib_head_forward
_backward = torch.ops.sib_fast.sib_head_backward


@torch.library.register_fake("sib_fast::sib_head_forward")
def _forward_fake(R, x, window_size, temperature, slope):
    dtype = compute_dtype(R, x)
    B, _, H, W = R.shape
    return (R.new_empty((), dtype=dtype), R.new_empty((), dtype=dtype), R.new_empty((B, H, W), dtype=dtype),
            R.new_empty((2, B, B), dtype=dtype), R.new_empty((B, IMAGE_STATS), dtype=dtype),
            R.new_empty((B, QUANTILES, RANK_WINDOW), dtype=torch.int64))


@torch.library.register_fake("sib_fast::sib_head_backward")
def _backward_fake(grad_hsic, grad_bg, grad_mask, R, x, mask, gram, image_stats, rank_index,
                   window_size, temperature, slope, compute_grad_x):
    return torch.empty_like(R), (torch.empty_like(x) if compute_grad_x else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    R, x, window_size, temperature, slope = inputs
    _, _, mask, gram, image_stats, rank_index = output
    ctx.save_for_backward(R, x, mask, gram, image_stats, rank_index)
    ctx.hyperparameters = (window_size, temperature, slope)
    # An unused mask would otherwise get a (B, H, W) tensor of zeros as its gradient.
    ctx.set_materialize_grads(False)


def _head_backward(ctx, grad_hsic, grad_bg, grad_mask, *_unused_saved_grads):
    R, x, mask, gram, image_stats, rank_index = ctx.saved_tensors
    # an output the loss does not use has no gradient (materialize_grads off): 0-dim zeros
    grad_hsic = gram.new_zeros(()) if grad_hsic is None else grad_hsic
    grad_bg = gram.new_zeros(()) if grad_bg is None else grad_bg
    want_grad_x = ctx.needs_input_grad[1]
    grad_R, grad_x = _backward(grad_hsic, grad_bg, grad_mask, R, x, mask, gram, image_stats, rank_index,
                               *ctx.hyperparameters, want_grad_x)
    return grad_R, (grad_x if want_grad_x else None), None, None, None


torch.library.register_autograd("sib_fast::sib_head_forward", _head_backward, setup_context=_setup_context)
torch.library.register_autograd("sib_fast::sib_head_backward", refuse_higher_order_gradient,
                                setup_context=lambda ctx, inputs, output: None)


def sib_terms(R, x, window_size, temperature, slope):
    hsic, bg, mask, *_ = _forward(R, x, window_size, temperature, slope)
    return hsic, bg, mask


def spatial_mask(R, window_size, temperature, slope):
    # The mask is a by-product of the head; x = R.detach() only feeds the HSIC it ignores.
    return _forward(R, R.detach(), window_size, temperature, slope)[2]
