"""The models of ``sib-train``, ``sib-eval`` and ``sib-bench --step``: the built-in ones and the
``--arch`` lookup.

``build_model(arch, num_classes, image_size)`` takes a built-in name (``sib_cnn``, a small CNN;
``tiny_vit``, a small ViT; ``tiny_cnn``, a smoke-test CNN; ``vit_s_16`` or ``vit_small``,
ViT-S/16), a torchvision classification model name (``resnet50``, ``vit_b_16``...) or a
timm model name (when timm is installed; ``timm/NAME`` forces timm). Weights are initialised
at random: nothing is downloaded (``sib-train --pretrained`` loads weights into the model
afterwards: ``training/pretrained.py``).
"""
from __future__ import annotations

import difflib
import math

import torch
import torch.nn.functional as F
from torch import nn


class SmallCNN(nn.Module):
    """Four conv-BatchNorm-activation blocks (three with stride 2), global pooling, linear.

    The default pooling is a smooth maximum, log-sum-exp (1/beta) log mean exp(beta f): the
    object covers a small part of the image, and averaging its features with the background's
    (``pool="mean"``) makes a small CNN learn far more slowly, while a hard maximum
    (``pool="max"``) has kinks where the argmax switches, which finite differences pick up and
    the double backward does not (docs/vjp_modes.md). With a smooth activation the
    network is smooth and the two VJP modes agree. Every op has a double backward.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 32, act: str = "gelu",
                 pool: str = "lse", beta: float = 4.0):
        super().__init__()
        if pool not in ("lse", "max", "mean"):
            raise ValueError(f"pool must be 'lse', 'max' or 'mean', got {pool!r}")
        self.pool = pool
        self.beta = beta
        acts = {"gelu": nn.GELU, "softplus": nn.Softplus, "silu": nn.SiLU, "relu": nn.ReLU}
        if act not in acts:
            raise ValueError(f"act must be one of {sorted(acts)}, got {act!r}")
        widths = (width, 2 * width, 4 * width, 4 * width)
        strides = (2, 2, 2, 1)
        layers, c = [], in_channels
        for w, s in zip(widths, strides):
            layers += [nn.Conv2d(c, w, 3, stride=s, padding=1, bias=False), nn.BatchNorm2d(w), acts[act]()]
            c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        if self.pool == "max":
            pooled = f.amax(dim=(2, 3))
        elif self.pool == "mean":
            pooled = f.mean(dim=(2, 3))
        else:  # smooth max: (1/beta) log mean exp(beta f)
            n = f.shape[2] * f.shape[3]
            pooled = (torch.logsumexp(self.beta * f.flatten(2), dim=2) - math.log(n)) / self.beta
        return self.head(pooled)


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        B, N, D = t.shape
        q, k, v = self.qkv(self.norm1(t)).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)  # fused attention: no double backward
        t = t + self.proj(a.transpose(1, 2).reshape(B, N, D))
        return t + self.mlp(self.norm2(t))


class TinyViT(nn.Module):
    """A small ViT on ``F.scaled_dot_product_attention``, whose fused kernels have no double
    backward: train it with ``vjp="finite_difference"``."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 64, patch: int = 8,
                 dim: int = 64, depth: int = 2, heads: int = 2):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"tiny_vit needs an image size divisible by its patch size {patch}, got {image_size}")
        self.embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks = nn.Sequential(*[_Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(t)).mean(dim=1))


def tiny_cnn(num_classes: int) -> nn.Module:
    """Two conv-BN-ReLU blocks and a linear layer: a smoke-test model for ``sib-bench --step``."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))


def vit_s_16(num_classes: int, image_size: int) -> nn.Module:
    """ViT-S/16 (12 layers, 6 heads, width 384), torchvision's implementation: the benchmarks' ViT."""
    import torchvision

    check_image_size("vit_s_16", image_size)
    return torchvision.models.VisionTransformer(image_size=image_size, patch_size=PATCH_SIZES["vit_s_16"], num_layers=12, num_heads=6,
                                                hidden_dim=384, mlp_dim=1536, num_classes=num_classes)


#: name -> (num_classes, image_size) -> model
BUILTIN = {
    "sib_cnn": lambda num_classes, image_size: SmallCNN(num_classes),
    "tiny_vit": lambda num_classes, image_size: TinyViT(num_classes, image_size=image_size,
                                                        patch=PATCH_SIZES["tiny_vit"]),
    "tiny_cnn": lambda num_classes, image_size: tiny_cnn(num_classes),
    "vit_s_16": vit_s_16,
}
#: other names of built-in models (torchvision has no ViT-S, so these clash with nothing there)
ALIASES = {"vit_small": "vit_s_16"}


def torchvision_names() -> list[str]:
    """torchvision's classification model names (none without torchvision)."""
    try:
        import torchvision
    except ImportError:
        return []
    return list(torchvision.models.list_models(module=torchvision.models))


def _timm():
    try:
        import timm
    except ImportError:
        return None
    return timm


#: the built-in transformers' patch sizes: the image side must be a multiple of them
PATCH_SIZES = {"tiny_vit": 8, "vit_s_16": 16}


def check_image_size(arch: str, image_size: int) -> None:
    """Raise ValueError with one line if ``arch`` is a built-in ViT whose patch does not tile the image."""
    patch = PATCH_SIZES.get(arch)
    if patch is not None and image_size % patch:
        raise ValueError(f"--arch {arch} needs an image size divisible by its patch size {patch}, got {image_size}")


def check_arch(arch: str) -> None:
    """Raise ValueError with one line (and close matches) if ``arch`` names no model."""
    if arch in BUILTIN or arch in ALIASES:
        return
    timm = _timm()
    if arch.startswith("timm/"):
        if timm is None:
            raise ValueError(f"--arch {arch!r} needs timm: pip install timm")
        if not timm.is_model(arch[5:]):
            raise ValueError(f"--arch {arch!r}: timm has no model named {arch[5:]!r}")
        return
    tv = torchvision_names()
    if arch in tv or (timm is not None and timm.is_model(arch)):
        return
    candidates = list(BUILTIN) + tv + (list(timm.list_models()) if timm is not None else [])
    close = difflib.get_close_matches(arch, candidates, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown --arch {arch!r}: use a built-in model ({', '.join(BUILTIN)}), a torchvision "
                     f"classification model (e.g. resnet50, vit_b_16) or a timm model{hint}")


def build_model(arch: str, num_classes: int, image_size: int = 224) -> nn.Module:
    """A randomly initialised classifier for ``(B, 3, image_size, image_size)`` inputs."""
    check_arch(arch)
    arch = ALIASES.get(arch, arch)
    if arch in BUILTIN:
        return BUILTIN[arch](num_classes, image_size)
    if arch.startswith("timm/") or arch not in torchvision_names():
        timm = _timm()
        name = arch[5:] if arch.startswith("timm/") else arch
        kwargs = {"img_size": image_size} if any(k in name for k in ("vit", "deit", "swin", "eva")) else {}
        try:
            return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
        except TypeError:
            return timm.create_model(name, pretrained=False, num_classes=num_classes)
    import torchvision
    kwargs = {"image_size": image_size} if arch.startswith("vit_") else {}
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
