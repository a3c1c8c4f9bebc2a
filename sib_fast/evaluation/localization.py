"""Localization and faithfulness metrics of attribution maps against ground-truth masks.

Every metric is batched: it takes maps ``(B, H, W)`` (or ``(B, 1, H, W)``) and masks of the same
size, and returns one score per image, ``(B,)`` float32 (float64 for float64 maps), on the
maps' device. Masks may be bool or float; a pixel is on the object where ``mask > 0.5``
(``boxes_to_masks`` turns boxes into masks).

Conventions (pinned, and tested on hand-built maps in ``tests/test_localization.py``):

- **Positive part.** Every localization metric uses ``max(map, 0)``: negative attribution is
  evidence *against* the class, not a location of the object. Maps are never min-max rescaled:
  the energy metric is invariant to a positive scale anyway, and rescaling would turn a map that
  is constant, or all negative, into an arbitrary one.
- **energy_pointing_game** (Wang et al., Score-CAM 2020): ``sum(map+ * mask) / sum(map+)``, the
  share of the positive energy that falls on the object; 0 for a map with no positive energy.
  A uniform map scores the object's area fraction (chance level).
- **pointing_game** (Zhang et al. 2016): 1 if the map's maximum lies on the object or within
  ``tolerance`` pixels of it (Euclidean distance to the nearest object pixel), else 0. Ties: a
  hit only if *every* pixel attaining the maximum is within tolerance (a constant map does not
  hit by luck). A map with no positive value misses.
- **topk_iou**: IoU of the region of the ``n = round(k * H * W)`` highest values with the mask
  (``k="mask"``: ``n`` = the object's area, per image). The region is thresholded at the n-th
  largest value, so tied pixels are all in or all out; only positive pixels count (a map with
  fewer than ``n`` positive pixels gives a smaller region, an all-zero map an empty one: IoU 0).
- **deletion / insertion** (Petsiuk et al., RISE 2018): pixels ordered by decreasing map value
  (ties in a fixed pseudo-random order, seed 0, so that no image region is favoured), then at
  ``steps + 1`` evenly spaced fractions ``n_k / N`` (``n_k = round(k N / steps)``) the first
  ``n_k`` pixels (all channels) are replaced by the baseline (deletion) or copied from the image
  onto the baseline (insertion); the score is the softmax probability of the target class and
  the result the trapezoidal area under score(fraction) over [0, 1]. Lower deletion and higher
  insertion AUC mean a more faithful map. Baselines: ``"blur"`` (Gaussian, kernel 11, sigma 5, as
  in RISE; reflect padding), ``"mean"`` (per-image channel means), ``"zero"`` or a tensor. The
  ordering uses the raw map (no clamp: negatives come last).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

BASELINES = ("blur", "mean", "zero")


def _as_bhw(t: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() == 4 and t.shape[1] == 1:
        t = t[:, 0]
    if t.dim() != 3:
        raise ValueError(f"{name} must have shape (B, H, W) or (B, 1, H, W), got {tuple(t.shape)}")
    return t


def _prepare(maps: torch.Tensor, masks: torch.Tensor):
    maps, masks = _as_bhw(maps, "maps"), _as_bhw(masks, "masks")
    if maps.shape != masks.shape:
        raise ValueError(f"maps {tuple(maps.shape)} and masks {tuple(masks.shape)} must have the same shape")
    if maps.device != masks.device:
        raise ValueError(f"maps ({maps.device}) and masks ({masks.device}) are on different devices")
    if not maps.is_floating_point():
        raise TypeError(f"maps must be floating point, got {maps.dtype}")
    dtype = torch.float64 if maps.dtype == torch.float64 else torch.float32
    masks = masks if masks.dtype == torch.bool else masks > 0.5
    return maps.detach().to(dtype), masks


def boxes_to_masks(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Boolean masks (B, H, W) from boxes (B, 4) ``(x0, y0, x1, y1)`` in pixels, ``x1``/``y1``
    exclusive (a pixel is inside when its index i satisfies x0 <= i < x1)."""
    boxes = torch.as_tensor(boxes)
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape (B, 4), got {tuple(boxes.shape)}")
    ys = torch.arange(height, device=boxes.device).view(1, -1, 1)
    xs = torch.arange(width, device=boxes.device).view(1, 1, -1)
    b = boxes.view(-1, 4, 1, 1)
    return (xs >= b[:, 0]) & (xs < b[:, 2]) & (ys >= b[:, 1]) & (ys < b[:, 3])


def energy_pointing_game(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Share of the positive map energy on the object, per image (see the module docstring)."""
    maps, masks = _prepare(maps, masks)
    pos = maps.clamp_min(0).flatten(1)
    total = pos.sum(1)
    inside = (pos * masks.flatten(1)).sum(1)
    return torch.where(total > 0, inside / total.clamp_min(torch.finfo(pos.dtype).tiny), torch.zeros_like(total))


def dilate(masks: torch.Tensor, radius: float) -> torch.Tensor:
    """Pixels within Euclidean distance ``radius`` of a mask pixel (bool, (B, H, W))."""
    masks = _as_bhw(masks, "masks")
    masks = masks if masks.dtype == torch.bool else masks > 0.5
    r = int(math.floor(radius))
    if r <= 0:
        return masks
    d = torch.arange(-r, r + 1, device=masks.device, dtype=torch.float32)
    disk = ((d.view(-1, 1) ** 2 + d.view(1, -1) ** 2) <= radius * radius + 1e-6).float()
    out = F.conv2d(masks.float().unsqueeze(1), disk.view(1, 1, 2 * r + 1, 2 * r + 1), padding=r)
    return out.squeeze(1) > 0.5


def pointing_game(maps: torch.Tensor, masks: torch.Tensor, tolerance: float = 0) -> torch.Tensor:
    """1.0 where the map's maximum is on the object (within ``tolerance`` pixels), else 0.0."""
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}")
    maps, masks = _prepare(maps, masks)
    pos = maps.clamp_min(0).flatten(1)
    top = pos.amax(1, keepdim=True)
    at_max = pos == top
    near = dilate(masks, tolerance).flatten(1)
    hit = (at_max & ~near).sum(1) == 0
    return (hit & (top.squeeze(1) > 0)).to(maps.dtype)


def topk_iou(maps: torch.Tensor, masks: torch.Tensor, k: float | str = 0.15) -> torch.Tensor:
    """IoU with the mask of the top-``k`` fraction of pixels (``k="mask"``: the object's area)."""
    maps, masks = _prepare(maps, masks)
    B = maps.shape[0]
    pos = maps.clamp_min(0).flatten(1)
    m = masks.flatten(1)
    N = pos.shape[1]
    if isinstance(k, str):
        if k != "mask":
            raise ValueError(f"k must be a fraction in (0, 1] or 'mask', got {k!r}")
        n = m.sum(1).clamp_min(1)
    else:
        if not 0 < float(k) <= 1:
            raise ValueError(f"k must be a fraction in (0, 1] or 'mask', got {k!r}")
        n = torch.full((B,), max(1, round(float(k) * N)), device=pos.device, dtype=torch.long)
    srt = pos.sort(dim=1, descending=True).values
    thresh = srt.gather(1, (n - 1).view(-1, 1))
    region = (pos >= thresh) & (pos > 0)
    inter = (region & m).sum(1).to(maps.dtype)
    union = (region | m).sum(1).to(maps.dtype)
    return torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(union))


def gaussian_blur(x: torch.Tensor, kernel_size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """Depthwise Gaussian blur of (B, C, H, W), reflect padding (replicate for tiny images)."""
    r = kernel_size // 2
    d = torch.arange(-r, r + 1, device=x.device, dtype=torch.float32)
    g = torch.exp(-0.5 * (d / sigma) ** 2)
    g = (g / g.sum()).to(x.dtype)
    C = x.shape[1]
    mode = "reflect" if min(x.shape[-2:]) > r else "replicate"
    y = F.pad(x, (r, r, 0, 0), mode=mode)
    y = F.conv2d(y, g.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    y = F.pad(y, (0, 0, r, r), mode=mode)
    return F.conv2d(y, g.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)


def make_baseline(x: torch.Tensor, baseline: str | torch.Tensor = "blur") -> torch.Tensor:
    """The image that deleted pixels take (``"blur"``, ``"mean"``, ``"zero"`` or a tensor)."""
    if isinstance(baseline, torch.Tensor):
        return baseline.to(x).expand_as(x)
    if baseline == "blur":
        return gaussian_blur(x)
    if baseline == "mean":
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    if baseline == "zero":
        return torch.zeros_like(x)
    raise ValueError(f"baseline must be one of {', '.join(BASELINES)} or a tensor, got {baseline!r}")


def pixel_order(maps: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """(B, N) pixel indices by decreasing map value, ties in a fixed pseudo-random order."""
    maps = _as_bhw(maps, "maps").detach()
    flat = maps.flatten(1)
    N = flat.shape[1]
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(seed)).to(flat.device)
    idx = torch.sort(flat[:, perm], dim=1, descending=True, stable=True).indices
    return perm[idx]


def auc(scores: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """Trapezoidal area under ``scores`` (B, K) over ``fractions`` (K,) increasing from 0 to 1."""
    dx = (fractions[1:] - fractions[:-1]).to(scores.dtype)
    return ((scores[:, 1:] + scores[:, :-1]) * 0.5 * dx).sum(1)


@torch.no_grad()
def deletion_insertion(model: nn.Module, x: torch.Tensor, maps: torch.Tensor, target: torch.Tensor, *,
                       steps: int = 20, baseline: str | torch.Tensor = "blur", batch_size: int = 64,
                       return_curves: bool = False) -> dict:
    """Deletion and insertion AUC per image (see the module docstring).

    Args:
        model: the classifier, called on batches like ``x`` (run in eval mode, modes restored).
        x: (B, C, H, W) images in the model's input space; maps: (B, H, W); target: (B,) classes.
        steps: number of equal steps (``steps + 1`` points from 0 to 1).
        baseline: ``"blur"``, ``"mean"``, ``"zero"`` or a tensor broadcastable to ``x``.
        batch_size: images per forward pass.

    Returns ``{"deletion": (B,), "insertion": (B,)}`` (and ``"deletion_curve"``,
    ``"insertion_curve"`` (B, steps + 1) and ``"fractions"`` (steps + 1,) with ``return_curves``).
    """
    from sib_fast.evaluation.explain import eval_mode

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got {tuple(x.shape)}")
    maps = _as_bhw(maps, "maps")
    B, C, H, W = x.shape
    if maps.shape != (B, H, W):
        raise ValueError(f"maps must have shape {(B, H, W)}, got {tuple(maps.shape)}")
    target = torch.as_tensor(target, device=x.device).long().reshape(-1)
    if target.numel() != B:
        raise ValueError(f"target must have {B} classes, got {target.numel()}")
    N = H * W
    base = make_baseline(x, baseline)
    rank = torch.empty(B, N, dtype=torch.long, device=x.device)
    order = pixel_order(maps.to(x.device))
    rank.scatter_(1, order, torch.arange(N, device=x.device).expand(B, N))
    rank = rank.view(B, 1, H, W)
    counts = [round(k * N / steps) for k in range(steps + 1)]
    fractions = torch.tensor([c / N for c in counts], dtype=torch.float64)

    def images():  # (kind, k, batch of B images): first/last points shared by both curves
        yield "x", None, x
        yield "base", None, base
        for k in range(1, steps):
            first = rank < counts[k]
            yield "deletion", k, torch.where(first, base, x)
            yield "insertion", k, torch.where(first, x, base)

    probs = {}
    with eval_mode(model):
        pending, keys = [], []

        def flush():
            p = torch.softmax(model(torch.cat(pending)).float(), dim=1)
            for j, key in enumerate(keys):
                probs[key] = p[j * B:(j + 1) * B].gather(1, target.view(-1, 1)).squeeze(1)
            pending.clear()
            keys.clear()

        per = max(1, batch_size // B)
        for kind, k, imgs in images():
            pending.append(imgs)
            keys.append((kind, k))
            if len(pending) >= per:
                flush()
        if pending:
            flush()
    p_x, p_base = probs[("x", None)], probs[("base", None)]
    dele = torch.stack([p_x] + [probs[("deletion", k)] for k in range(1, steps)] + [p_base], dim=1)
    ins = torch.stack([p_base] + [probs[("insertion", k)] for k in range(1, steps)] + [p_x], dim=1)
    fr = fractions.to(x.device)
    out = {"deletion": auc(dele, fr), "insertion": auc(ins, fr)}
    if return_curves:
        out.update(deletion_curve=dele, insertion_curve=ins, fractions=fractions)
    return out


def mean_ci(values, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap ``level`` interval of the mean (NaNs dropped; fixed seed)."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten().cpu()
    v = v[~torch.isnan(v)]
    if v.numel() == 0:
        return math.nan, math.nan, math.nan
    mean = float(v.mean())
    if v.numel() == 1:
        return mean, mean, mean
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, v.numel(), (n_boot, v.numel()), generator=g)
    means = v[idx].mean(1)
    a = (1 - level) / 2
    lo, hi = torch.quantile(means, torch.tensor([a, 1 - a], dtype=torch.float64)).tolist()
    return mean, lo, hi


# two-sided 95% quantiles of Student's t for 1 .. 30 degrees of freedom
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def mean_t_interval(values) -> tuple[float, float, float]:
    """Mean and 95% Student-t interval of the mean of a few values (seeds, checkpoints); NaNs and
    Nones dropped; one value gives (v, v, v), none (nan, nan, nan)."""
    v = [float(a) for a in values if a is not None and math.isfinite(float(a))]
    if not v:
        return math.nan, math.nan, math.nan
    mean = sum(v) / len(v)
    if len(v) == 1:
        return mean, mean, mean
    df = len(v) - 1
    z = 1.959964
    t = T95[df - 1] if df <= len(T95) else z + (z ** 3 + z) / (4 * df)  # Cornish-Fisher beyond the table
    half = t * math.sqrt(sum((a - mean) ** 2 for a in v) / df / len(v))
    return mean, mean - half, mean + half
