"""The Triton backend's interface: the custom ops ``sib_fast_triton::head_forward``,
``mask_forward`` and ``head_backward``, and ``projection_forward`` / ``projection_backward``
(the random-feature HSIC's projections; schemas, fake kernels, autograd), and the functions
``sib_fast.backends.dispatch`` and ``sib_fast.functional`` call, ``sib_terms``, ``spatial_mask``,
``masked_projection`` and ``projected_terms``.

The ops compose with autograd and ``torch.compile``; their kernels are in the stage modules
of this package (docs/triton.md). Under ``TRITON_INTERPRET=1`` (set before this module is
imported) the kernels run on CPU tensors through Triton's interpreter.
"""
from typing import Optional

import torch

from sib_fast.backends.autograd import refuse_higher_order_gradient
from sib_fast.backends.reference import compute_dtype
from sib_fast.backends.triton.buffers import N_WINDOWS, SLOTS, STATS
from sib_fast.backends.triton.launch import (launch_head_backward, launch_head_forward, launch_mask_forward,
                                             launch_projection_backward, launch_projection_forward)

Tensor = torch.Tensor


@torch.library.custom_op("sib_fast_triton::head_forward", mutates_args=())
def head_forward(R: Tensor, x: Tensor, window_size: int, temperature: float, slope: float
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(hsic, bg, mask, stats, sel_idx, sel_w, gram); the last five are saved for the backward."""
    return launch_head_forward(R, x, window_size, temperature, slope)


@head_forward.register_fake
def _head_forward_fake(R, x, window_size, temperature, slope):
    ct = compute_dtype(R, x)
    B, _, H, W = R.shape
    return (R.new_empty((), dtype=ct), R.new_empty((), dtype=ct), R.new_empty((B, H, W), dtype=ct),
            R.new_empty((B, STATS), dtype=ct),
            R.new_empty((B, N_WINDOWS, SLOTS), dtype=torch.int32), R.new_empty((B, N_WINDOWS, SLOTS), dtype=ct),
            R.new_empty((2, B, B), dtype=ct))


@torch.library.custom_op("sib_fast_triton::mask_forward", mutates_args=())
def mask_forward(R: Tensor, window_size: int, temperature: float, slope: float
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(mask, stats, sel_idx, sel_w): the mask chain alone."""
    return launch_mask_forward(R, window_size, temperature, slope)


@mask_forward.register_fake
def _mask_forward_fake(R, window_size, temperature, slope):
    ct = compute_dtype(R)
    B, _, H, W = R.shape
    return (R.new_empty((B, H, W), dtype=ct), R.new_empty((B, STATS), dtype=ct),
            R.new_empty((B, N_WINDOWS, SLOTS), dtype=torch.int32), R.new_empty((B, N_WINDOWS, SLOTS), dtype=ct))


@torch.library.custom_op("sib_fast_triton::head_backward", mutates_args=())
def head_backward(grad_hsic: Optional[Tensor], grad_bg: Optional[Tensor], grad_mask: Optional[Tensor],
                  R: Tensor, x: Tensor, mask: Tensor, stats: Tensor, sel_idx: Tensor,
                  sel_w: Tensor, gram: Tensor, window_size: int, temperature: float, slope: float,
                  head: bool, grad_x: bool) -> tuple[Tensor, Tensor]:
    """(dR, dx); dx is empty unless head and grad_x."""
    return launch_head_backward(grad_hsic, grad_bg, grad_mask, R, x, mask, stats, sel_idx, sel_w, gram,
                                window_size, temperature, slope, head, grad_x)


@head_backward.register_fake
def _head_backward_fake(grad_hsic, grad_bg, grad_mask, R, x, mask, stats, sel_idx, sel_w, gram,
                        window_size, temperature, slope, head, grad_x):
    return torch.empty_like(R), (torch.empty_like(x) if (head and grad_x) else x.new_empty(0))


def _head_setup_context(ctx, inputs, output):
    R, x, window_size, temperature, slope = inputs
    _, _, mask, stats, sel_idx, sel_w, gram = output
    ctx.save_for_backward(R, x, mask, stats, sel_idx, sel_w, gram)
    ctx.hyperparameters = (window_size, temperature, slope)
    ctx.mark_non_differentiable(stats, sel_idx, sel_w, gram)
    # Unused outputs would otherwise get (B, H, W) planes of zeros as their gradients.
    ctx.set_materialize_grads(False)


def _head_autograd(ctx, grad_hsic, grad_bg, grad_mask, *_unused):
    R, x, mask, stats, sel_idx, sel_w, gram = ctx.saved_tensors
    want_dx = ctx.needs_input_grad[1]
    dR, dx = head_backward(grad_hsic, grad_bg, grad_mask, R, x, mask, stats, sel_idx, sel_w, gram,
                           *ctx.hyperparameters, True, want_dx)
    return dR, (dx if want_dx else None), None, None, None


head_forward.register_autograd(_head_autograd, setup_context=_head_setup_context)


def _mask_setup_context(ctx, inputs, output):
    R, window_size, temperature, slope = inputs
    mask, stats, sel_idx, sel_w = output
    ctx.save_for_backward(R, mask, stats, sel_idx, sel_w)
    ctx.hyperparameters = (window_size, temperature, slope)
    ctx.mark_non_differentiable(stats, sel_idx, sel_w)
    ctx.set_materialize_grads(False)


def _mask_autograd(ctx, grad_mask, *_unused):
    if grad_mask is None:
        return None, None, None, None
    R, mask, stats, sel_idx, sel_w = ctx.saved_tensors
    dR, _ = head_backward(None, None, grad_mask, R, R, mask, stats, sel_idx, sel_w, R.new_empty(0),
                          *ctx.hyperparameters, False, False)
    return dR, None, None, None


mask_forward.register_autograd(_mask_autograd, setup_context=_mask_setup_context)
head_backward.register_autograd(refuse_higher_order_gradient, setup_context=lambda ctx, inputs, output: None)


@torch.library.custom_op("sib_fast_triton::projection_forward", mutates_args=())
def projection_forward(R: Tensor, x: Tensor, mask: Tensor, features: int, seed: int) -> tuple[Tensor, Tensor]:
    """(proj (2, B, features), sq (2, B)): u @ W, v @ W and ||u||^2, ||v||^2 (projection.py)."""
    return launch_projection_forward(R, x, mask, features, seed)


@projection_forward.register_fake
def _projection_forward_fake(R, x, mask, features, seed):
    ct = compute_dtype(R, x)
    B = R.shape[0]
    return R.new_empty((2, B, features), dtype=ct), R.new_empty((2, B), dtype=ct)


@torch.library.custom_op("sib_fast_triton::projection_backward", mutates_args=())
def projection_backward(grad_proj: Tensor, grad_sq: Optional[Tensor], R: Tensor, x: Tensor, mask: Tensor,
                        features: int, seed: int, compute_grad_x: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_R, grad_x, grad_mask); grad_x is empty unless compute_grad_x."""
    return launch_projection_backward(grad_proj, grad_sq, R, x, mask, features, seed, compute_grad_x)


@projection_backward.register_fake
def _projection_backward_fake(grad_proj, grad_sq, R, x, mask, features, seed, compute_grad_x):
    return (torch.empty_like(R), torch.empty_like(x) if compute_grad_x else x.new_empty(0),
            mask.new_empty((R.shape[0], *R.shape[2:])))


def _projection_setup_context(ctx, inputs, output):
    R, x, mask, features, seed = inputs
    ctx.save_for_backward(R, x, mask)
    ctx.hyperparameters = (features, seed)
    ctx.set_materialize_grads(False)  # sq unused: no (2, B) of zeros, and no 2 gS u term


def _projection_autograd(ctx, grad_proj, grad_sq):
    R, x, mask = ctx.saved_tensors
    if grad_proj is None:
        if grad_sq is None:
            return None, None, None, None, None
        grad_proj = R.new_zeros((2, R.shape[0], ctx.hyperparameters[0]), dtype=compute_dtype(R, x))
    want_dx = ctx.needs_input_grad[1]
    dR, dx, dM = projection_backward(grad_proj, grad_sq, R, x, mask, *ctx.hyperparameters, want_dx)
    return (dR if ctx.needs_input_grad[0] else None, dx if want_dx else None,
            dM if ctx.needs_input_grad[2] else None, None, None)


projection_forward.register_autograd(_projection_autograd, setup_context=_projection_setup_context)
projection_backward.register_autograd(refuse_higher_order_gradient, setup_context=lambda ctx, inputs, output: None)


# the backend interface (sib_fast.backends.dispatch, sib_fast.functional)

def sib_terms(R, x, window_size, temperature, slope):
    """(hsic, bg, mask) of docs/loss.md sections 3-5; differentiable in R and x."""
    hsic, bg, mask, *_ = head_forward(R, x, int(window_size), float(temperature), float(slope))
    return hsic, bg, mask


def spatial_mask(R, window_size, temperature, slope):
    """The mask M of docs/loss.md section 3; differentiable in R."""
    return mask_forward(R, int(window_size), float(temperature), float(slope))[0]


def masked_projection(R, x, mask, features, seed):
    """(proj, sq) of the random-feature HSIC (projection.py); differentiable in R, x and mask."""
    return projection_forward(R, x, mask, int(features), int(seed))


def projected_terms(R, x, window_size, temperature, slope, features, seed):
    """(proj, sq, bg, mask) of the random-feature HSIC's fused path: the head for bg and the mask, then
    the projections; autograd adds the two R-sized gradients (the cpu backend adds in place)."""
    _, bg, mask = sib_terms(R, x, window_size, temperature, slope)
    proj, sq = masked_projection(R, x, mask, features, seed)
    return proj, sq, bg, mask
