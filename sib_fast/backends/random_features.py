"""The Gaussian matrix W of the random-feature HSIC (docs/loss.md section 4b), from a counter-based generator.

Every backend computes the same W from (seed, d, f), so a fused kernel can compute each entry
where it uses it, in the forward products and again in the backward, and never store D x F
numbers. The generator, written with 32-bit unsigned arithmetic (docs/random_features.md):

    mix(z)      = lowbias32: z ^= z >> 16; z *= 0x7feb352d; z ^= z >> 15; z *= 0x846ca68b; z ^= z >> 16
    lo, hi      = the low and high 32 bits of the seed (0 <= seed < 2**63)
    row_key     = mix(lo ^ mix(hi ^ 0x243f6a88))      col_key = mix(hi ^ mix(lo ^ 0x85a308d3))
    a_d         = mix(d ^ row_key)                    b_f     = mix(f ^ col_key)
    h(d, f)     = mix(a_d + b_f mod 2**32)
    W[d, 2j]    = sqrt(-2 ln u1) cos(2 pi u2)         W[d, 2j+1] = sqrt(-2 ln u1) sin(2 pi u2)
    with u1 = ((h(d, 2j) >> 8) + 1) / 2**24 in (0, 1],   u2 = (h(d, 2j+1) >> 8) / 2**24 in [0, 1)

Box-Muller of two hashed 24-bit uniforms: the entries are independent N(0, 1) draws (their tail
ends at |w| = 5.77). d indexes the flattened (C, H, W) image, whatever the memory layout; f the
F features; for an odd F the last pair's sine is not used.

Here in plain PyTorch, on int64 tensors holding the 32-bit values: the multiplications by the
constants are split into 16-bit halves so that no product leaves int64. ``projected_hsic`` is the
B x F end of the fused backends' HSIC_F: from their projections u W, v W and norms to the HSIC.
"""
from __future__ import annotations

import math

import torch

from sib_fast.backends.constants import NORM_EPS

MASK32 = 0xFFFFFFFF
MIX_MULTIPLIERS = (0x7FEB352D, 0x846CA68B)
ROW_SALT, COL_SALT = 0x243F6A88, 0x85A308D3
UNIFORM_BITS = 24
MAX_SEED = 2**63 - 1
MAX_FEATURES = 2**31 - 1
ROWS_PER_CHUNK = 4096  # bounds the int64 temporaries of gaussian_matrix


def _times(z, multiplier: int):
    """z * multiplier mod 2**32, for z in [0, 2**32): an int or an int64 tensor."""
    low, high = multiplier & 0xFFFF, multiplier >> 16
    return (z * low + (((z * high) & 0xFFFF) << 16)) & MASK32


def mix(z):
    """lowbias32, the 32-bit integer hash of the generator (an int or an int64 tensor in [0, 2**32))."""
    z = z ^ (z >> 16)
    z = _times(z, MIX_MULTIPLIERS[0])
    z = z ^ (z >> 15)
    z = _times(z, MIX_MULTIPLIERS[1])
    return z ^ (z >> 16)


def keys(seed: int) -> tuple[int, int]:
    """(row_key, col_key) of a seed."""
    lo, hi = seed & MASK32, (seed >> 32) & MASK32
    return mix(lo ^ mix(hi ^ ROW_SALT)), mix(hi ^ mix(lo ^ COL_SALT))


def gaussian_matrix(seed: int, rows: int, features: int, *, dtype: torch.dtype = torch.float64,
                    device=None) -> torch.Tensor:
    """W (rows x features) of the seed, in ``dtype``: the matrix the fused backends never store."""
    row_key, col_key = keys(seed)
    pairs = (features + 1) // 2
    f = torch.arange(2 * pairs, dtype=torch.int64, device=device)
    b = mix(f ^ col_key)
    w = torch.empty(rows, features, dtype=dtype, device=device)
    scale = 2.0 ** -UNIFORM_BITS
    for start in range(0, rows, ROWS_PER_CHUNK):
        d = torch.arange(start, min(rows, start + ROWS_PER_CHUNK), dtype=torch.int64, device=device)
        h = mix((mix(d ^ row_key)[:, None] + b) & MASK32)
        u1 = ((h[:, 0::2] >> 8) + 1).to(torch.float64) * scale
        u2 = (h[:, 1::2] >> 8).to(torch.float64) * scale
        radius = torch.sqrt(-2.0 * torch.log(u1))
        angle = (2.0 * math.pi) * u2
        pair = torch.stack((radius * torch.cos(angle), radius * torch.sin(angle)), dim=2).flatten(1)
        w[start:start + len(d)] = pair[:, :features].to(dtype)
    return w


def _unit(rows: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """rows / norm, NaN for a row whose norm overflowed (docs/numerics.md: never a silent 0)."""
    return rows / torch.where(torch.isinf(norm), torch.nan, norm)


def projected_hsic(proj: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
    """HSIC_F (docs/loss.md section 4b) from the fused backends' masked_projection outputs.

    ``proj`` (2, B, F) holds u @ W and v @ W, ``sq`` (2, B) the squared norms of u = R*M and
    v = x*M. Then U_b W = p_b / max(||u_b||, 1e-12), U'_b = U_b W / max(||U_b W||, 1e-12) (NaN
    where a norm overflows, as the reference's unit rows), and the HSIC of section 4 on U', V'.
    The fused backends share this B x F post-processing; the reference computes HSIC_F its own
    way (normalise u, then U @ W), so the tests compare two independent computations.
    """
    # sqrt of the clamped square: the same max(||u||, 1e-12), but no 0/0 in the gradient of a
    # zero row (sqrt's derivative at 0 times the clamp's zero)
    norm = sq.clamp_min(NORM_EPS * NORM_EPS).sqrt()
    projected = _unit(proj, norm.unsqueeze(-1))
    unit = _unit(projected, torch.linalg.vector_norm(projected, dim=-1, keepdim=True).clamp_min(NORM_EPS))
    B = proj.shape[1]
    grams = unit @ unit.transpose(1, 2)  # K and L, (2, B, B)
    # P K P with P = I - 1/B: less the row and column means, plus the grand mean
    centred = grams - grams.mean(dim=1, keepdim=True) - grams.mean(dim=2, keepdim=True) \
        + grams.mean(dim=(1, 2), keepdim=True)
    return (centred[0] * centred[1]).sum() / (B - 1) ** 2
