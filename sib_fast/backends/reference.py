"""The S-IB head in plain PyTorch, written straight from docs/loss.md sections 2-6.

This is the ground truth every fused backend is tested against. It favours
clarity over speed: full sorts, softmax weights over every rank, an
``avg_pool2d`` box mean and materialised masked tensors. Inputs of lower
precision than float32 are computed in float32 (docs/loss.md section 6, scale note);
float64 stays float64.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sib_fast.backends.constants import NORM_EPS, Q_HIGH, Q_LOW, Q_MASK, RANGE_EPS
from sib_fast.backends.random_features import gaussian_matrix


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (reductions never in half)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def soft_quantile(v: torch.Tensor, q: float, temperature: float) -> torch.Tensor:
    """docs/loss.md section 2: Q(v, q) per row of ``v`` (shape (B, n)), by a full sort.

    The sort is stable, so tied values take their ranks in index order; the
    fused backends select ranks with the same tie-breaking. A row holding NaN or +-Inf has
    Q = NaN (docs/loss.md section 8): the full-rank sum gives that wherever a far rank's weight
    underflows to 0 (0 * inf), and every backend makes it the rule.
    """
    n = v.shape[1]
    sorted_v = torch.sort(v, dim=1, stable=True).values
    value = (sorted_v * rank_weights(n, q, temperature, v)).sum(dim=1)
    return torch.where(torch.isfinite(v).all(dim=1), value, torch.nan)


def rank_weights(n: int, q: float, temperature: float, like: torch.Tensor) -> torch.Tensor:
    """docs/loss.md section 2's softmax weights over the n ranks, in ``like``'s dtype and device.

    Computed in float64 from the distances less the smallest: the same softmax, but at a tiny
    temperature (1e-40 in float32) the nearest rank keeps weight 1 instead of every logit
    becoming -inf and the softmax NaN.
    """
    dist = (torch.arange(n, device=like.device, dtype=torch.float64) - q * (n - 1)).abs()
    return torch.softmax(-(dist - dist.min()) / temperature, dim=0).to(like.dtype)


def box_mean(h: torch.Tensor, window_size: int) -> torch.Tensor:
    """docs/loss.md section 3: k x k mean, stride 1, zero padding k//2, divided by k*k.

    A window wider than ``whole_image_window`` sums the whole image at every pixel, as that one
    does; avg_pool2d takes the smaller (its kernel is a C int) and the sum is divided by k*k.
    """
    k = min(window_size, whole_image_window(*h.shape[-2:]))
    box = F.avg_pool2d(h.unsqueeze(1), k, stride=1, padding=k // 2).squeeze(1)
    return box if k == window_size else box * (k / window_size) ** 2


def spatial_mask(R: torch.Tensor, window_size: int = 31, temperature: float = 0.1,
                 slope: float = 10.0) -> torch.Tensor:
    """docs/loss.md section 3: the soft mask M of shape (B, H, W)."""
    R = R.to(compute_dtype(R))
    B, _, H, W = R.shape
    a = R.mean(dim=1).abs().reshape(B, H * W)
    lo = soft_quantile(a, Q_LOW, temperature)[:, None]
    hi = soft_quantile(a, Q_HIGH, temperature)[:, None]
    u = (a - lo) / (hi - lo + RANGE_EPS)
    t1 = soft_quantile(u, Q_MASK, temperature)[:, None]
    h = torch.sigmoid(slope * (u - t1))
    d = box_mean(h.reshape(B, H, W), window_size).reshape(B, H * W)
    t2 = soft_quantile(d, Q_MASK, temperature)[:, None]
    return torch.sigmoid(slope * (d - t2)).reshape(B, H, W)


def whole_image_window(H: int, W: int) -> int:
    """The smallest window whose k x k box holds the whole H x W image from every pixel.

    Every larger window does too, so its box mean is the image's sum / k*k at every pixel, d is
    constant, t2 = d and M = 1/2 with no gradient: the function is the same for all of them.
    """
    return 2 * max(H, W) - 1


def _unit_rows(u: torch.Tensor) -> torch.Tensor:
    """u / max(||u||, 1e-12) per row (docs/loss.md section 4), NaN for a row whose norm overflows.

    HSIC does not depend on the scale of R or x, but a norm past the dtype's range (about 1e19
    per value in float32) is inf and u / inf = 0 would give a finite, wrong HSIC. Every backend
    returns NaN there instead (docs/numerics.md).
    """
    norm = torch.linalg.vector_norm(u, dim=1, keepdim=True)
    return u / torch.where(torch.isinf(norm), torch.nan, norm.clamp_min(NORM_EPS))


def _hsic_of_rows(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """docs/loss.md section 4's HSIC of the unit rows U, V (B x n each)."""
    B = U.shape[0]
    P = torch.eye(B, dtype=U.dtype, device=U.device) - 1.0 / B
    Kc = P @ (U @ U.T) @ P
    Lc = P @ (V @ V.T) @ P
    return (Kc * Lc).sum() / (B - 1) ** 2


def hsic(R: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """docs/loss.md section 4: linear-kernel HSIC between R*M and x*M over the batch."""
    m = mask.unsqueeze(1)
    return _hsic_of_rows(_unit_rows((R * m).flatten(1)), _unit_rows((x * m).flatten(1)))


def random_feature_hsic(R: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """docs/loss.md section 4b, as written: U and V normalised, projected by the materialised
    D x F matrix ``W``, normalised again, then the HSIC of section 4."""
    m = mask.unsqueeze(1)
    U = _unit_rows((R * m).flatten(1))
    V = _unit_rows((x * m).flatten(1))
    return _hsic_of_rows(_unit_rows(U @ W), _unit_rows(V @ W))


def masked_projection(R: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, features: int, seed: int):
    """(proj, sq) of the masked_projection ops (csrc/sib_head_schema.h), with W materialised:
    proj (2, B, F) = u @ W and v @ W, sq (2, B) = ||u||^2 and ||v||^2, u = R*M, v = x*M."""
    dtype = compute_dtype(R, x)
    m = mask.to(dtype).unsqueeze(1)
    u, v = (R.to(dtype) * m).flatten(1), (x.to(dtype) * m).flatten(1)
    W = gaussian_matrix(seed, u.shape[1], features, dtype=dtype, device=u.device)
    return torch.stack((u @ W, v @ W)), torch.stack(((u * u).sum(dim=1), (v * v).sum(dim=1)))


def background_variance(R: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """docs/loss.md section 5: mean over images of the unbiased variance of R*(1-M)."""
    r = (R * (1 - mask).unsqueeze(1)).flatten(1)
    return r.var(dim=1, unbiased=True).mean()


def sib_terms(R: torch.Tensor, x: torch.Tensor, window_size: int = 31,
              temperature: float = 0.1, slope: float = 10.0, hsic_features: int | None = None,
              projection_seed: int | None = None):
    """(hsic, bg, mask) of docs/loss.md sections 3-5, in the compute dtype.

    With ``hsic_features`` F, hsic is section 4b's HSIC_F with the D x F matrix of
    ``projection_seed`` materialised (sib_fast/backends/random_features.py), as the authors do.
    """
    dtype = compute_dtype(R, x)
    R, x = R.to(dtype), x.to(dtype)
    mask = spatial_mask(R, window_size, temperature, slope)
    if hsic_features is None:
        dependence = hsic(R, x, mask)
    else:
        W = gaussian_matrix(projection_seed, R[0].numel(), hsic_features, dtype=dtype, device=R.device)
        dependence = random_feature_hsic(R, x, mask, W)
    return dependence, background_variance(R, mask), mask


def sib_loss(logits: torch.Tensor, target: torch.Tensor, hsic_value: torch.Tensor,
             bg_value: torch.Tensor, lambda_fg: float = 0.01, lambda_bg: float = 1000.0):
    """docs/loss.md section 6: CE + lambda_bg * exp(BG) + lambda_fg * exp(-HSIC)."""
    ce = F.cross_entropy(logits, target)
    return ce + lambda_bg * torch.exp(bg_value) + lambda_fg * torch.exp(-hsic_value)
