"""How hard each S-IB term pulls on the weights: ``gradient_shares``, the strength meter.

At the paper's weights (lambda_fg = 0.01, lambda_bg = 1000) the weight gradient of the HSIC term
can be 1e-4 of cross-entropy's: the meter says so, so that the weights can be chosen by what
they do (docs/training.md, "Choosing lambda").
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sib_fast.loss import SIBLoss
from sib_fast.training.norms import frozen_norm_statistics
from sib_fast.training.step import (VJP_MODES, _autocast, _double_backward_error, _is_double_backward_error, _phi,
                                    default_fd_eps, rng_state, set_rng_state, unwrap_ddp)


@dataclass
class GradientShares:
    """Weight-gradient norms of the loss's three terms on one batch, and how they compare.

    ``ratio_fg`` and ``ratio_bg`` are the norms of lambda_fg exp(-HSIC)'s and lambda_bg exp(BG)'s
    weight gradients over cross-entropy's (the lambdas included): 0.01 means the term moves the
    weights by 1% of what cross-entropy does. ``cos_fg`` and ``cos_bg`` are their cosines with
    cross-entropy's gradient. NaN where the batch or the weights hold NaN; a ratio is +inf where
    cross-entropy's gradient is exactly zero.
    """
    ce_norm: float
    fg_norm: float
    bg_norm: float
    ratio_fg: float
    ratio_bg: float
    cos_fg: float
    cos_bg: float

    def as_dict(self) -> dict:
        return asdict(self)


def _flat(grads, params) -> torch.Tensor:
    # a parameter the term does not reach has a zero gradient
    return torch.cat([(g if g is not None else torch.zeros_like(p)).detach().double().flatten()
                      for g, p in zip(grads, params)])


def _ratio(a: float, b: float) -> float:
    if math.isnan(a) or math.isnan(b):
        return math.nan
    return a / b if b > 0 else (math.inf if a > 0 else math.nan)


def gradient_shares(model: nn.Module, x: torch.Tensor, target: torch.Tensor, criterion: SIBLoss, *,
                    vjp: str = "exact", fd_eps: float | None = None,
                    autocast_dtype: torch.dtype | None = None) -> GradientShares:
    """The weight-gradient norms of cross-entropy and of each S-IB term of ``criterion`` on
    ``(x, target)``, their ratios and cosines (:class:`GradientShares`).

    The model runs as it is (train mode: BatchNorm on the batch's statistics) but leaves no trace:
    its running statistics, the parameters' ``.grad`` and the RNG state are as before. Under DDP
    the wrapped module runs on this rank's batch alone (no collective). ``vjp`` takes the S-IB
    terms' gradients as ``sib_backward`` does: by double backward, or by finite differences
    (relative step ``fd_eps``) for models without one. ``autocast_dtype`` runs the forward passes
    under autocast, the losses scaled by 2^16 in float16 so that their gradients do not underflow.

    Raises:
        DoubleBackwardUnsupportedError: ``vjp="exact"`` on a model with an op that has no double
            backward, as ``sib_backward`` does.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(criterion, SIBLoss):
        raise TypeError(f"criterion must be a sib_fast.SIBLoss, got {type(criterion).__name__}")
    if vjp not in VJP_MODES:
        raise ValueError(f"vjp must be one of {VJP_MODES}, got {vjp!r}")
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] < 2 or not x.is_floating_point():
        raise ValueError("x must be a floating (B, C, H, W) batch of at least 2 images (HSIC needs two)")
    inner = unwrap_ddp(model)
    params = [p for p in inner.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameter that requires grad: there is no weight gradient to measure")
    device = x.device
    scale = 2.0 ** 16 if autocast_dtype == torch.float16 else 1.0
    rng = rng_state(device)
    with frozen_norm_statistics(inner):
        x = x.detach().requires_grad_(True)
        with _autocast(device, autocast_dtype):
            logits = inner(x)
        ce = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), target)
        phi = _phi(logits) * scale
        if vjp == "exact":
            try:
                (R,) = torch.autograd.grad(phi, x, create_graph=True)
                fg, bg = criterion.weighted_terms(R / scale, x)
                grads = [torch.autograd.grad(term * scale, params, retain_graph=True, allow_unused=True)
                         for term in (ce, fg, bg)]
            except RuntimeError as exc:
                if _is_double_backward_error(exc):
                    raise _double_backward_error(exc) from exc
                raise
        else:
            (R,) = torch.autograd.grad(phi, x, retain_graph=True)
            R = (R / scale).detach().requires_grad_(True)
            x0 = x.detach()
            fg, bg = criterion.weighted_terms(R, x0)
            directions = [torch.autograd.grad(term, R, retain_graph=True)[0] for term in (fg, bg)]
            grads = [torch.autograd.grad(ce * scale, params, allow_unused=True)]
            c = fd_eps if fd_eps is not None else default_fd_eps(x0.dtype, autocast_dtype)
            for g in directions:  # the central difference of sib_backward, one term at a time
                eps = c * x0.norm().clamp_min(1e-20) / g.norm().clamp_min(1e-20)
                passes = []
                for sign in (1.0, -1.0):
                    set_rng_state(rng, device)
                    with _autocast(device, autocast_dtype):
                        passes.append(_phi(inner(x0 + sign * (eps * g).to(x0.dtype))))
                surrogate = (passes[0] - passes[1]) / (2 * eps)
                grads.append(torch.autograd.grad(surrogate * scale, params, allow_unused=True))
    set_rng_state(rng, device)
    ce_g, fg_g, bg_g = (_flat(g, params) / scale for g in grads)
    norms = [v.norm().item() for v in (ce_g, fg_g, bg_g)]
    cos = [F.cosine_similarity(v, ce_g, dim=0).item() for v in (fg_g, bg_g)]
    return GradientShares(ce_norm=norms[0], fg_norm=norms[1], bg_norm=norms[2],
                          ratio_fg=_ratio(norms[1], norms[0]), ratio_bg=_ratio(norms[2], norms[0]),
                          cos_fg=cos[0], cos_bg=cos[1])
