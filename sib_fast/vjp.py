"""docs/loss.md section 1: the VJP map R = d/dx of 0.5 * sum(softmax(logits)**2)."""
from __future__ import annotations

import torch


def input_vjp(logits: torch.Tensor, x: torch.Tensor, *, create_graph: bool = True) -> torch.Tensor:
    """R = d phi / d x with phi = 0.5 * sum over the batch of softmax(logits)**2.

    With ``create_graph=True`` (the paper's exact mode) R keeps its graph, so a
    loss of R back-propagates into the weights by double backward.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be a (B, K) tensor, got "
                         f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.requires_grad:
        raise ValueError("x must require grad so that R = d phi/dx exists: "
                         "call x.requires_grad_() before the model's forward pass")
    if logits.grad_fn is None:
        raise ValueError("logits are not in the autograd graph of x: compute them from x "
                         "(with x.requires_grad_() set) and outside torch.no_grad()")
    # softmax and the sum in float32 at least, whatever autocast chose for the logits
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    phi = 0.5 * torch.softmax(z, dim=1).pow(2).sum()
    (R,) = torch.autograd.grad(phi, x, create_graph=create_graph, allow_unused=True)
    if R is None:
        raise ValueError("x is not in the autograd graph of logits: the logits must be computed from x")
    return R
