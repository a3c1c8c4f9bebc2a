"""Autograd and fake kernels of the fused head ops, registered once for any op namespace.

The compiled extension registers ``sib_fast::sib_head_forward`` and ``sib_head_backward``
and the random-feature HSIC's ``masked_projection_forward`` and ``_backward`` (schemas in
``csrc/sib_head_schema.h``); the CUDA emulation test registers the same ops as
``sib_fast_emu::``. ``register_head_ops`` and ``register_projection_ops`` give either
namespace's pairs their autograd formula (the backward op) and fake kernels (so the ops trace
under ``torch.compile``). ``projected_head`` joins the two for the random-feature HSIC, so that
its backward adds the head's gradient into the projection's instead of allocating a second one.
"""
from __future__ import annotations

import torch

from sib_fast.backends.constants import IMAGE_STATS, QUANTILES, RANK_WINDOW
from sib_fast.backends.reference import compute_dtype


def refuse_higher_order_gradient(ctx, *grads):
    """The backward of a fused backward op: the fused backends give first derivatives only.

    Registered as the autograd formula of each fused backward op, so that a gradient of a
    gradient (``create_graph=True``, then grad again) raises here instead of autograd's
    fallback silently returning zeros.
    """
    raise RuntimeError(
        "sib_fast: the fused backends ('cpu', 'cuda', 'triton') compute first derivatives of the S-IB "
        "head only; for a gradient of its gradient (double backward through hsic, bg or the mask) use "
        "backend='reference'")


def _forward_fake(R, x, window_size, temperature, slope):
    dtype = compute_dtype(R, x)
    B, _, H, W = R.shape
    return (R.new_empty((), dtype=dtype), R.new_empty((), dtype=dtype), R.new_empty((B, H, W), dtype=dtype),
            R.new_empty((2, B, B), dtype=dtype), R.new_empty((B, IMAGE_STATS), dtype=dtype),
            R.new_empty((B, QUANTILES, RANK_WINDOW), dtype=torch.int64))


def _backward_fake(grad_hsic, grad_bg, grad_mask, R, x, mask, gram, image_stats, rank_index,
                   window_size, temperature, slope, compute_grad_x):
    return torch.empty_like(R), (torch.empty_like(x) if compute_grad_x else x.new_empty(0))


def _backward_add_fake(grad_R, grad_x, grad_mask, grad_hsic, grad_bg, R, x, mask, gram, image_stats, rank_index,
                       window_size, temperature, slope):
    return None


def _setup_context(ctx, inputs, output):
    R, x, window_size, temperature, slope = inputs
    _, _, mask, gram, image_stats, rank_index = output
    ctx.save_for_backward(R, x, mask, gram, image_stats, rank_index)
    ctx.hyperparameters = (window_size, temperature, slope)
    # An unused mask would otherwise get a (B, H, W) tensor of zeros as its gradient.
    ctx.set_materialize_grads(False)


def register_head_ops(namespace: str) -> None:
    """Autograd formula and fake kernels for ``<namespace>::sib_head_forward`` and ``sib_head_backward``."""
    backward_op = getattr(torch.ops, namespace).sib_head_backward

    def head_backward(ctx, grad_hsic, grad_bg, grad_mask, *_unused_saved_grads):
        R, x, mask, gram, image_stats, rank_index = ctx.saved_tensors
        # an output the loss does not use has no gradient (materialize_grads off): 0-dim zeros
        grad_hsic = gram.new_zeros(()) if grad_hsic is None else grad_hsic
        grad_bg = gram.new_zeros(()) if grad_bg is None else grad_bg
        want_grad_x = ctx.needs_input_grad[1]
        grad_R, grad_x = backward_op(grad_hsic, grad_bg, grad_mask, R, x, mask, gram, image_stats, rank_index,
                                     *ctx.hyperparameters, want_grad_x)
        return grad_R, (grad_x if want_grad_x else None), None, None, None

    def backward_add(grad_R, grad_x, grad_mask, grad_hsic, grad_bg, R, x, mask, gram, image_stats, rank_index,
                     window_size, temperature, slope):
        # a device whose kernel does not add in place (CUDA for now): the gradients, then the sum
        out_R, out_x = backward_op(grad_hsic, grad_bg, grad_mask, R, x, mask, gram, image_stats, rank_index,
                                   window_size, temperature, slope, grad_x is not None)
        grad_R.add_(out_R)
        if grad_x is not None:
            grad_x.add_(out_x)

    torch.library.register_fake(f"{namespace}::sib_head_forward")(_forward_fake)
    torch.library.register_fake(f"{namespace}::sib_head_backward")(_backward_fake)
    torch.library.register_fake(f"{namespace}::sib_head_backward_add_")(_backward_add_fake)
    torch.library.register_kernel(f"{namespace}::sib_head_backward_add_", "CompositeExplicitAutograd")(backward_add)
    torch.library.register_autograd(f"{namespace}::sib_head_forward", head_backward, setup_context=_setup_context)
    torch.library.register_autograd(f"{namespace}::sib_head_backward", refuse_higher_order_gradient,
                                    setup_context=lambda ctx, inputs, output: None)


def _projection_forward_fake(R, x, mask, features, seed):
    dtype = compute_dtype(R, x)
    B = R.shape[0]
    return R.new_empty((2, B, features), dtype=dtype), R.new_empty((2, B), dtype=dtype)


def _projection_backward_fake(grad_proj, grad_sq, R, x, mask, features, seed, compute_grad_x):
    return (torch.empty_like(R), torch.empty_like(x) if compute_grad_x else x.new_empty(0),
            torch.empty_like(mask))


def _projection_setup_context(ctx, inputs, output):
    R, x, mask, features, seed = inputs
    ctx.save_for_backward(R, x, mask)
    ctx.projection = (features, seed)
    ctx.set_materialize_grads(False)  # sq's gradient is often None: the op takes None for it


def register_projection_ops(namespace: str) -> None:
    """Autograd formula and fake kernels for ``<namespace>::masked_projection_forward`` and
    ``masked_projection_backward`` (docs/loss.md section 4b; docs/random_features.md)."""
    backward_op = getattr(torch.ops, namespace).masked_projection_backward

    def projection_backward(ctx, grad_proj, grad_sq):
        R, x, mask = ctx.saved_tensors
        features, seed = ctx.projection
        if grad_proj is None:  # only sq used: the op's grad_proj is not optional
            grad_proj = mask.new_zeros((2, R.shape[0], features))
        want_grad_x = ctx.needs_input_grad[1]
        grad_R, grad_x, grad_mask = backward_op(grad_proj, grad_sq, R, x, mask, features, seed, want_grad_x)
        return (grad_R, grad_x if want_grad_x else None, grad_mask if ctx.needs_input_grad[2] else None,
                None, None)

    torch.library.register_fake(f"{namespace}::masked_projection_forward")(_projection_forward_fake)
    torch.library.register_fake(f"{namespace}::masked_projection_backward")(_projection_backward_fake)
    torch.library.register_autograd(f"{namespace}::masked_projection_forward", projection_backward,
                                    setup_context=_projection_setup_context)
    torch.library.register_autograd(f"{namespace}::masked_projection_backward", refuse_higher_order_gradient,
                                    setup_context=lambda ctx, inputs, output: None)


class _RefuseSecondDerivative(torch.autograd.Function):
    """The identity on gradients computed under ``create_graph=True``, tied to the saved inputs:
    differentiating them again raises (``refuse_higher_order_gradient``) instead of giving zeros."""

    @staticmethod
    def forward(ctx, saved, *grads):
        return grads

    backward = staticmethod(refuse_higher_order_gradient)


def projected_head(namespace: str):
    """``(R, x, window_size, temperature, slope, features, seed) -> (proj, sq, bg, mask)``: the
    head's forward op for bg and the mask, then the projection op, as one autograd node
    (docs/random_features.md). Its backward runs the projection's backward first and hands its
    grad_R, grad_x and grad_mask to ``sib_head_backward_add_``, which adds the head's share in
    place: the fused HSIC_F costs no R-sized tensor more than the head alone.
    """
    ops = getattr(torch.ops, namespace)

    def _gradients(ctx, grad_proj, grad_sq, grad_bg, grad_mask, R, x, mask, gram, image_stats, rank_index):
        features, seed = ctx.projection
        if grad_proj is None:
            grad_proj = mask.new_zeros((2, R.shape[0], features))
        want_grad_x = ctx.needs_input_grad[1]
        grad_R, grad_x, grad_mask_sum = ops.masked_projection_backward(grad_proj, grad_sq, R, x, mask, features,
                                                                       seed, want_grad_x)
        if grad_mask is not None:
            grad_mask_sum.add_(grad_mask)
        grad_bg = gram.new_zeros(()) if grad_bg is None else grad_bg
        grad_x = grad_x if want_grad_x else None
        ops.sib_head_backward_add_(grad_R, grad_x, grad_mask_sum, gram.new_zeros(()), grad_bg, R, x, mask, gram,
                                   image_stats, rank_index, *ctx.hyperparameters)
        return grad_R, grad_x

    class ProjectedHead(torch.autograd.Function):
        @staticmethod
        def forward(ctx, R, x, window_size, temperature, slope, features, seed):
            _, bg, mask, gram, image_stats, rank_index = ops.sib_head_forward(R, x, window_size, temperature, slope)
            proj, sq = ops.masked_projection_forward(R, x, mask, features, seed)
            ctx.save_for_backward(R, x, mask, gram, image_stats, rank_index)
            ctx.hyperparameters = (window_size, temperature, slope)
            ctx.projection = (features, seed)
            ctx.set_materialize_grads(False)
            return proj, sq, bg, mask

        @staticmethod
        def backward(ctx, grad_proj, grad_sq, grad_bg, grad_mask):
            R, x, mask, gram, image_stats, rank_index = ctx.saved_tensors
            with torch.no_grad():
                grad_R, grad_x = _gradients(ctx, grad_proj, grad_sq, grad_bg, grad_mask, R, x, mask, gram,
                                            image_stats, rank_index)
            if torch.is_grad_enabled():  # create_graph=True: a second derivative must not be zeros
                grad_R, *rest = _RefuseSecondDerivative.apply(R, grad_R, *([] if grad_x is None else [grad_x]))
                grad_x = rest[0] if rest else None
            return grad_R, grad_x, None, None, None, None, None

    return ProjectedHead.apply
