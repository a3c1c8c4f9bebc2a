"""Attribution maps ("explanations") of an image classifier: one ``(B, H, W)`` map per method.

``explain(model, x, target, methods)`` returns ``{method: map}``. The model is put in eval mode
for the call and every module's mode is restored afterwards; the parameters' ``.grad`` are
never touched (all gradients are taken with ``torch.autograd.grad``); ``x`` is not modified.
Maps are float32 on ``x``'s device, detached unless ``create_graph=True`` (CAM methods only).

Input-space methods come from Captum (``pip install "sib_fast[explain]"``); the CAM methods are
plain torch, short, and differentiable (``create_graph=True``) so they can be used in a loss.

Channel reduction and sign of each method (``s`` is the target class's logit, ``x`` the model
input, ``A`` the feature map of the CAM layer, ``c`` its channels)::

    method                 map(b, i, j)                                         sign
    saliency               sum_c |ds/dx_cij|                                    >= 0
    smoothgrad             mean over noisy copies of sum_c |ds/dx_cij|           >= 0
                           (Captum NoiseTunnel over Saliency(abs=True): the absolute
                            value is taken before averaging; noise std =
                            noise_level * (max(x) - min(x)) over the batch)
    guided_backprop        sum_c |guided gradient_cij|                          >= 0
    input_x_gradient       sum_c x_cij * ds/dx_cij                              signed
    integrated_gradients   sum_c (x - x0)_cij * mean_a ds/dx(x0 + a (x - x0))   signed
                           (baseline x0: ``ig_baseline``, default 0 in the model's input
                            space; the channel sum keeps IG's completeness)
    gradcam                up(ReLU(sum_c w_c A_c)),  w_c = mean_ij ds/dA_cij    >= 0
    gradcam_pp             up(ReLU(sum_c w_c A_c)),  w_c = sum_ij a_cij ReLU(ds/dA_cij),
                           a = g^2 / (2 g^2 + sum_ij(A) g^3)  (Chattopadhay et al., with
                           the exponential-score closed form used by common implementations)
    layercam               up(ReLU(sum_c ReLU(ds/dA_c) * A_c))                 >= 0

``up`` is bilinear upsampling to the input's (H, W) (``align_corners=False``). Gradient-type
maps (saliency, smoothgrad, guided backprop) are magnitudes: the sign of a gradient says which
way a pixel would move the score, not whether it is evidence. Attribution-type maps
(input x gradient, integrated gradients) keep their sign: the channel sum is the pixel's signed
contribution to the score. The localization metrics (``sib_fast.evaluation.localization``) use the positive
part of every map. Nothing is rescaled (no min-max normalisation).

Guided backprop (Captum) modifies the backward of ``nn.ReLU`` *modules* only: on a model without
them (the built-in ``SmallCNN`` uses GELU; functional ``F.relu`` calls are not modules) it equals
the plain gradient, i.e. ``saliency``.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

CAPTUM_METHODS = ("saliency", "input_x_gradient", "guided_backprop", "integrated_gradients", "smoothgrad")
CAM_METHODS = ("gradcam", "gradcam_pp", "layercam")
METHODS = CAPTUM_METHODS + CAM_METHODS
ALIASES = {"grad": "saliency", "gradient": "saliency", "ixg": "input_x_gradient", "inputxgradient": "input_x_gradient",
           "gbp": "guided_backprop", "ig": "integrated_gradients"}
SIGNED = ("input_x_gradient", "integrated_gradients")


def canonical_method(name: str) -> str:
    """The canonical name of a method (``METHODS``, or an alias in ``ALIASES``); ValueError if unknown."""
    def compact(s):  # case, "-", "_", spaces and "++"/"pp" do not matter: "Grad-CAM++" is gradcam_pp
        return s.strip().lower().replace("++", "pp").replace("-", "").replace("_", "").replace(" ", "")

    names = {compact(m): m for m in METHODS}
    names.update({compact(a): m for a, m in ALIASES.items()})
    key = names.get(compact(name))
    if key is None:
        raise ValueError(f"unknown explanation method {name!r}; choose from {', '.join(METHODS)}")
    return key


def _captum():
    try:
        import captum.attr  # noqa: F401
    except ImportError:
        raise ImportError("the input-space explanation methods need Captum: pip install \"captum>=0.9\" "
                          "(or pip install \"sib_fast[explain]\")") from None
    return captum.attr


@contextlib.contextmanager
def eval_mode(model: nn.Module, enabled: bool = True):
    """Put every module of ``model`` in eval mode; restore each module's own mode on exit."""
    if not enabled:
        yield model
        return
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def _resolve_target(model: nn.Module, x: torch.Tensor, target) -> torch.Tensor:
    """Target classes as a (B,) long tensor; ``None`` means the model's predicted class."""
    B = x.shape[0]
    if target is None:
        with torch.no_grad():
            return model(x).argmax(1)
    if isinstance(target, int):
        return torch.full((B,), target, dtype=torch.long, device=x.device)
    t = torch.as_tensor(target, device=x.device).long().reshape(-1)
    if t.numel() != B:
        raise ValueError(f"target must have one class per image ({B}), got {t.numel()}")
    return t


def find_default_layer(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """The module producing the last 4-D feature map with more than one spatial position in a
    forward pass of ``x[:1]`` (the last conv block of a CNN: ``SmallCNN.features``,
    torchvision ResNet's ``layer4``). Modules called several times count at their last call."""
    last: list = []

    def hook(module, _inp, out):
        if isinstance(out, torch.Tensor) and out.dim() == 4:
            last.append((module, out.shape[-2] * out.shape[-1] > 1))

    handles = [m.register_forward_hook(hook) for m in model.modules() if m is not model]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
    spatial = [m for m, ok in last if ok]
    if spatial:
        return spatial[-1]
    if last:
        return last[-1][0]
    raise ValueError("found no module with a 4-D (B, C, h, w) output for Grad-CAM; pass layer=")


def _get_layer(model: nn.Module, layer, x: torch.Tensor) -> nn.Module:
    if layer is None:
        return find_default_layer(model, x)
    if isinstance(layer, nn.Module):
        return layer
    if isinstance(layer, str):
        try:
            return model.get_submodule(layer)
        except AttributeError:
            names = [n for n, _ in model.named_modules() if n]
            raise ValueError(f"model has no submodule {layer!r}; some names: {', '.join(names[-8:])}") from None
    raise TypeError(f"layer must be None, a module or a dotted module name, got {type(layer).__name__}")


def _cam_maps(model: nn.Module, x: torch.Tensor, target: torch.Tensor, layer: nn.Module,
              methods: Sequence[str], create_graph: bool) -> dict:
    """Grad-CAM, Grad-CAM++ and LayerCAM from one forward and one backward pass."""
    store = {}

    def hook(_m, _i, out):
        if not isinstance(out, torch.Tensor) or out.dim() != 4:
            raise ValueError(f"the CAM layer must output a (B, C, h, w) tensor, got "
                             f"{type(out).__name__}{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}")
        store["A"] = out

    handle = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            xin = x if x.requires_grad else x.detach().requires_grad_(True)
            logits = model(xin)
            if "A" not in store:
                raise ValueError("the CAM layer was not called in the model's forward pass")
            A = store["A"]
            score = logits.gather(1, target.view(-1, 1)).sum()
            (g,) = torch.autograd.grad(score, A, create_graph=create_graph)
    finally:
        handle.remove()
    A, g = A.float(), g.float()
    if not create_graph:
        A, g = A.detach(), g.detach()
    out = {}
    H, W = x.shape[-2:]
    for m in methods:
        if m == "gradcam":
            cam = (g.mean(dim=(2, 3), keepdim=True) * A).sum(1)
        elif m == "gradcam_pp":
            g2, g3 = g.pow(2), g.pow(3)
            denom = 2 * g2 + A.sum(dim=(2, 3), keepdim=True) * g3
            denom = torch.where(denom != 0, denom, torch.ones_like(denom))
            alpha = g2 / denom
            w = (alpha * F.relu(g)).sum(dim=(2, 3), keepdim=True)
            cam = (w * A).sum(1)
        elif m == "layercam":
            cam = (F.relu(g) * A).sum(1)
        else:  # pragma: no cover
            raise AssertionError(m)
        cam = F.relu(cam).unsqueeze(1)
        out[m] = F.interpolate(cam, size=(H, W), mode="bilinear", align_corners=False).squeeze(1)
    return out


def gradcam(model: nn.Module, x: torch.Tensor, target=None, *, layer=None, method: str = "gradcam",
            create_graph: bool = False, eval_mode_: bool = True) -> torch.Tensor:
    """One CAM map (``gradcam``, ``gradcam_pp`` or ``layercam``), ``(B, H, W)``; differentiable in
    the parameters and ``x`` with ``create_graph=True`` (for use in a training loss; keep
    ``eval_mode_=True`` unless the images should interact through BatchNorm statistics)."""
    method = canonical_method(method)
    if method not in CAM_METHODS:
        raise ValueError(f"gradcam() computes {', '.join(CAM_METHODS)}, not {method!r}")
    return explain(model, x, target, [method], layer=layer, create_graph=create_graph,
                   eval_mode_=eval_mode_)[method]


def explain(model: nn.Module, x: torch.Tensor, target=None, methods: Iterable[str] = METHODS, *,
            layer=None, ig_steps: int = 32, ig_baseline: float | torch.Tensor = 0.0,
            smoothgrad_samples: int = 16, smoothgrad_noise: float = 0.15, seed: int = 0,
            internal_batch_size: int | None = None, create_graph: bool = False,
            eval_mode_: bool = True) -> dict:
    """Attribution maps of ``model`` for a batch ``x`` (B, C, H, W) and its ``target`` classes.

    Args:
        target: (B,) classes, one int for all, or ``None`` for the predicted classes.
        methods: names from ``METHODS`` (aliases such as ``"ig"``, ``"gradcam++"`` accepted).
        layer: the CAM layer: a module of ``model``, a dotted name (``"features"``,
            ``"layer4"``), or ``None`` for ``find_default_layer`` (the last conv block).
        ig_steps: Integrated Gradients steps (Gauss-Legendre, Captum's default rule).
        ig_baseline: IG baseline, a number or a tensor broadcastable to ``x``.
        smoothgrad_samples, smoothgrad_noise: SmoothGrad's noisy copies and its noise standard
            deviation as a fraction of the input range ``max(x) - min(x)`` (over the batch).
        seed: seed of SmoothGrad's noise (the global RNG state is left as it was).
        internal_batch_size: chunk size of IG / SmoothGrad's expanded batches (memory bound).
        create_graph: keep the graph of the CAM maps (differentiable); Captum maps are detached.
        eval_mode_: run in eval mode (default); every module's mode is restored afterwards.

    Returns:
        ``{method: (B, H, W) float32 tensor}`` in the order of ``methods``.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be a (B, C, H, W) batch, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    methods = list(dict.fromkeys(canonical_method(m) for m in ([methods] if isinstance(methods, str) else methods)))
    if ig_steps < 1 or smoothgrad_samples < 1:
        raise ValueError("ig_steps and smoothgrad_samples must be >= 1")
    if not smoothgrad_noise >= 0:
        raise ValueError(f"smoothgrad_noise must be >= 0, got {smoothgrad_noise}")
    out = {}
    with eval_mode(model, eval_mode_):
        t = _resolve_target(model, x, target)
        xd = x.detach()
        cams = [m for m in methods if m in CAM_METHODS]
        if cams:
            xc = x if create_graph else xd
            out.update(_cam_maps(model, xc, t, _get_layer(model, layer, xd), cams, create_graph))
        captum_methods = [m for m in methods if m in CAPTUM_METHODS]
        if captum_methods:
            attr = _captum()
            for m in captum_methods:
                inp = xd.clone().requires_grad_(True)
                if m == "saliency":
                    a = attr.Saliency(model).attribute(inp, target=t, abs=True)
                elif m == "input_x_gradient":
                    a = attr.InputXGradient(model).attribute(inp, target=t)
                elif m == "guided_backprop":
                    with warnings.catch_warnings():
                        warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")
                        a = attr.GuidedBackprop(model).attribute(inp, target=t).abs()
                elif m == "integrated_gradients":
                    base = ig_baseline if isinstance(ig_baseline, torch.Tensor) else float(ig_baseline)
                    if isinstance(base, torch.Tensor):
                        base = base.to(inp).expand_as(inp).contiguous()
                    a = attr.IntegratedGradients(model).attribute(
                        inp, baselines=base, target=t, n_steps=ig_steps, internal_batch_size=internal_batch_size)
                elif m == "smoothgrad":
                    std = float(smoothgrad_noise * (xd.max() - xd.min()))
                    devices = [xd.device] if xd.device.type == "cuda" else []
                    with torch.random.fork_rng(devices=devices):
                        torch.manual_seed(seed)
                        a = attr.NoiseTunnel(attr.Saliency(model)).attribute(
                            inp, nt_type="smoothgrad", nt_samples=smoothgrad_samples, stdevs=std,
                            nt_samples_batch_size=internal_batch_size, target=t, abs=True)
                else:  # pragma: no cover
                    raise AssertionError(m)
                out[m] = a.detach().float().sum(1)
    return {m: out[m] for m in methods}
