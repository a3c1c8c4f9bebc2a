"""One S-IB training step: ``sib_backward``, with the exact and the finite-difference VJP modes.

The S-IB head depends on the weights only through R = d phi/dx (docs/loss.md section 1), so its
weight gradient is the derivative of the head *through* R:

    dL_head/dtheta = sum_i g_i dR_i/dtheta = d/dtheta [ g . grad_x phi(x, theta) ],   g = dL_head/dR.

``vjp="exact"`` gets it the paper's way: R with ``create_graph=True``, then a double backward
through the network. ``vjp="finite_difference"`` uses only first-order passes: the directional
derivative of grad_x phi along g is a difference of phi at x +- eps*g, so

    surrogate = CE(f(x)) + (phi(x + eps g) - phi(x - eps g)) / (2 eps)

has exactly the finite-difference estimate as its weight gradient. This works where an op has
no double backward (``torch.compile``, flash / memory-efficient attention) and keeps no
second-order graph in memory.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from sib_fast.loss import SIBLoss
from sib_fast.training.norms import (SUB_BATCH_NORMS, frozen_norm_statistics, recorded_batch_statistics,
                                      sub_batch_norm)

VJP_MODES = ("exact", "finite_difference")
FD_SCHEMES = ("central", "forward")

#: Default relative finite-difference step c: the perturbation eps*g has norm c*||x||.
DEFAULT_FD_EPS = 1e-3
#: ... in float64, where rounding allows a smaller step,
DEFAULT_FD_EPS_FLOAT64 = 1e-4
#: ... and under autocast, where half-precision rounding of phi's gradients needs a larger one
#: (and float16 backward passes of phi / eps overflow for small eps).
DEFAULT_FD_EPS_AUTOCAST = 1e-2

_DOUBLE_BACKWARD_MARKERS = (
    "double backward",                 # torch.compile: "...does not currently support double backward"
    "derivative for",                  # "derivative for aten::..._backward is not implemented"
    "not implemented for double backward",
    "twice",                           # custom Functions marked once_differentiable
)


#: Layers whose output has kinks in x (ReLU-like switches, max selection): with them the finite-
#: difference mode does not follow the exact gradient (see ``vjp_agreement``).
NON_SMOOTH_LAYERS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
                     nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                     nn.AdaptiveMaxPool3d)


def non_smooth_layers(model: nn.Module) -> list[str]:
    """Names of the layer types of ``model`` that are not smooth (a hint; functional calls are not seen)."""
    return sorted({type(m).__name__ for m in model.modules() if isinstance(m, NON_SMOOTH_LAYERS)})


class DoubleBackwardUnsupportedError(RuntimeError):
    """The exact VJP mode needs a double backward that some op of the model does not have."""


@dataclass
class SIBStats:
    """What one ``sib_backward`` call computed; all tensors detached, no device sync."""
    loss: torch.Tensor      #: CE + lambda_bg exp(BG) + lambda_fg exp(-HSIC), 0-dim
    ce: torch.Tensor        #: mean cross-entropy, 0-dim
    hsic: torch.Tensor      #: HSIC, 0-dim
    bg: torch.Tensor        #: background variance, 0-dim
    logits: torch.Tensor    #: (B, K) logits of the unperturbed forward pass
    backend: str            #: the S-IB head backend that ran
    vjp: str                #: "exact" or "finite_difference"
    fd_eps: torch.Tensor | None = None  #: the absolute step eps (finite-difference mode), 0-dim
    sib_step: bool = True   #: False for a plain cross-entropy step of ``sib_every`` (hsic, bg NaN)

    def as_floats(self) -> dict:
        """Loss terms as Python floats (one device sync)."""
        values = torch.stack([self.loss, self.ce, self.hsic, self.bg]).double().cpu().tolist()
        return dict(zip(("loss", "ce", "hsic", "bg"), values))


def _phi(logits: torch.Tensor) -> torch.Tensor:
    """phi = 0.5 * sum of softmax(logits)**2 over the batch, in float32 at least (docs/loss.md section 1)."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return 0.5 * torch.softmax(z, dim=1).pow(2).sum()


def default_fd_eps(dtype: torch.dtype, autocast_dtype: torch.dtype | None = None) -> float:
    """The relative step c that ``sib_backward`` uses when ``fd_eps`` is None."""
    if autocast_dtype is not None:
        return DEFAULT_FD_EPS_AUTOCAST
    return DEFAULT_FD_EPS_FLOAT64 if dtype == torch.float64 else DEFAULT_FD_EPS


def unwrap_ddp(model: nn.Module) -> nn.Module:
    """The module DDP wraps (a compiled model stays compiled); ``model`` itself when not wrapped.
    The perturbed passes run on it so that DDP's reducer sees one forward."""
    from torch.nn.parallel import DistributedDataParallel
    return model.module if isinstance(model, DistributedDataParallel) else model


def rng_state(device: torch.device) -> dict:
    """The CPU RNG state and, for a CUDA ``device``, that device's: replayed so that dropout draws the
    same masks in every pass of a step, and saved in checkpoints so that a resumed run draws as the
    uninterrupted one would."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore what ``rng_state`` returned (a CPU-only state leaves the CUDA generator as it is)."""
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _is_double_backward_error(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    msg = str(exc)
    return any(marker in msg for marker in _DOUBLE_BACKWARD_MARKERS)


def _double_backward_error(exc: RuntimeError) -> DoubleBackwardUnsupportedError:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return DoubleBackwardUnsupportedError(
        f"vjp='exact' needs a double backward through the model, and an op of this model has none "
        f"({first_line}). This happens under torch.compile and with flash / memory-efficient "
        f"scaled_dot_product_attention. Use vjp='finite_difference' (sib-train: --vjp "
        f"finite_difference), which needs only first-order backward passes; or, for attention, call "
        f"sib_backward inside torch.nn.attention.sdpa_kernel(SDPBackend.MATH), whose math kernel has "
        f"a double backward (slower, more memory).")


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _check_positive_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_arguments(model, x, target, criterion, vjp, fd_eps, fd_scheme, autocast_dtype,
                     sib_batch, sib_bn, sib_every, step, label_smoothing, sib_only) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(criterion, SIBLoss):
        raise TypeError(f"criterion must be a sib_fast.SIBLoss, got {type(criterion).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4:
        raise ValueError("x must be a floating (B, C, H, W) tensor, got "
                         + (f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__))
    if x.shape[0] < 2:
        raise ValueError(f"x must hold a batch of at least 2 images (HSIC needs B >= 2), got B={x.shape[0]}")
    if not isinstance(target, torch.Tensor) or target.shape[:1] != x.shape[:1]:
        raise ValueError(f"target must be a tensor with one entry per image ({x.shape[0]}), got "
                         + (f"shape {tuple(target.shape)}" if isinstance(target, torch.Tensor) else type(target).__name__))
    if vjp not in VJP_MODES:
        raise ValueError(f"vjp must be one of {VJP_MODES}, got {vjp!r}")
    if fd_scheme not in FD_SCHEMES:
        raise ValueError(f"fd_scheme must be one of {FD_SCHEMES}, got {fd_scheme!r}")
    if fd_eps is not None and (isinstance(fd_eps, bool) or not isinstance(fd_eps, (int, float))
                               or not math.isfinite(fd_eps) or fd_eps <= 0):
        raise ValueError(f"fd_eps must be a finite number > 0 (relative step), got {fd_eps!r}")
    if autocast_dtype not in (None, torch.float16, torch.bfloat16):
        raise ValueError(f"autocast_dtype must be None, torch.float16 or torch.bfloat16, got {autocast_dtype!r}")
    if sib_batch is not None:
        _check_positive_int("sib_batch", sib_batch, 2)  # HSIC needs two images
    if sib_bn not in SUB_BATCH_NORMS:
        raise ValueError(f"sib_bn must be one of {SUB_BATCH_NORMS}, got {sib_bn!r}")
    _check_positive_int("sib_every", sib_every, 1)
    _check_positive_int("step", step, 0)
    if not isinstance(sib_only, bool):
        raise ValueError(f"sib_only must be True or False, got {sib_only!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) \
            or not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing must be a number in [0, 1), got {label_smoothing!r}")


def separate_step_compensation(sib_every: int) -> float:
    """c = K / (K + 1) for S-IB's own optimizer step every K-th batch (``sib_backward(sib_only=True)``):
    K + 1 optimizer steps then take K batches, so StyleGAN2 multiplies the learning rate by c and
    raises Adam's betas to the power c, keeping the optimizer's time constants per batch."""
    _check_positive_int("sib_every", sib_every, 1)
    return sib_every / (sib_every + 1)


def sib_backward(model: nn.Module, x: torch.Tensor, target: torch.Tensor, criterion: SIBLoss, *,
                 vjp: str = "exact", fd_eps: float | None = None, fd_scheme: str = "central",
                 autocast_dtype: torch.dtype | None = None,
                 grad_scaler: torch.amp.GradScaler | None = None,
                 sib_batch: int | None = None, sib_bn: str = "frozen",
                 sib_every: int = 1, step: int = 0, label_smoothing: float = 0.0,
                 sib_only: bool = False) -> SIBStats:
    """Compute the S-IB loss of ``criterion`` on ``(x, target)`` and back-propagate it.

    The gradient is *accumulated* into the ``.grad`` of ``model``'s parameters (zero them before,
    step the optimizer after). Returns the detached parts of the loss as :class:`SIBStats`.

    Args:
        model: the classifier, ``x -> logits``; may be wrapped in ``DistributedDataParallel``
            and/or compiled (the latter with ``vjp="finite_difference"`` only).
        vjp: ``"exact"`` (double backward, the paper's semantics) or ``"finite_difference"``
            (first-order passes only; see the module docstring).
        fd_eps: relative finite-difference step c: the batch-wide perturbation eps*g has norm
            ``c * ||x||`` (eps = c ||x|| / ||g|| over the whole batch, valid with BatchNorm in
            train mode, which couples the images). Default 1e-3; 1e-4 in float64; 1e-2 under
            autocast.
        fd_scheme: ``"central"`` (two perturbed passes, error O(eps^2)) or ``"forward"`` (one
            perturbed pass, reusing phi(x) of the first pass, error O(eps)).
        autocast_dtype: run the model's forward passes under ``torch.autocast`` with this dtype;
            R, the head and the finite difference stay in float32.
        grad_scaler: a ``torch.amp.GradScaler`` for float16: the backward passes (including the
            one computing R) are scaled by it. The caller calls ``scaler.step`` / ``update``.
        sib_batch: take R and the S-IB terms on the batch's first ``sib_batch`` images only (at
            least 2), by a separate forward pass of them; cross-entropy stays on the whole batch.
            None (or the batch size or more): the whole batch.
        sib_bn: what BatchNorm normalises that sub-batch pass with: ``"frozen"``, the whole
            batch's statistics of this step; ``"batch"``, the sub-batch's own; ``"running"``, the
            running statistics. The pass never updates them.
        sib_every, step: lazy regularization. Only a step with ``step % sib_every == 0`` is an
            S-IB step, with the S-IB terms weighted by ``sib_every``; the others are one plain
            cross-entropy forward and backward (``SIBStats.sib_step`` False, hsic and bg NaN).
        sib_only: back-propagate ``sib_every`` times the S-IB terms alone, whatever ``step``:
            StyleGAN2's form of lazy regularization, a separate optimizer step for the terms after
            the cross-entropy step of every ``sib_every``-th batch (scale the learning rate and
            Adam's betas by ``separate_step_compensation``). Cross-entropy is computed and
            reported, not back-propagated, and no forward pass updates BatchNorm statistics (the
            cross-entropy step of the batch did).
        label_smoothing: of the cross-entropy term (``F.cross_entropy``'s; ``ce`` in the stats
            is the smoothed one). The S-IB head does not use the labels.

    The extra passes (the finite-difference mode's perturbed passes, the sub-batch pass) draw the
    same dropout masks as the first pass (the RNG state is replayed), do not update BatchNorm
    running statistics, and, under DDP, run on the wrapped module so that DDP's reducer sees a
    single forward and a single backward.

    Raises:
        DoubleBackwardUnsupportedError: ``vjp="exact"`` on a model with an op that has no double
            backward; the message suggests ``vjp="finite_difference"``.
    """
    _check_arguments(model, x, target, criterion, vjp, fd_eps, fd_scheme, autocast_dtype,
                     sib_batch, sib_bn, sib_every, step, label_smoothing, sib_only)
    device = x.device
    scaler_on = grad_scaler is not None and grad_scaler.is_enabled()
    # R in fp16 underflows (it is often 1e-6..1e-2): differentiate scale * phi, then divide.
    vjp_scale = grad_scaler.scale(torch.ones((), device=device)) if scaler_on else None

    def scaled(t: torch.Tensor) -> torch.Tensor:
        return grad_scaler.scale(t) if scaler_on else t

    def forward(net, inputs):
        with _autocast(device, autocast_dtype):
            logits = net(inputs)
        if logits.dim() != 2:
            raise ValueError(f"model must return (B, K) logits, got shape {tuple(logits.shape)}")
        return logits

    if step % sib_every and not sib_only:
        logits = forward(model, x.detach())
        ce = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), target,
                             label_smoothing=label_smoothing)
        scaled(ce).backward()
        nan = torch.full_like(ce.detach(), math.nan)
        return SIBStats(ce.detach(), ce.detach(), nan, nan, logits.detach(), criterion.backend_used, vjp,
                        sib_step=False)

    weight = float(sib_every)  # a lazy S-IB step stands for sib_every steps
    sub = sib_batch is not None and sib_batch < x.shape[0]
    inner = unwrap_ddp(model)
    x = x.detach().requires_grad_(not sub)
    rng = rng_state(device) if vjp == "finite_difference" or sub else None
    with frozen_norm_statistics(inner) if sib_only else contextlib.nullcontext(), \
            recorded_batch_statistics(inner, enabled=sub and sib_bn == "frozen") as full_batch_stats:
        logits = forward(model, x)
    ce = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), target,
                         label_smoothing=label_smoothing)
    after_first = rng_state(device) if rng is not None else None

    # the images R and the head see, and how the passes beyond the first normalise
    if sub:
        head_x = x.detach()[:sib_batch].requires_grad_(True)

        def extra_pass_norm():
            return sub_batch_norm(inner, sib_bn, full_batch_stats)

        with extra_pass_norm():
            set_rng_state(rng, device)
            head_logits = forward(inner, head_x)
        set_rng_state(after_first, device)
    else:
        head_x, head_logits = x, logits

        def extra_pass_norm():
            return frozen_norm_statistics(inner)

    def finish(head: torch.Tensor, head_value: torch.Tensor, fd_step=None) -> SIBStats:
        scaled(weight * head if sib_only else ce + weight * head).backward()
        criterion.ce, criterion.loss = ce.detach(), (ce + head_value).detach()
        return SIBStats(criterion.loss, criterion.ce, criterion.hsic, criterion.bg, logits.detach(),
                        criterion.backend_used, vjp, fd_step)

    if vjp == "exact":
        try:
            phi = _phi(head_logits)
            (R,) = torch.autograd.grad(phi if vjp_scale is None else phi * vjp_scale, head_x, create_graph=True)
            if vjp_scale is not None:
                R = R / vjp_scale
            head = criterion.head_loss(R, head_x)
            return finish(head, head)
        except RuntimeError as exc:
            if _is_double_backward_error(exc):
                raise _double_backward_error(exc) from exc
            raise

    # --- finite difference: R by a plain backward, keeping the first pass's graph for CE ---
    phi0 = _phi(head_logits)
    (R,) = torch.autograd.grad(phi0 if vjp_scale is None else phi0 * vjp_scale, head_x, retain_graph=True)
    if vjp_scale is not None:
        R = R / vjp_scale
    R = R.detach().requires_grad_(True)
    x0 = head_x.detach()
    # the head on a detached R: its loss (logged) and g = dL_head/dR
    with torch.enable_grad():
        head_value = criterion.head_loss(R, x0)
        (g,) = torch.autograd.grad(head_value, R)
    c = fd_eps if fd_eps is not None else default_fd_eps(x0.dtype, autocast_dtype)
    work = torch.promote_types(x0.dtype, torch.float32)
    g = g.to(work)
    # eps = c ||x|| / ||g|| for the whole batch (0-dim tensors, no sync). A batch of zeros takes
    # the scale of unit values, sqrt(numel), instead of a zero step (0 / 0 below); g = 0 gives a
    # zero step and its head gradient is exactly zero (the where below, not 0 / 0 either).
    x_norm = x0.to(work).norm()
    g_norm = g.norm()
    eps = c * torch.where(x_norm > 0, x_norm, math.sqrt(x0.numel())) / g_norm.clamp_min(1e-20)
    delta = (eps * g).to(x0.dtype)
    with extra_pass_norm():
        set_rng_state(rng, device)
        phi_plus = _phi(forward(inner, x0 + delta))
        if fd_scheme == "central":
            set_rng_state(rng, device)
            phi_minus = _phi(forward(inner, x0 - delta))
            head_term = (phi_plus - phi_minus) / (2 * eps)
        else:
            head_term = (phi_plus - phi0) / eps
        head_term = torch.where(g_norm > 0, head_term, torch.zeros_like(head_term))
    set_rng_state(after_first, device)
    return finish(head_term, head_value.detach(), eps.detach())


def vjp_agreement(model: nn.Module, x: torch.Tensor, target: torch.Tensor, criterion: SIBLoss, *,
                  fd_eps: float | None = None, fd_scheme: str = "central",
                  autocast_dtype: torch.dtype | None = None) -> float:
    """Cosine similarity of the head's weight gradient in the two VJP modes, on one batch.

    The head's part is the total gradient minus the cross-entropy gradient (the latter is
    usually far larger). Finite differences converge to the exact gradient only on a smooth
    network: where ReLUs switch or a max pool changes its argmax between x - eps*g and
    x + eps*g, the jumps of grad_theta phi enter the difference and do not vanish as eps
    shrinks, while the double backward takes ReLU'' = 0. A cosine well below 1 says that
    ``vjp="finite_difference"`` trains this model with a different gradient than the paper's.

    Costs one exact and one finite-difference step; the parameters' ``.grad``, BatchNorm
    statistics and the RNG state are left as they were. Raises
    :class:`DoubleBackwardUnsupportedError` where the exact mode cannot run.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    saved_grads = [p.grad for p in params]
    rng = rng_state(x.device)

    def flat_grad():
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().double()
                          for p in params])

    def run(step):
        for p in params:
            p.grad = None
        set_rng_state(rng, x.device)
        step()
        return flat_grad()

    def ce_only():
        with _autocast(x.device, autocast_dtype):
            logits = model(x)
        F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), target).backward()

    try:
        with frozen_norm_statistics(model):
            ce = run(ce_only)
            heads = [run(lambda vjp=vjp: sib_backward(model, x, target, criterion, vjp=vjp, fd_eps=fd_eps,
                                                      fd_scheme=fd_scheme, autocast_dtype=autocast_dtype)) - ce
                     for vjp in VJP_MODES]
    finally:
        for p, grad in zip(params, saved_grads):
            p.grad = grad
        set_rng_state(rng, x.device)
    return F.cosine_similarity(heads[0], heads[1], dim=0).item()
