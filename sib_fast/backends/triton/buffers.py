"""The small buffers every stage shares: their layout, and the table of rank weights.

Per image, ``stats`` holds STATS values (lo, q80, hi, t2, background mean and variance) and
the selection N_WINDOWS rows of SLOTS ranks (flat indices and weights); the table holds the
soft-quantile weights of each rank window, w_i = softmax_i(-|r0 + i - t| / T) with
t = q (N - 1), then a row of parameters. The kernels take the layout as constexprs (``CONST``).
"""
import functools
import math

import torch

from sib_fast.backends.constants import (NORM_EPS, Q_HIGH, Q_LOW, Q_MASK, QUANTILES, RANGE_EPS, RANK_WINDOW,
                                         RANKS_BELOW)

SLOTS = 1 << (RANK_WINDOW - 1).bit_length()  # a rank window padded to a power of two (32)
N_WINDOWS = QUANTILES  # Q(a, .05), Q(a, .8), Q(a, .95), Q(d, .8)
STATS = 8  # per image: lo, q80, hi, t2, mean of r = R(1-M), var of r, 2 unused
# The table ``rank_table`` builds: N_WINDOWS rows of rank weights, then one row of parameters
# (kept in the compute dtype: Triton passes Python floats as float32).
P_SLOPE, P_RANGE_EPS, P_NORM_EPS, P_FIXED = 0, 1, 2, 3
TABLE_SIZE = (N_WINDOWS + 1) * SLOTS
CONST = dict(N_STATS=STATS, NSLOT=SLOTS, N_WIN=N_WINDOWS)  # the layout as the kernels take it


def rank_windows(N: int):
    """(first rank, length, exact t) of the rank window of each quantile (docs/loss.md section 2)."""
    out = []
    for q in (Q_LOW, Q_MASK, Q_HIGH, Q_MASK):
        t = q * (N - 1)
        f = math.floor(t)
        r0, r1 = max(0, f - RANKS_BELOW), min(N - 1, f + RANK_WINDOW - RANKS_BELOW - 1)
        out.append((r0, r1 - r0 + 1, t))
    return tuple(out)


def fixed_point_bits(window_size: int, dtype: torch.dtype) -> int:
    """S such that the forward box sums of h * 2^S (h in (0, 1)) fit the signed integer type.

    In float64 (int64 sums) the grid of the C++ kernels (``box_grid_bits`` in
    csrc/sib_head.h), so that all backends round h alike.
    """
    if dtype == torch.float64:
        return max(0, 52 - (window_size * (window_size + 1)).bit_length())
    return 30 - math.ceil(math.log2(window_size * window_size + 1))


@functools.lru_cache(maxsize=64)
def rank_table_values(N: int, temperature: float, slope: float, window_size: int, dtype: torch.dtype):
    """The table's TABLE_SIZE values: the rank weights of each window, then the parameters."""
    values = [0.0] * TABLE_SIZE
    for k, (r0, length, t) in enumerate(rank_windows(N)):
        # distances less the smallest, as csrc's rank_weights: at a tiny temperature (1e-320) the
        # nearest rank keeps weight 1, where every -dist / T would be -inf and the softmax NaN
        dist = [abs(r0 + i - t) for i in range(length)]
        e = [math.exp(-(v - min(dist)) / temperature) for v in dist]
        total = sum(e)
        for i in range(length):
            values[k * SLOTS + i] = e[i] / total
    values[N_WINDOWS * SLOTS + P_SLOPE] = slope
    values[N_WINDOWS * SLOTS + P_RANGE_EPS] = RANGE_EPS
    values[N_WINDOWS * SLOTS + P_NORM_EPS] = NORM_EPS
    values[N_WINDOWS * SLOTS + P_FIXED] = 2.0 ** fixed_point_bits(window_size, dtype)
    return tuple(values)


@functools.lru_cache(maxsize=64)
def _rank_table_cached(N, temperature, slope, window_size, dtype, device):
    return torch.tensor(rank_table_values(N, temperature, slope, window_size, dtype), dtype=dtype, device=device)


def rank_table(N, temperature, slope, window_size, dtype, device, cached=True):
    """Rank weights and parameters in the compute dtype, cached per geometry and device unless
    ``cached`` is false (the launchers' choice while launches are recorded)."""
    if not cached:
        return torch.tensor(rank_table_values(N, temperature, slope, window_size, dtype), dtype=dtype, device=device)
    return _rank_table_cached(N, float(temperature), float(slope), int(window_size), dtype, device)
