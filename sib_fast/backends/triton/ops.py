"""The ``triton`` backend: the S-IB head (SPEC sections 2-7) as fused Triton kernels.

Stages and their kernels (``B`` images, ``C`` channels, ``N = H*W`` pixels):

forward
  1. ``_channel_mean_kernel``   R -> g = mean_c R (plane, B x N); reads R once.
  2. ``_select_kernel``         per image: a radix select over the bit patterns of
                                |g| (non-negative floats order like their integer bits),
                                narrowing to the ranks floor(t)-8 .. floor(t)+9 of
                                Q(a, .05), Q(a, .8), Q(a, .95), ties broken by flat index
                                as a stable sort does; writes the soft quantiles and the
                                selected indices and weights for the backward. On real
                                maps it reads the plane three or four times (key range,
                                one or two digits, then a list of the pixels still in
                                range, a few hundred or thousand).
  3. ``_hbox_kernel``           h = sigmoid(s (u - t1)) and its row box sums (running
                                sums: O(1) per pixel whatever the window; in wrapping fixed
                                point, so box sums are exact and equal windows tie exactly).
  4. ``_vbox_kernel``           column box sums -> d = box_mean_k(h).
  5. ``_select_kernel``         t2 = Q(d, .8) and its selected ranks.
  6. ``_gram_kernel``           one pass over R, x and d: M = sigmoid(s (d - t2)) (written
                                once), the raw masked Gram matrices of R and of x (dots on
                                masked tiles, per pixel split; partial Grams reduced in a
                                fixed order) and the background moments (Chan's combination
                                of per-tile mean and M2, so no cancellation).
  7. ``_gram_reduce_kernel``    the partial Grams summed over the splits in a fixed order.
     ``_finalize_kernel``       one program: normalise, centre, HSIC, background variance.

backward (upstream dH, dBG and optionally dM)
  8. ``_bwd_prep_kernel``       A = d loss / d(masked R Gram) folded with the normalisation,
                                and the same A' for x (on sm_90 as their tf32 parts, so the
                                3xTF32 products below do not split them again in each loop).
  9. ``_bwd_dm_kernel``         one pass over R, x, M: dM of the Gram and background terms,
                                dx when x needs it, then dz = dM * s M (1 - M) and its sums;
                                g = mean_c R again (the forward keeps no plane of it).
                                For a whole batch over BWD_PAIR_MAX, two launches: R's
                                share of dM (and g), then x's (and the rest).
 10. ``_t2_scatter_kernel``     d t2 back to the selected ranks of d.
 11. ``_hbox_kernel``, ``_vbox_kernel``  the box mean is self-adjoint; the column pass ends
                                with dy = dh * s h (1 - h) and its per-image sums.
 12. ``_bwd_scalars_kernel``    dt1, dlo, dq80, dhi; their rank weights scattered into dy.
 13. ``_bwd_dr_kernel``         one pass over R, M writing dR = M (A @ (M R)) + background
                                term + sign(g) da / C.

Traffic on the big tensors (B x C x H x W), against the floor of SPEC section 7 (R and x
read once, dR written once: 3 tensors): the forward reads R twice and x once, the backward
reads R twice and x once and writes dR (and dx when asked): 7 tensors, 2.3x the floor.
Beyond 32 images the backward's image blocks read R and x once per block, from L2 when
the blocks of one pixel range run together (they are adjacent in the grid).

Planes (B x N) are kept in the compute dtype (float32, or float64 when an input is
float64). The backward's three planes (g, dz/dy, prefix sums) are channels of dR itself
when it can hold them (``_backward_planes``), so forward and backward together allocate
dR, the saved mask and small buffers: 1.33x the size of R for three channels in float32
(the target is 1.5x; tests/test_triton_backend.py measures it). The big tensors are read in their own dtype and layout (contiguous,
channels_last or any strides). Every reduction has a fixed order, so results are
deterministic. Registered as the custom ops ``sib_fast_triton::head_forward``,
``sib_fast_triton::mask_forward`` and ``sib_fast_triton::head_backward`` with fake
kernels and autograd, so the head composes with autograd and ``torch.compile``.

Under ``TRITON_INTERPRET=1`` (set before this module is imported) the kernels run on
CPU tensors through Triton's interpreter; the tests use that.
"""
import functools
import math
import re
from typing import Optional

import torch
import triton
import triton.language as tl

from sib_fast.backends.autograd import refuse_higher_order_gradient
from sib_fast.backends.constants import NORM_EPS, Q_HIGH, Q_LOW, Q_MASK, RANGE_EPS, RANK_WINDOW
from sib_fast.backends.reference import compute_dtype, whole_image_window

SLOTS = 32  # RANK_WINDOW padded to a power of two
N_WINDOWS = 4  # Q(a, .05), Q(a, .8), Q(a, .95), Q(d, .8)
STATS = 8  # per image: lo, q80, hi, t2, mean of r = R(1-M), var of r, 2 unused
# The table ``_table`` builds: N_WINDOWS rows of rank weights, then one row of parameters
# (kept in the compute dtype: Triton passes Python floats as float32).
P_SLOPE, P_RANGE_EPS, P_NORM_EPS, P_FIXED = 0, 1, 2, 3
TABLE_SIZE = (N_WINDOWS + 1) * SLOTS
MAX_IMAGE_BLOCK = 128  # images per Gram tile
BWD_SINGLE_MAX = 32  # the backward keeps A on chip up to this batch
BWD_DR_SINGLE_MAX = 32  # pass 2 alone up to this batch (tune: 128 on sm_90, see _Plan)
BWD_IMAGE_BLOCK = 32  # else image blocks of this size (64 spills on sm_80 with channels_last R)
# Pass 1 keeps A and A' on chip together up to this batch, beyond it (BWD_SINGLE_MAX=128) it is
# two launches with one each: at 128 images the pair needs 278 KB of shared memory on sm_90 (227)
BWD_PAIR_MAX = 64
BWD_PIXEL_BLOCK = 16  # pixels per iteration of the backward passes
BWD_WARPS = 8  # 4 warps spill a little at 16 images on sm_90 (ptxas stops at 128 registers)
SELECT_CHUNK = 2048  # elements per iteration of the rank select (4096 spills under Triton 3.6)
# The select's histograms: Triton 3.8 counts tl.histogram with one shared-memory atomic per
# element; 3.6 and 3.7 with warp ballots whose cost grows with the bins (PTX for sm_90, per
# element: about 66 instructions at 16 bins, 74 at 128, 112 at 256, 353 at 2048; 3.8: 16-23).
# So bits per radix pass: under ballots 4 (on 224x224 maps the pixels are listed after two
# passes instead of one, each a fraction of the cost; 8 needs 255 registers on sm_80 and spills
# on sm_90), under atomics 8 (fewer passes at about the same cost each).
SELECT_DIGIT_BITS = 8 if tuple(map(int, re.match(r"(\d+)\.(\d+)", triton.__version__).groups())) >= (3, 8) else 4
HBOX_BLOCK = (4, 128)  # rows x columns per iteration of the row running sums
VBOX_BLOCK = (32, 32)  # rows x columns per iteration of the column running sums


# ----------------------------------------------------------------------------------------
# shared device helpers
# ----------------------------------------------------------------------------------------

@triton.jit
def _gram_stats(raw, B, jj, norm_eps, CT: tl.constexpr, RB: tl.constexpr, BB: tl.constexpr):
    """For the B x B raw Gram at ``raw``: sqrt of its diagonal, n = max(that, eps) (1 past B),
    the row means of K = raw / (n n^T) (= its column means) and their mean, indexed by jj."""
    jm = jj < B
    root = tl.sqrt(tl.load(raw + jj * B + jj, mask=jm, other=1))
    n = tl.where(jm, tl.maximum(root, norm_eps), 1.0)
    row_mean = tl.zeros([BB], CT)
    for r0 in range(0, B, RB):
        rows = r0 + tl.arange(0, RB)
        rm = rows < B
        n_rows = tl.maximum(tl.sqrt(tl.load(raw + rows * B + rows, mask=rm, other=1)), norm_eps)
        K = tl.load(raw + rows[:, None] * B + jj[None, :], mask=rm[:, None] & jm[None, :], other=0) \
            / (n_rows[:, None] * n[None, :])
        rs = tl.sum(K, axis=1) / B
        row_mean += tl.sum(tl.where(rows[:, None] == jj[None, :], rs[:, None], 0.0), axis=0)
    return root, n, row_mean, tl.sum(row_mean, axis=0) / B


@triton.jit
def _pixel_offsets(p, W, sh, sw, FLAT: tl.constexpr):
    """Offsets of the pixels p (flat over H x W) in a map of row and column strides sh, sw;
    FLAT: pixel p sits at p * sw (contiguous rows), so no division."""
    if FLAT:
        off = p.to(tl.int64) * sw
    else:
        off = (p // W).to(tl.int64) * sh + (p % W).to(tl.int64) * sw
    return off


@triton.jit
def _at_rows(vec, rows, jj):
    """vec (indexed by jj) read at the indices ``rows``."""
    return tl.sum(tl.where(rows[:, None] == jj[None, :], vec[None, :], 0.0), axis=1)


# ----------------------------------------------------------------------------------------
# stage 1: channel mean
# ----------------------------------------------------------------------------------------

@triton.jit
def _channel_mean_kernel(R, g, C, N, W, sb, sc, sh, sw,
                         FLAT: tl.constexpr, CT: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(1)
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    pm = p < N
    pix = _pixel_offsets(p, W, sh, sw, FLAT)
    base = R + b.to(tl.int64) * sb + pix
    acc = tl.zeros([BLOCK], CT)
    for c in range(C):
        acc += tl.load(base + c * sc, mask=pm, other=0).to(CT)
    tl.store(g + b.to(tl.int64) * N + p, acc / C, mask=pm)


# ----------------------------------------------------------------------------------------
# stage 2: rank selection (per image, no sort)
# ----------------------------------------------------------------------------------------

@triton.jit
def _chunk_keys(base, lst, start, n, FROM_LIST: tl.constexpr, KT: tl.constexpr, KMASK: tl.constexpr,
                CHUNK: tl.constexpr):
    """Flat indices start .. start + CHUNK - 1 of the candidate list (or of the plane itself),
    whether each exists, their values and the values' keys: integers that order like |value|."""
    offs = start + tl.arange(0, CHUNK)
    valid = offs < n
    if FROM_LIST:
        p = tl.load(lst + offs, mask=valid, other=0)
    else:
        p = offs
    value = tl.load(base + p, mask=valid, other=0)
    return p, valid, value, value.to(KT, bitcast=True) & KMASK


@triton.jit
def _digit_histogram(base, lst, n, shift, width, pre, slot_of, FROM_LIST: tl.constexpr, SLOT_BITS: tl.constexpr,
                     N_TARGETS: tl.constexpr, KT: tl.constexpr, KMASK: tl.constexpr, CHUNK: tl.constexpr,
                     DIGIT: tl.constexpr):
    """Histogram of the key digit of ``width`` (<= DIGIT) bits at ``shift``, one row of 2^DIGIT
    bins per leading target.

    An element counts in the row of the target whose prefix (the key above the digit) it
    shares; targets with equal prefixes share the row of the first (``slot_of``), so one read
    of the plane (or of the candidate list) serves every target.
    """
    tr = tl.arange(0, 8)
    hist = tl.zeros([1 << (DIGIT + SLOT_BITS)], tl.int32)
    for start in range(0, n, CHUNK):
        _, valid, _, key = _chunk_keys(base, lst, start, n, FROM_LIST, KT, KMASK, CHUNK)
        digit = ((key >> shift) & ((1 << width) - 1)).to(tl.int32)
        above = key >> (shift + width)
        slot = tl.full([CHUNK], -1, tl.int32)
        for s in tl.static_range(N_TARGETS):
            leads = tl.sum(tl.where(tr == s, slot_of, 0), axis=0) == s
            pre_s = tl.sum(tl.where(tr == s, pre, 0), axis=0)
            slot = tl.where((above == pre_s) & leads, s, slot)
        hist += tl.histogram((slot << DIGIT) | digit, 1 << (DIGIT + SLOT_BITS), mask=valid & (slot >= 0))
    return hist


@triton.jit
def _narrow_targets(hist, width, pre, kk, cnt, slot_of, SLOT_BITS: tl.constexpr, N_TARGETS: tl.constexpr,
                    KT: tl.constexpr, DIGIT: tl.constexpr):
    """One radix step: each target's prefix gains the ``width``-bit digit holding its rank ``kk``."""
    tr = tl.arange(0, 8)
    rows = tl.reshape(hist, [1 << SLOT_BITS, 1 << DIGIT])
    cum = tl.cumsum(rows, axis=1)
    row_ids = tl.arange(0, 1 << SLOT_BITS)
    bins = tl.arange(0, 1 << DIGIT)
    for t in range(N_TARGETS):
        own = row_ids[:, None] == tl.sum(tl.where(tr == t, slot_of, 0), axis=0)
        cum_t = tl.sum(tl.where(own, cum, 0), axis=0)
        k_t = tl.sum(tl.where(tr == t, kk, 0), axis=0)
        below = cum_t <= k_t
        digit_t = tl.sum(below.to(tl.int32), axis=0)
        n_below = tl.max(tl.where(below, cum_t, 0), axis=0)
        in_digit = tl.sum(tl.where(own & (bins[None, :] == digit_t), rows, 0))
        pre_t = tl.sum(tl.where(tr == t, pre, 0), axis=0)
        kk = tl.where(tr == t, k_t - n_below, kk)
        cnt = tl.where(tr == t, in_digit, cnt)
        pre = tl.where(tr == t, (pre_t << width) | digit_t.to(KT), pre)
    return pre, kk, cnt


@triton.jit
def _leading_targets(pre, N_TARGETS: tl.constexpr):
    """For each target, the first target with the same prefix (whose histogram row it reads)."""
    tr = tl.arange(0, 8)
    same = (pre[:, None] == pre[None, :]) & (tr[None, :] < N_TARGETS)
    return tl.min(tl.where(same, tr[None, :], 8), axis=1)


@triton.jit
def _compact_candidates(base, lst, N, shift, pre, NQ: tl.constexpr, KT: tl.constexpr, KMASK: tl.constexpr,
                        CHUNK: tl.constexpr):
    """Writes to ``lst``, in index order, the pixels whose key prefix (key >> shift) lies
    between the prefixes of some window's first and last rank; returns their number.

    Every later radix step and the collection look only at these: the targets' elements
    share their prefixes, and a window's elements lie between them.
    """
    tr = tl.arange(0, 8)
    taken = tl.zeros([], tl.int32)
    for start in range(0, N, CHUNK):
        offs, valid, _, key = _chunk_keys(base, lst, start, N, False, KT, KMASK, CHUNK)
        above = key >> shift
        inside = tl.zeros([CHUNK], tl.int1)
        for q in tl.static_range(NQ):
            lo = tl.sum(tl.where(tr == 2 * q, pre, 0), axis=0)
            hi = tl.sum(tl.where(tr == 2 * q + 1, pre, 0), axis=0)
            inside = inside | ((above >= lo) & (above <= hi))
        inside = inside & valid
        e = inside.to(tl.int32)
        tl.store(lst + taken + tl.cumsum(e, 0) - e, offs, mask=inside)
        taken += tl.sum(e, axis=0)
    return taken


@triton.jit
def _collect_windows(base, lst, n, pre, kk, rows, sel_idx, scr_val, FROM_LIST: tl.constexpr, NQ: tl.constexpr,
                     KT: tl.constexpr, KMASK: tl.constexpr, CHUNK: tl.constexpr, NSLOT: tl.constexpr):
    """Stores, in index order, the flat index and |value| of every window's elements.

    Window q is the elements from the kk[2q]-th occurrence of key pre[2q] to the
    kk[2q+1]-th occurrence of key pre[2q+1] (occurrences in index order, as a stable sort
    orders ties). All windows are collected in one read, as columns of [CHUNK, 4] tiles.
    """
    tr = tl.arange(0, 8)
    w = tl.arange(0, 4)
    first = tr[None, :] == 2 * w[:, None]
    last = tr[None, :] == 2 * w[:, None] + 1
    v_lo = tl.sum(tl.where(first, pre[None, :], 0), axis=1)[None, :]
    k_lo = tl.sum(tl.where(first, kk[None, :], 0), axis=1)[None, :]
    v_hi = tl.sum(tl.where(last, pre[None, :], 0), axis=1)[None, :]
    k_hi = tl.sum(tl.where(last, kk[None, :], 0), axis=1)[None, :]
    live = (w < NQ)[None, :]
    seen_lo = tl.zeros([4], tl.int32)
    seen_hi = tl.zeros([4], tl.int32)
    taken = tl.zeros([4], tl.int32)
    for start in range(0, n, CHUNK):
        p, valid, v, key = _chunk_keys(base, lst, start, n, FROM_LIST, KT, KMASK, CHUNK)
        v = tl.abs(v)
        key = key[:, None]
        ok = valid[:, None] & live
        e_lo = (ok & (key == v_lo)).to(tl.int32)
        e_hi = (ok & (key == v_hi)).to(tl.int32)
        occ_lo = seen_lo[None, :] + tl.cumsum(e_lo, 0) - e_lo
        occ_hi = seen_hi[None, :] + tl.cumsum(e_hi, 0) - e_hi
        inside = ok & ((key > v_lo) | ((e_lo != 0) & (occ_lo >= k_lo))) \
            & ((key < v_hi) | ((e_hi != 0) & (occ_hi <= k_hi)))
        e_in = inside.to(tl.int32)
        slot = taken[None, :] + tl.cumsum(e_in, 0) - e_in
        keep = inside & (slot < NSLOT)
        at = rows[None, :] + slot
        tl.store(sel_idx + at, tl.broadcast_to(p[:, None], [CHUNK, 4]), mask=keep)
        tl.store(scr_val + at, tl.broadcast_to(v[:, None], [CHUNK, 4]), mask=keep)
        seen_lo += tl.sum(e_lo, axis=0)
        seen_hi += tl.sum(e_hi, axis=0)
        taken += tl.sum(e_in, axis=0)


@triton.jit
def _key_range(base, N, KT: tl.constexpr, KMASK: tl.constexpr, CHUNK: tl.constexpr):
    """The smallest and the largest key of the plane."""
    lo = tl.full([CHUNK], KMASK, KT)
    hi = tl.zeros([CHUNK], KT)
    for start in range(0, N, CHUNK):
        _, valid, _, key = _chunk_keys(base, base, start, N, False, KT, KMASK, CHUNK)
        lo = tl.minimum(lo, tl.where(valid, key, KMASK))
        hi = tl.maximum(hi, tl.where(valid, key, 0))
    return tl.min(lo, axis=0), tl.max(hi, axis=0)


@triton.jit
def _select_kernel(plane, lst, list_stride, table, stats, sel_idx, sel_w, scr_val, N,
                   r0_0, len_0, r0_1, len_1, r0_2, len_2,
                   WIN0: tl.constexpr, NQ: tl.constexpr, CT: tl.constexpr, KT: tl.constexpr,
                   CHUNK: tl.constexpr, DIGIT: tl.constexpr, NSLOT: tl.constexpr, N_WIN: tl.constexpr,
                   N_STATS: tl.constexpr):
    """Soft quantiles Q(|plane_b|, q) for NQ windows of consecutive ranks (one image per program).

    Window q holds the ranks r0_q .. r0_q + len_q - 1 of the image's values sorted
    stably (ties by flat index). A radix select over the bit patterns (DIGIT-bit digits)
    finds the key and the tie occurrence of each window's first and last rank (its
    targets): one histogram per pass serves every target, a row per distinct prefix. The
    high bits shared by the smallest and the largest key are shared by all and need no
    pass: the digits start at the highest bit that varies. Once the pixels whose prefix
    lies in some window's range are at most half the image, they are listed in ``lst``
    (B x list_stride int32, free scratch) and later passes read only them: on real maps
    one (8-bit digits) or two (4-bit) histogram passes over the whole plane besides the
    key range and the listing, then a few hundred or thousand pixels. One more read (of
    the list) collects the windows' elements in index order; pairwise comparison of those
    few elements ranks them. Writes Q to stats[b, WIN0 + q] and, in rank order, the flat
    indices (-1 past the window) and weights to sel_idx / sel_w[b, WIN0 + q].
    """
    b = tl.program_id(0)
    base = plane + b.to(tl.int64) * N
    own_list = lst + b.to(tl.int64) * list_stride
    KEY_BITS: tl.constexpr = 64 if KT == tl.int64 else 32
    N_TARGETS: tl.constexpr = 2 * NQ
    SLOT_BITS: tl.constexpr = 3 if N_TARGETS > 4 else (2 if N_TARGETS > 2 else 1)
    # integer keys order like |v| (sign bit cleared); NaN sorts last as in torch.sort
    KMASK: tl.constexpr = 0x7FFFFFFFFFFFFFFF if KT == tl.int64 else 0x7FFFFFFF
    COLLECT_CHUNK: tl.constexpr = CHUNK // 4 if CHUNK >= 64 else CHUNK
    tr = tl.arange(0, 8)
    r0s = tl.where(tr == 0, r0_0, tl.where(tr == 1, r0_1, r0_2))
    lens = tl.where(tr == 0, len_0, tl.where(tr == 1, len_1, len_2))
    # targets 2q and 2q+1: the first and the last rank of window q
    q_of = tr // 2
    rank = tl.sum(tl.where(q_of[:, None] == tr[None, :], r0s[None, :], 0), axis=1)
    rank += tl.where(tr % 2 == 1, tl.sum(tl.where(q_of[:, None] == tr[None, :], lens[None, :], 0), axis=1) - 1, 0)
    window_total = tl.sum(tl.where(tr < NQ, lens, 0), axis=0)
    kmin, kmax = _key_range(base, N, KT, KMASK, CHUNK)
    # SPEC section 8: NaN or +-Inf anywhere in the plane (keys from that of inf up) makes Q NaN,
    # as the reference's full-rank sum is (far ranks weigh 0, and 0 * inf is NaN)
    INF_KEY: tl.constexpr = 0x7FF0000000000000 if KT == tl.int64 else 0x7F800000
    nonfinite = kmax >= INF_KEY
    varying = tl.sum(((kmin ^ kmax) >> tl.arange(0, KEY_BITS).to(KT) != 0).to(tl.int32), axis=0)  # low bits
    kk = rank  # rank among the elements that share the current key prefix
    pre = tl.zeros([8], KT) + (kmin >> varying)  # key prefix found so far, per target
    cnt = tl.zeros([8], tl.int32) + N  # elements sharing it
    rem = varying  # key bits below the prefix
    # first digit: every target has the same prefix, one row of bins. With nothing varying
    # every key is equal and the targets are occurrences of it.
    if rem > 0:
        width = tl.minimum(rem, DIGIT)
        hist = _digit_histogram(base, own_list, N, rem - width, width, pre, tl.zeros([8], tl.int32), False, 0, 1,
                                KT, KMASK, CHUNK, DIGIT)
        pre, kk, cnt = _narrow_targets(hist, width, pre, kk, cnt, tl.zeros([8], tl.int32), 0, N_TARGETS, KT, DIGIT)
        rem -= width
    n_list = tl.zeros([], tl.int32)  # 0 until listed (a list holds at least the targets' pixels)
    for i in range(1, tl.cdiv(varying, DIGIT)):
        width = tl.minimum(rem, DIGIT)
        shift = rem - width
        # the pixels in the windows' ranges: the targets' and fewer than a window in between
        in_ranges = tl.sum(tl.where(tr < N_TARGETS, cnt, 0), axis=0) + window_total
        if (n_list == 0) & (2 * in_ranges <= N):
            n_list = _compact_candidates(base, own_list, N, rem, pre, NQ, KT, KMASK, CHUNK)
            tl.debug_barrier()  # the list is read back by other threads
        slot_of = _leading_targets(pre, N_TARGETS)
        if n_list != 0:
            rows = _digit_histogram(base, own_list, n_list, shift, width, pre, slot_of, True, SLOT_BITS, N_TARGETS,
                                    KT, KMASK, CHUNK, DIGIT)
        else:
            rows = _digit_histogram(base, own_list, N, shift, width, pre, slot_of, False, SLOT_BITS, N_TARGETS,
                                    KT, KMASK, CHUNK, DIGIT)
        pre, kk, cnt = _narrow_targets(rows, width, pre, kk, cnt, slot_of, SLOT_BITS, N_TARGETS, KT, DIGIT)
        rem = shift
    # pre[t] is now the key at target rank t and kk[t] its occurrence among equal keys.

    window_rows = (b.to(tl.int64) * N_WIN + WIN0 + tl.arange(0, 4)) * NSLOT
    if n_list != 0:
        _collect_windows(base, own_list, n_list, pre, kk, window_rows, sel_idx, scr_val, True, NQ, KT, KMASK,
                         COLLECT_CHUNK, NSLOT)
    else:
        _collect_windows(base, own_list, N, pre, kk, window_rows, sel_idx, scr_val, False, NQ, KT, KMASK,
                         COLLECT_CHUNK, NSLOT)
    tl.debug_barrier()  # the collected slots are read back by other threads
    j = tl.arange(0, NSLOT)
    for q in range(NQ):
        n_q = tl.sum(tl.where(tr == q, lens, 0), axis=0)
        row = (b.to(tl.int64) * N_WIN + WIN0 + q) * NSLOT
        valid = j < n_q
        v = tl.load(scr_val + row + j, mask=valid, other=0)
        ix = tl.load(sel_idx + row + j, mask=valid, other=0)
        key = v.to(KT, bitcast=True) & KMASK
        v_c = tl.load(scr_val + row + j[None, :], mask=valid[None, :], other=0)
        ix_c = tl.load(sel_idx + row + j[None, :], mask=valid[None, :], other=0)
        key_c = v_c.to(KT, bitcast=True) & KMASK
        before = valid[None, :] & ((key_c < key[:, None]) | ((key_c == key[:, None]) & (ix_c < ix[:, None])))
        pos = tl.sum(before.to(tl.int32), axis=1)
        w = tl.load(table + (WIN0 + q) * NSLOT + pos, mask=valid, other=0)
        # v0 + sum w (v - v0) with v0 the window's first rank: equal values give exactly v0
        # (sum w v rounds to v0 (1 +- ulp), which hi - lo + 1e-8 magnifies on flat maps)
        v0 = tl.sum(tl.where(valid & (pos == 0), v, 0.0), axis=0)
        qv = v0 + tl.sum(tl.where(valid, w * (v - v0), 0.0), axis=0)
        tl.store(stats + b * N_STATS + WIN0 + q, tl.where(nonfinite, float("nan"), qv))
        tl.debug_barrier()  # every slot of this window is read before it is rewritten in rank order
        tl.store(sel_idx + row + pos, ix, mask=valid)
        tl.store(sel_idx + row + j, tl.full([NSLOT], -1, tl.int32), mask=j >= n_q)
        w_rank = tl.load(table + (WIN0 + q) * NSLOT + j, mask=valid, other=0)
        tl.store(sel_w + row + j, tl.where(valid, w_rank, 0.0))


# ----------------------------------------------------------------------------------------
# stages 3-4: box mean by running sums (forward on h, backward on dd)
# ----------------------------------------------------------------------------------------

@triton.jit
def _hbox_kernel(src, g, stats, table, pre, out, H, W, RAD, PS, PP,
                 FROM_G: tl.constexpr, CT: tl.constexpr, RT: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
                 N_STATS: tl.constexpr, NSLOT: tl.constexpr, N_WIN: tl.constexpr):
    """Row sums over [w - RAD, w + RAD] (zeros outside) of src, or of h computed from g.

    Prefix sums of each row go to ``pre``; after a barrier, out = pre[w + RAD] - pre[w - RAD - 1].
    ``out`` may be ``src`` (each program owns its rows). Every plane has pixel (b, p) at
    b * PS + p * PP (the backward's planes may be channels of dR). With FROM_G (the forward) h is summed
    in fixed point, RT an integer type, h * 2^S rounded (S from the table): the sums wrap
    around but their differences, the box sums, are exact, so equal windows give equal sums
    as they do in avg_pool2d (the mask's quantile then breaks its ties like the reference).
    """
    b = tl.program_id(1)
    rows = tl.program_id(0) * BH + tl.arange(0, BH)
    rm = rows < H
    rowoff = b.to(tl.int64) * PS + rows.to(tl.int64)[:, None] * W * PP
    if FROM_G:
        slope = tl.load(table + N_WIN * NSLOT + 0)
        reps = tl.load(table + N_WIN * NSLOT + 1)
        fixed = tl.load(table + N_WIN * NSLOT + 3)
        lo = tl.load(stats + b * N_STATS + 0)
        q80 = tl.load(stats + b * N_STATS + 1)
        hi = tl.load(stats + b * N_STATS + 2)
        S = hi - lo + reps
        t1 = (q80 - lo) / S
    carry = tl.zeros([BH], RT)
    for w0 in range(0, W, BW):
        cols = w0 + tl.arange(0, BW)
        m = rm[:, None] & (cols < W)[None, :]
        last = cols[None, :] == tl.minimum(w0 + BW, W) - 1
        if FROM_G:
            gv = tl.load(g + rowoff + cols[None, :] * PP, mask=m, other=0)
            h = 1.0 / (1.0 + tl.exp(-slope * ((tl.abs(gv) - lo) / S - t1)))
            hq = tl.where(m, (h * fixed + 0.5).to(RT), 0)
            run = tl.cumsum(hq, 1) + carry[:, None]
        else:
            h = tl.load(src + rowoff + cols[None, :] * PP, mask=m, other=0)
            run = tl.cumsum(h, 1) + carry[:, None]
        tl.store(pre + rowoff + cols[None, :] * PP, run, mask=m)
        # the running sum at the chunk's last column (not carry + sum(h): that loop-carried
        # reduction trips an assertion in Triton's thread-locality pass)
        carry = tl.sum(tl.where(last, run, 0), axis=1)
    tl.debug_barrier()
    for w0 in range(0, W, BW):
        cols = w0 + tl.arange(0, BW)
        m = rm[:, None] & (cols < W)[None, :]
        right = tl.minimum(cols + RAD, W - 1)
        left = cols - RAD - 1
        s_r = tl.load(pre + rowoff + right[None, :] * PP, mask=m, other=0)
        s_l = tl.load(pre + rowoff + left[None, :] * PP, mask=m & (left >= 0)[None, :], other=0)
        tl.store(out + rowoff + cols[None, :] * PP, s_r - s_l, mask=m)


@triton.jit
def _vbox_kernel(src, g, stats, table, pre, out, part, H, W, RAD, K2, PS, PP,
                 BACKWARD: tl.constexpr, CT: tl.constexpr, RT: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
                 N_STATS: tl.constexpr, NSLOT: tl.constexpr, N_WIN: tl.constexpr):
    """Column sums over [h - RAD, h + RAD] of the row sums in src, divided by K2 = k*k.

    Forward: src holds _hbox_kernel's fixed-point row sums (RT), out = d (CT). Backward (RT =
    CT): out = dy = box(dd) * s h (1 - h), and part[b, program] gets the sums of dy and of
    dy * u over the program's columns. ``out`` may be the memory of ``src``. Planes as in
    _hbox_kernel: pixel (b, p) at b * PS + p * PP.
    """
    b = tl.program_id(1)
    cols = tl.program_id(0) * BW + tl.arange(0, BW)
    cm = cols < W
    plane = b.to(tl.int64) * PS
    cpix = cols.to(tl.int64)[None, :] * PP
    carry = tl.zeros([BW], RT)
    for h0 in range(0, H, BH):
        rows = h0 + tl.arange(0, BH)
        m = (rows < H)[:, None] & cm[None, :]
        offs = plane + rows.to(tl.int64)[:, None] * W * PP + cpix
        v = tl.load(src + offs, mask=m, other=0)
        run = tl.cumsum(v, 0) + carry[None, :]
        tl.store(pre + offs, run, mask=m)
        carry = tl.sum(tl.where(rows[:, None] == tl.minimum(h0 + BH, H) - 1, run, 0), axis=0)
    tl.debug_barrier()
    k2 = K2.to(CT)
    slope = tl.load(table + N_WIN * NSLOT + 0)
    if BACKWARD:
        reps = tl.load(table + N_WIN * NSLOT + 1)
        lo = tl.load(stats + b * N_STATS + 0)
        q80 = tl.load(stats + b * N_STATS + 1)
        hi = tl.load(stats + b * N_STATS + 2)
        S = hi - lo + reps
        t1 = (q80 - lo) / S
        sum_dy = tl.zeros([BW], CT)
        sum_dyu = tl.zeros([BW], CT)
    else:
        fixed = tl.load(table + N_WIN * NSLOT + 3)
        # lo is NaN for a plane g with NaN or +-Inf: then d is NaN too (the fixed-point sums
        # cannot carry it), and so are t2 and M
        poison = tl.load(stats + b * N_STATS + 0) * 0.0
    for h0 in range(0, H, BH):
        rows = h0 + tl.arange(0, BH)
        m = (rows < H)[:, None] & cm[None, :]
        lower = tl.minimum(rows + RAD, H - 1)
        upper = rows - RAD - 1
        s_r = tl.load(pre + plane + lower.to(tl.int64)[:, None] * W * PP + cpix, mask=m, other=0)
        s_l = tl.load(pre + plane + upper.to(tl.int64)[:, None] * W * PP + cpix,
                      mask=m & (upper >= 0)[:, None], other=0)
        offs = plane + rows.to(tl.int64)[:, None] * W * PP + cpix
        if BACKWARD:
            box = (s_r - s_l) / k2
            gv = tl.load(g + offs, mask=m, other=0)
            u = (tl.abs(gv) - lo) / S
            h = 1.0 / (1.0 + tl.exp(-slope * (u - t1)))
            dy = tl.where(m, box * slope * h * (1.0 - h), 0.0)
            tl.store(out + offs, dy, mask=m)
            sum_dy += tl.sum(dy, axis=0)
            sum_dyu += tl.sum(tl.where(m, dy * u, 0.0), axis=0)
        else:
            tl.store(out + offs, (s_r - s_l).to(CT) / fixed / k2 + poison, mask=m)
    if BACKWARD:
        slot = (b * tl.num_programs(0) + tl.program_id(0)) * 2
        tl.store(part + slot, tl.sum(sum_dy, axis=0))
        tl.store(part + slot + 1, tl.sum(sum_dyu, axis=0))


# ----------------------------------------------------------------------------------------
# stage 6-7: mask, masked Grams and background moments; the scalar head
# ----------------------------------------------------------------------------------------

@triton.jit
def _mask_kernel(d, stats, table, M, N, BLOCK: tl.constexpr, N_STATS: tl.constexpr,
                 NSLOT: tl.constexpr, N_WIN: tl.constexpr):
    """M = sigmoid(s (d - t2)) alone (the mask-only op; the head fuses it in _gram_kernel)."""
    b = tl.program_id(1)
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    pm = p < N
    slope = tl.load(table + N_WIN * NSLOT + 0)
    t2 = tl.load(stats + b * N_STATS + 3)
    dv = tl.load(d + b.to(tl.int64) * N + p, mask=pm, other=0)
    tl.store(M + b.to(tl.int64) * N + p, 1.0 / (1.0 + tl.exp(slope * (t2 - dv))), mask=pm)


@triton.jit
def _tf32_parts(u):
    """u = hi + lo, hi the nearest tf32 number (ties away from zero), lo the remainder.

    A tf32 product of hi is exact, so hi hi' + hi lo' + lo hi' keeps float32 accuracy
    (lo is itself rounded to tf32 by the tensor cores: an error of 2^-22 relative to u)."""
    hi = ((u.to(tl.int32, bitcast=True) + 0x1000) & -8192).to(tl.float32, bitcast=True)
    return hi, u - hi


@triton.jit
def _dot_self_2xtf32(hi, lo, acc, CT: tl.constexpr):
    """acc + S, S = hi hi^T + 2 hi lo^T, in two tf32 products: (S + S^T) / 2 is the 3xTF32
    Gram hi hi^T + hi lo^T + lo hi^T, so a symmetric block costs two products, not three
    (_gram_reduce_kernel takes the symmetric part)."""
    acc = tl.dot(hi + hi, tl.trans(lo), acc, input_precision="tf32", out_dtype=CT)
    return tl.dot(hi, tl.trans(hi), acc, input_precision="tf32", out_dtype=CT)


@triton.jit
def _masked_rows(d, stats, slope, rows, p, pm, B, N, N_STATS: tl.constexpr):
    """M = sigmoid(s (d - t2)) of images ``rows`` at pixels ``p`` (0 outside), its offsets
    in the planes and the in-range mask."""
    rm = rows < B
    t2 = tl.load(stats + rows * N_STATS + 3, mask=rm, other=0)
    inside = rm[:, None] & pm[None, :]
    plane = rows.to(tl.int64)[:, None] * N + p[None, :]
    M = 1.0 / (1.0 + tl.exp(slope * (t2[:, None] - tl.load(d + plane, mask=inside, other=0))))
    return tl.where(inside, M, 0.0), plane, inside


@triton.jit
def _background_moments(v, u, inside, nb, cnt, mean, m2):
    """(mean, M2) of r = v - u per row, with this tile's nb pixels combined into the running
    ones of cnt pixels (Chan's pairwise combination: no cancellation)."""
    r = v - u
    bmean = tl.sum(r, axis=1) / nb
    dev = tl.where(inside, r - bmean[:, None], 0.0)
    delta = bmean - mean
    tot = cnt + nb
    # delta * (delta * w), not delta * delta * w: w is 0 for the first tile, and delta**2 may
    # overflow (r of 1e20 in float32) where the variance is then +inf, not inf * 0 = NaN
    return mean + delta * (nb / tot), m2 + tl.sum(dev * dev, axis=1) + delta * (delta * (cnt * nb / tot))


@triton.jit
def _gram_diagonal(src, sb, sc, sh, sw, d, stats, M, gram_part, bg_part, slope, ib, split, which, first, last, gbase,
                   B, C, N, W, FLAT: tl.constexpr, SPLIT: tl.constexpr, CT: tl.constexpr, DOT_PREC: tl.constexpr,
                   BB: tl.constexpr, BP: tl.constexpr, N_STATS: tl.constexpr):
    """_gram_kernel's diagonal block (I, I), in the form S of _dot_self_2xtf32; on axis 0
    also M and the background moments of the block's images."""
    rows = ib * BB + tl.arange(0, BB)
    acc = tl.zeros([BB, BB], CT)
    cnt = tl.zeros([], CT)
    mean = tl.zeros([BB], CT)
    m2 = tl.zeros([BB], CT)
    for blk in range(first, last):
        p = blk * BP + tl.arange(0, BP)
        pm = p < N
        pix = _pixel_offsets(p, W, sh, sw, FLAT)
        M_i, plane, inside = _masked_rows(d, stats, slope, rows, p, pm, B, N, N_STATS)
        tl.store(M + plane, M_i, mask=inside & (which == 0))
        ptr = src + rows.to(tl.int64)[:, None] * sb + pix[None, :]
        nb = tl.sum(pm.to(CT), axis=0)
        for c in range(C):
            v = tl.load(ptr + c * sc, mask=inside, other=0).to(CT)
            u = v * M_i
            if SPLIT:
                hi, lo = _tf32_parts(u)
                acc = _dot_self_2xtf32(hi, lo, acc, CT)
            else:
                acc = tl.dot(u, tl.trans(u), acc, input_precision=DOT_PREC, out_dtype=CT)
            mean, m2 = _background_moments(v, u, inside, nb, cnt, mean, m2)
            cnt += nb
    rm = rows < B
    tl.store(gram_part + gbase + rows[:, None] * B + rows[None, :], acc, mask=rm[:, None] & rm[None, :])
    bgo = (split.to(tl.int64) * B + rows) * 3
    tl.store(bg_part + bgo, tl.zeros([BB], CT) + cnt, mask=rm & (which == 0))
    tl.store(bg_part + bgo + 1, mean, mask=rm & (which == 0))
    tl.store(bg_part + bgo + 2, m2, mask=rm & (which == 0))


@triton.jit
def _gram_off_diagonal(src, sb, sc, sh, sw, d, stats, gram_part, slope, ib, jb, first, last, gbase,
                       B, C, N, W, FLAT: tl.constexpr, CT: tl.constexpr, DOT_PREC: tl.constexpr,
                       BB: tl.constexpr, BP: tl.constexpr, N_STATS: tl.constexpr):
    """_gram_kernel's block (I, J), I < J: the full product (3xTF32 for float32)."""
    rows_i = ib * BB + tl.arange(0, BB)
    rows_j = jb * BB + tl.arange(0, BB)
    acc = tl.zeros([BB, BB], CT)
    for blk in range(first, last):
        p = blk * BP + tl.arange(0, BP)
        pm = p < N
        pix = _pixel_offsets(p, W, sh, sw, FLAT)
        M_i, _, in_i = _masked_rows(d, stats, slope, rows_i, p, pm, B, N, N_STATS)
        M_j, _, in_j = _masked_rows(d, stats, slope, rows_j, p, pm, B, N, N_STATS)
        ptr_i = src + rows_i.to(tl.int64)[:, None] * sb + pix[None, :]
        ptr_j = src + rows_j.to(tl.int64)[:, None] * sb + pix[None, :]
        for c in range(C):
            u_i = tl.load(ptr_i + c * sc, mask=in_i, other=0).to(CT) * M_i
            u_j = tl.load(ptr_j + c * sc, mask=in_j, other=0).to(CT) * M_j
            acc = tl.dot(u_i, tl.trans(u_j), acc, input_precision=DOT_PREC, out_dtype=CT)
    ri = rows_i < B
    rj = rows_j < B
    tl.store(gram_part + gbase + rows_i[:, None] * B + rows_j[None, :], acc, mask=ri[:, None] & rj[None, :])


@triton.jit
def _gram_kernel(R, x, d, stats, table, M, gram_part, bg_part,
                 B, C, N, W, sRb, sRc, sRh, sRw, sxb, sxc, sxh, sxw, blocks_per_split,
                 FLAT: tl.constexpr, SINGLE: tl.constexpr, CT: tl.constexpr, DOT_PREC: tl.constexpr,
                 BB: tl.constexpr, BP: tl.constexpr,
                 N_STATS: tl.constexpr, NSLOT: tl.constexpr, N_WIN: tl.constexpr):
    """Partial raw Grams sum_p M_i M_j sum_c T_i T_j (T = R for axis 2 = 0, x for 1).

    Grid (image-block pairs I <= J, splits, 2): the Gram is symmetric, so only the blocks on
    and above the diagonal are computed, and a diagonal one in two tf32 products instead of
    three (_dot_self_2xtf32); _gram_reduce_kernel mirrors and symmetrises. Each program
    covers a contiguous pixel range, so every element of R and x is read once when B <= BB.
    Diagonal programs of axis 2 = 0 also write M and the per-image (count, mean, M2) of
    r = R (1 - M) over their range.
    """
    tile = tl.program_id(0)
    split = tl.program_id(1)
    which = tl.program_id(2)
    # tile -> (I, J), I <= J, row-major over the upper triangle of image blocks
    nbb = tl.cdiv(B, BB)
    ib = tile * 0
    rest = tile
    while rest >= nbb - ib:
        rest -= nbb - ib
        ib += 1
    jb = ib + rest
    if which == 0:
        src = R
        sb = sRb
        sc = sRc
        sh = sRh
        sw = sRw
    else:
        src = x
        sb = sxb
        sc = sxc
        sh = sxh
        sw = sxw
    slope = tl.load(table + N_WIN * NSLOT + 0)
    SPLIT: tl.constexpr = DOT_PREC == "tf32x3"
    nblocks = tl.cdiv(N, BP)
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, nblocks)
    gbase = (split * 2 + which).to(tl.int64) * B * B
    if SINGLE or ib == jb:  # SINGLE: no off-diagonal code is compiled
        _gram_diagonal(src, sb, sc, sh, sw, d, stats, M, gram_part, bg_part, slope, ib, split, which, first, last, gbase,
                       B, C, N, W, FLAT, SPLIT, CT, DOT_PREC, BB, BP, N_STATS)
    else:
        _gram_off_diagonal(src, sb, sc, sh, sw, d, stats, gram_part, slope, ib, jb, first, last, gbase,
                           B, C, N, W, FLAT, CT, DOT_PREC, BB, BP, N_STATS)


@triton.jit
def _gram_reduce_kernel(gram_part, gram, B, n_split, block, CT: tl.constexpr, BLOCK: tl.constexpr):
    """gram (2 x B x B) = the partial Grams summed over the splits in split order, made
    symmetric: _gram_kernel wrote the blocks (of ``block`` images) on and above the diagonal,
    the diagonal ones in a form whose symmetric part is the Gram."""
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < 2 * B * B
    mat = o // (B * B)
    i = (o // B) % B
    j = o % B
    bi = i // block
    bj = j // block
    at_ij = m & (bi <= bj)
    at_ji = m & (bi >= bj)
    tr = mat * B * B + j * B + i
    s_ij = tl.zeros([BLOCK], CT)
    s_ji = tl.zeros([BLOCK], CT)
    for s in range(n_split):
        s_ij += tl.load(gram_part + s * 2 * B * B + o, mask=at_ij, other=0)
        s_ji += tl.load(gram_part + s * 2 * B * B + tr, mask=at_ji, other=0)
    both = at_ij & at_ji
    tl.store(gram + o, tl.where(both, 0.5 * (s_ij + s_ji), s_ij + s_ji), mask=m)


@triton.jit
def _finalize_kernel(gram, bg_part, table, stats, hsic_out, bg_out, B, D, n_split,
                     CT: tl.constexpr, BB: tl.constexpr, RB: tl.constexpr, N_STATS: tl.constexpr,
                     NSLOT: tl.constexpr, N_WIN: tl.constexpr):
    """One program: HSIC of SPEC section 4 from the raw Grams, BG of section 5 from the
    partial moments. Works on row blocks of RB rows so that B up to a few hundred fits."""
    jj = tl.arange(0, BB)
    jm = jj < B
    neps = tl.load(table + N_WIN * NSLOT + 2)
    _, nK, meanK, allK = _gram_stats(gram, B, jj, neps, CT, RB, BB)
    _, nL, meanL, allL = _gram_stats(gram + B * B, B, jj, neps, CT, RB, BB)
    acc = tl.zeros([RB], CT)
    for r0 in range(0, B, RB):
        rows = r0 + tl.arange(0, RB)
        m = (rows < B)[:, None] & jm[None, :]
        offs = rows[:, None] * B + jj[None, :]
        Kc = tl.load(gram + offs, mask=m, other=0) / (_at_rows(nK, rows, jj)[:, None] * nK[None, :]) \
            - _at_rows(meanK, rows, jj)[:, None] - meanK[None, :] + allK
        Lc = tl.load(gram + B * B + offs, mask=m, other=0) / (_at_rows(nL, rows, jj)[:, None] * nL[None, :]) \
            - _at_rows(meanL, rows, jj)[:, None] - meanL[None, :] + allL
        acc += tl.sum(tl.where(m, Kc * Lc, 0.0), axis=1)
    tl.store(hsic_out, tl.sum(acc, axis=0) / ((B - 1) * (B - 1)))
    cnt = tl.zeros([BB], CT)
    mean = tl.zeros([BB], CT)
    m2 = tl.zeros([BB], CT)
    for s in range(n_split):
        o = (s * B + jj) * 3
        nb = tl.load(bg_part + o, mask=jm, other=0)
        bmean = tl.load(bg_part + o + 1, mask=jm, other=0)
        bm2 = tl.load(bg_part + o + 2, mask=jm, other=0)
        tot = cnt + nb
        frac = tl.where(tot > 0, nb / tl.where(tot > 0, tot, 1.0), 0.0)
        delta = bmean - mean
        mean += delta * frac
        m2 += bm2 + delta * (delta * (cnt * frac))  # as in _background_moments
        cnt = tot
    var = m2 / (D - 1)
    tl.store(stats + jj * N_STATS + 4, mean, mask=jm)
    tl.store(stats + jj * N_STATS + 5, var, mask=jm)
    tl.store(bg_out, tl.sum(tl.where(jm, var, 0.0), axis=0) / B)


# ----------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------

@triton.jit
def _store_mixing(A, which, offs, value, mask, B, PRESPLIT: tl.constexpr):
    """Mixing matrix ``which`` (0: R's, 1: x's) at offs: as its tf32 parts when PRESPLIT."""
    if PRESPLIT:
        hi, lo = _tf32_parts(value)
        tl.store(A + (2 * which) * B * B + offs, hi, mask=mask)
        tl.store(A + (2 * which + 1) * B * B + offs, lo, mask=mask)
    else:
        tl.store(A + (2 * which) * B * B + offs, value, mask=mask)


@triton.jit
def _load_mixing(A, which, rows, cols, mask, B, PRESPLIT: tl.constexpr):
    """Block (rows, cols) of mixing matrix ``which`` as (hi, lo), its tf32 parts when PRESPLIT
    (else the matrix twice). Loaded as stored, no arithmetic on the way to the dot, so the
    compiler may keep them in shared memory as the product's operand."""
    offs = rows[:, None] * B + cols[None, :]
    hi = tl.load(A + (2 * which) * B * B + offs, mask=mask, other=0)
    if PRESPLIT:
        lo = tl.load(A + (2 * which + 1) * B * B + offs, mask=mask, other=0)
    else:
        lo = hi
    return hi, lo


@triton.jit
def _mix(a_hi, a_lo, u, acc, PRESPLIT: tl.constexpr, DOT_PREC: tl.constexpr, CT: tl.constexpr):
    """acc + a @ u: with PRESPLIT in three tf32 products (3xTF32: a's parts split beforehand
    by _bwd_prep_kernel, u's here), else one DOT_PREC product (3xTF32 too where DOT_PREC says
    so, with a split by Triton at each product)."""
    if PRESPLIT:
        u_hi, u_lo = _tf32_parts(u)
        acc = tl.dot(a_lo, u_hi, acc, input_precision="tf32", out_dtype=CT)
        acc = tl.dot(a_hi, u_lo, acc, input_precision="tf32", out_dtype=CT)
        acc = tl.dot(a_hi, u_hi, acc, input_precision="tf32", out_dtype=CT)
    else:
        acc = tl.dot(a_hi, u, acc, input_precision=DOT_PREC, out_dtype=CT)
    return acc


@triton.jit
def _bwd_prep_kernel(gram, grad_hsic, table, A, B,
                     CT: tl.constexpr, PRESPLIT: tl.constexpr, BB: tl.constexpr, RB: tl.constexpr,
                     NSLOT: tl.constexpr, N_WIN: tl.constexpr):
    """A = 2 G/(n n^T) - diag(alpha / n^2) for R's Gram (A[0]) and x's (A[1]), each as the
    parts _load_mixing reads (PRESPLIT: its tf32 parts, A[m, 0] + A[m, 1]; else A[m, 0] alone).

    G = dH * Lc / (B-1)^2 (resp. Kc), alpha_i = 2 sum_j G_ij K_ij; the alpha term is
    dropped where the norm was clamped to eps, as F.normalize's gradient does.
    One program, row blocks of RB rows.
    """
    jj = tl.arange(0, BB)
    jm = jj < B
    neps = tl.load(table + N_WIN * NSLOT + 2)
    scale = tl.load(grad_hsic) / ((B - 1) * (B - 1))
    rootK, nK, meanK, allK = _gram_stats(gram, B, jj, neps, CT, RB, BB)
    rootL, nL, meanL, allL = _gram_stats(gram + B * B, B, jj, neps, CT, RB, BB)
    for r0 in range(0, B, RB):
        rows = r0 + tl.arange(0, RB)
        m = (rows < B)[:, None] & jm[None, :]
        offs = rows[:, None] * B + jj[None, :]
        eye = rows[:, None] == jj[None, :]
        nK_i = _at_rows(nK, rows, jj)
        nL_i = _at_rows(nL, rows, jj)
        K = tl.where(m, tl.load(gram + offs, mask=m, other=0) / (nK_i[:, None] * nK[None, :]), 0.0)
        L = tl.where(m, tl.load(gram + B * B + offs, mask=m, other=0) / (nL_i[:, None] * nL[None, :]), 0.0)
        Kc = tl.where(m, K - _at_rows(meanK, rows, jj)[:, None] - meanK[None, :] + allK, 0.0)
        Lc = tl.where(m, L - _at_rows(meanL, rows, jj)[:, None] - meanL[None, :] + allL, 0.0)
        GK = scale * Lc
        alpha = 2.0 * tl.sum(GK * K, axis=1)
        alpha = tl.where(_at_rows(rootK, rows, jj) >= neps, alpha, 0.0)
        AK = 2.0 * GK / (nK_i[:, None] * nK[None, :]) - tl.where(eye, (alpha / (nK_i * nK_i))[:, None], 0.0)
        _store_mixing(A, 0, offs, AK, m, B, PRESPLIT)
        GL = scale * Kc
        alpha = 2.0 * tl.sum(GL * L, axis=1)
        alpha = tl.where(_at_rows(rootL, rows, jj) >= neps, alpha, 0.0)
        AL = 2.0 * GL / (nL_i[:, None] * nL[None, :]) - tl.where(eye, (alpha / (nL_i * nL_i))[:, None], 0.0)
        _store_mixing(A, 1, offs, AL, m, B, PRESPLIT)


@triton.jit
def _bwd_dm_kernel(R, x, M, A, stats, table, grad_bg, grad_mask, g, dz, dz_part, dx,
                   B, C, N, W, sRb, sRc, sRh, sRw, sxb, sxc, sxh, sxw, sdb, sdc, sdh, sdw,
                   D, blocks_per_split, PS, PP,
                   HEAD: tl.constexpr, HAS_GM: tl.constexpr, GRAD_X: tl.constexpr, FLAT: tl.constexpr,
                   SINGLE: tl.constexpr, NBB: tl.constexpr, CT: tl.constexpr, DOT_PREC: tl.constexpr,
                   PRESPLIT: tl.constexpr, SHARE: tl.constexpr,
                   BB: tl.constexpr, BP: tl.constexpr,
                   N_STATS: tl.constexpr, NSLOT: tl.constexpr, N_WIN: tl.constexpr):
    """dM_i = sum_c R_i (A @ MR)_i + sum_c x_i (A' @ Mx)_i - beta sum_c R_i (r_i - mean_i) + gM;
    writes dz = dM s M (1 - M), its per-program sums, and dx = M (A' @ Mx) when GRAD_X. Also
    g = mean_c R again, as _channel_mean_kernel sums it (the same bits), rather than keeping
    the forward's plane. The planes g and dz have pixel (b, p) at b * PS + p * PP.

    SHARE 0 does all of it; with a head, two launches may split it so that each keeps one
    mixing matrix on chip: SHARE 1 R's share of dM (stored in dz) and g, then SHARE 2 x's
    share, added to it, and the rest."""
    ib = tl.program_id(0)
    split = tl.program_id(1)
    slope = tl.load(table + N_WIN * NSLOT + 0)
    rows_i = ib * BB + tl.arange(0, BB)
    ri = rows_i < B
    if HEAD:
        beta = 2.0 * tl.load(grad_bg) / (B * (D - 1))
        mean_i = tl.load(stats + rows_i * N_STATS + 4, mask=ri, other=0)
        if SINGLE:
            if SHARE != 2:
                AR_hi, AR_lo = _load_mixing(A, 0, rows_i, rows_i, ri[:, None] & ri[None, :], B, PRESPLIT)
            if SHARE != 1:
                Ax_hi, Ax_lo = _load_mixing(A, 1, rows_i, rows_i, ri[:, None] & ri[None, :], B, PRESPLIT)
    zsum = tl.zeros([BB], CT)
    nblocks = tl.cdiv(N, BP)
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, nblocks)
    for blk in range(first, last):
        p = blk * BP + tl.arange(0, BP)
        pm = p < N
        mi = ri[:, None] & pm[None, :]
        plane_i = rows_i.to(tl.int64)[:, None] * N + p[None, :]
        M_i = tl.load(M + plane_i, mask=mi, other=0)
        slot_i = rows_i.to(tl.int64)[:, None] * PS + p.to(tl.int64)[None, :] * PP
        if SHARE == 2:  # R's share, from the first launch
            dM = tl.load(dz + slot_i, mask=mi, other=0)
        else:
            dM = tl.zeros([BB, BP], CT)
        pixR = _pixel_offsets(p, W, sRh, sRw, FLAT)
        ptrR = R + rows_i.to(tl.int64)[:, None] * sRb + pixR[None, :]
        gsum = tl.zeros([BB, BP], CT)
        if HEAD:
            pixx = _pixel_offsets(p, W, sxh, sxw, FLAT)
            ptrx = x + rows_i.to(tl.int64)[:, None] * sxb + pixx[None, :]
            if GRAD_X:
                pixd = _pixel_offsets(p, W, sdh, sdw, FLAT)
                ptrd = dx + rows_i.to(tl.int64)[:, None] * sdb + pixd[None, :]
        for c in range(C):
            if SHARE != 2:
                vR = tl.load(ptrR + c * sRc, mask=mi, other=0).to(CT)
                gsum += vR
            if HEAD:
                if SHARE != 1:
                    vx = tl.load(ptrx + c * sxc, mask=mi, other=0).to(CT)
                if SINGLE:
                    if SHARE != 2:
                        TR = _mix(AR_hi, AR_lo, vR * M_i, tl.zeros([BB, BP], CT), PRESPLIT, DOT_PREC, CT)
                        dM += vR * (TR - beta * (vR * (1.0 - M_i) - mean_i[:, None]))
                    if SHARE != 1:
                        Tx = _mix(Ax_hi, Ax_lo, vx * M_i, tl.zeros([BB, BP], CT), PRESPLIT, DOT_PREC, CT)
                        dM += vx * Tx
                else:
                    r = vR * (1.0 - M_i)
                    # one product at a time keeps one A block and one accumulator live
                    TR = tl.zeros([BB, BP], CT)
                    for jb in range(NBB):
                        rows_j = jb * BB + tl.arange(0, BB)
                        rj = rows_j < B
                        mj = rj[:, None] & pm[None, :]
                        M_j = tl.load(M + rows_j.to(tl.int64)[:, None] * N + p[None, :], mask=mj, other=0)
                        uR = tl.load(R + rows_j.to(tl.int64)[:, None] * sRb + pixR[None, :] + c * sRc,
                                     mask=mj, other=0).to(CT) * M_j
                        A_hi, A_lo = _load_mixing(A, 0, rows_i, rows_j, ri[:, None] & rj[None, :], B, PRESPLIT)
                        TR = _mix(A_hi, A_lo, uR, TR, PRESPLIT, DOT_PREC, CT)
                    dM += vR * (TR - beta * (r - mean_i[:, None]))
                    Tx = tl.zeros([BB, BP], CT)
                    for jb in range(NBB):
                        rows_j = jb * BB + tl.arange(0, BB)
                        rj = rows_j < B
                        mj = rj[:, None] & pm[None, :]
                        M_j = tl.load(M + rows_j.to(tl.int64)[:, None] * N + p[None, :], mask=mj, other=0)
                        ux = tl.load(x + rows_j.to(tl.int64)[:, None] * sxb + pixx[None, :] + c * sxc,
                                     mask=mj, other=0).to(CT) * M_j
                        A_hi, A_lo = _load_mixing(A, 1, rows_i, rows_j, ri[:, None] & rj[None, :], B, PRESPLIT)
                        Tx = _mix(A_hi, A_lo, ux, Tx, PRESPLIT, DOT_PREC, CT)
                    dM += vx * Tx
                if GRAD_X and SHARE != 1:
                    tl.store(ptrd + c * sdc, (M_i * Tx).to(dx.dtype.element_ty), mask=mi)
        if SHARE != 2:
            tl.store(g + slot_i, gsum / C, mask=mi)
        if SHARE == 1:
            tl.store(dz + slot_i, dM, mask=mi)
        else:
            if HAS_GM:
                dM += tl.load(grad_mask + plane_i, mask=mi, other=0).to(CT)
            z = tl.where(mi, dM * slope * M_i * (1.0 - M_i), 0.0)
            tl.store(dz + slot_i, z, mask=mi)
            zsum += tl.sum(z, axis=1)
    if SHARE != 1:
        tl.store(dz_part + rows_i * tl.num_programs(1) + split, zsum, mask=ri)


@triton.jit
def _t2_scatter_kernel(dz, dz_part, sel_idx, sel_w, n_part, PS, PP,
                       CT: tl.constexpr, BLOCK: tl.constexpr, NSLOT: tl.constexpr, N_WIN: tl.constexpr):
    """dd = dz + w_k dt2 at the selected ranks of d, with dt2 = -sum dz (one program per image)."""
    b = tl.program_id(0)
    acc = tl.zeros([BLOCK], CT)
    for s0 in range(0, n_part, BLOCK):
        o = s0 + tl.arange(0, BLOCK)
        acc += tl.load(dz_part + b * n_part + o, mask=o < n_part, other=0)
    dt2 = -tl.sum(acc, axis=0)
    j = tl.arange(0, NSLOT)
    row = (b * N_WIN + 3) * NSLOT
    ix = tl.load(sel_idx + row + j)
    w = tl.load(sel_w + row + j)
    ok = ix >= 0
    ptr = dz + b.to(tl.int64) * PS + tl.where(ok, ix, 0).to(tl.int64) * PP
    old = tl.load(ptr, mask=ok, other=0)
    tl.debug_barrier()
    tl.store(ptr, old + w * dt2, mask=ok)


@triton.jit
def _bwd_scalars_kernel(dy, part, stats, table, sel_idx, n_part, PS, PP,
                        r0_0, len_0, r0_1, len_1, r0_2, len_2,
                        CT: tl.constexpr, BLOCK: tl.constexpr, N_STATS: tl.constexpr,
                        NSLOT: tl.constexpr, N_WIN: tl.constexpr):
    """From the sums of dy and dy*u: dt1, dlo, dq80, dhi (one image per program), then
    S * sum_q w_q(rank) dQ_q added into the dy plane at the selected ranks of a, so that
    da = dy / S everywhere afterwards. A rank in several windows gets all their terms."""
    b = tl.program_id(0)
    o = tl.arange(0, BLOCK)
    s_dy = tl.zeros([BLOCK], CT)
    s_dyu = tl.zeros([BLOCK], CT)
    for s0 in range(0, n_part, BLOCK):
        om = (s0 + o) < n_part
        s_dy += tl.load(part + (b * n_part + s0 + o) * 2, mask=om, other=0)
        s_dyu += tl.load(part + (b * n_part + s0 + o) * 2 + 1, mask=om, other=0)
    sdy = tl.sum(s_dy, axis=0)
    sdyu = tl.sum(s_dyu, axis=0)
    reps = tl.load(table + N_WIN * NSLOT + 1)
    lo = tl.load(stats + b * N_STATS + 0)
    q80 = tl.load(stats + b * N_STATS + 1)
    hi = tl.load(stats + b * N_STATS + 2)
    S = hi - lo + reps
    t1 = (q80 - lo) / S
    dt1 = -sdy
    dlo = -sdy / S - dt1 / S
    dS = -sdyu / S - dt1 * t1 / S
    dq80 = dt1 / S
    dhi = dS
    dlo = dlo - dS
    # entries of the three windows of a, in rank order: rank = r0_q + k
    e = tl.arange(0, 4 * NSLOT)
    q = e // NSLOT
    k = e % NSLOT
    ix = tl.load(sel_idx + b * N_WIN * NSLOT + e, mask=q < 3, other=-1)
    r = tl.where(q == 0, r0_0, tl.where(q == 1, r0_1, r0_2)) + k
    total = tl.zeros([4 * NSLOT], CT)
    k0 = r - r0_0
    in0 = (k0 >= 0) & (k0 < len_0)
    total += tl.where(in0, tl.load(table + 0 * NSLOT + k0, mask=in0, other=0) * dlo, 0.0)
    k1 = r - r0_1
    in1 = (k1 >= 0) & (k1 < len_1)
    total += tl.where(in1, tl.load(table + 1 * NSLOT + k1, mask=in1, other=0) * dq80, 0.0)
    k2 = r - r0_2
    in2 = (k2 >= 0) & (k2 < len_2)
    total += tl.where(in2, tl.load(table + 2 * NSLOT + k2, mask=in2, other=0) * dhi, 0.0)
    ok = ix >= 0
    ptr = dy + b.to(tl.int64) * PS + tl.where(ok, ix, 0).to(tl.int64) * PP
    old = tl.load(ptr, mask=ok, other=0)
    tl.debug_barrier()  # a pixel in several windows: every entry reads before any writes
    tl.store(ptr, old + S * total, mask=ok)  # equal values for repeated pixels


@triton.jit
def _bwd_dr_kernel(R, M, g, dy, A, stats, table, grad_bg, dR,
                   B, C, N, W, sRb, sRc, sRh, sRw, sdb, sdc, sdh, sdw, D, blocks_per_split, PS, PP,
                   HEAD: tl.constexpr, FLAT: tl.constexpr, SINGLE: tl.constexpr, NBB: tl.constexpr,
                   CT: tl.constexpr,
                   DOT_PREC: tl.constexpr, PRESPLIT: tl.constexpr, BB: tl.constexpr, BP: tl.constexpr,
                   N_STATS: tl.constexpr, NSLOT: tl.constexpr, N_WIN: tl.constexpr):
    """dR_i = M_i (A @ MR)_i + (1 - M_i) beta (r_i - mean_i) + sign(g_i) dy_i / (S_i C).

    The planes g and dy have pixel (b, p) at b * PS + p * PP; they may be channels of dR
    itself: each element of them is read before the one store that overwrites it."""
    ib = tl.program_id(0)
    split = tl.program_id(1)
    rows_i = ib * BB + tl.arange(0, BB)
    ri = rows_i < B
    reps = tl.load(table + N_WIN * NSLOT + 1)
    lo = tl.load(stats + rows_i * N_STATS + 0, mask=ri, other=0)
    hi = tl.load(stats + rows_i * N_STATS + 2, mask=ri, other=1)
    inv_SC = 1.0 / ((hi - lo + reps) * C)
    if HEAD:
        beta = 2.0 * tl.load(grad_bg) / (B * (D - 1))
        mean_i = tl.load(stats + rows_i * N_STATS + 4, mask=ri, other=0)
        if SINGLE:
            AR_hi, AR_lo = _load_mixing(A, 0, rows_i, rows_i, ri[:, None] & ri[None, :], B, PRESPLIT)
    nblocks = tl.cdiv(N, BP)
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, nblocks)
    for blk in range(first, last):
        p = blk * BP + tl.arange(0, BP)
        pm = p < N
        mi = ri[:, None] & pm[None, :]
        plane_i = rows_i.to(tl.int64)[:, None] * N + p[None, :]
        slot_i = rows_i.to(tl.int64)[:, None] * PS + p.to(tl.int64)[None, :] * PP
        gv = tl.load(g + slot_i, mask=mi, other=0)
        sgn = tl.where(gv > 0, 1.0, tl.where(gv < 0, -1.0, 0.0))
        dgc = sgn * tl.load(dy + slot_i, mask=mi, other=0) * inv_SC[:, None]
        pixd = _pixel_offsets(p, W, sdh, sdw, FLAT)
        ptrd = dR + rows_i.to(tl.int64)[:, None] * sdb + pixd[None, :]
        if HEAD:
            M_i = tl.load(M + plane_i, mask=mi, other=0)
            pixR = _pixel_offsets(p, W, sRh, sRw, FLAT)
            ptrR = R + rows_i.to(tl.int64)[:, None] * sRb + pixR[None, :]
            bgc = beta * (1.0 - M_i)
            for c in range(C):
                vR = tl.load(ptrR + c * sRc, mask=mi, other=0).to(CT)
                if SINGLE:
                    TR = _mix(AR_hi, AR_lo, vR * M_i, tl.zeros([BB, BP], CT), PRESPLIT, DOT_PREC, CT)
                else:
                    TR = tl.zeros([BB, BP], CT)
                    for jb in range(NBB):
                        rows_j = jb * BB + tl.arange(0, BB)
                        rj = rows_j < B
                        mj = rj[:, None] & pm[None, :]
                        M_j = tl.load(M + rows_j.to(tl.int64)[:, None] * N + p[None, :], mask=mj, other=0)
                        uR = tl.load(R + rows_j.to(tl.int64)[:, None] * sRb + pixR[None, :] + c * sRc,
                                     mask=mj, other=0).to(CT) * M_j
                        A_hi, A_lo = _load_mixing(A, 0, rows_i, rows_j, ri[:, None] & rj[None, :], B, PRESPLIT)
                        TR = _mix(A_hi, A_lo, uR, TR, PRESPLIT, DOT_PREC, CT)
                val = M_i * TR + bgc * (vR * (1.0 - M_i) - mean_i[:, None]) + dgc
                tl.store(ptrd + c * sdc, val.to(dR.dtype.element_ty), mask=mi)
        else:
            for c in range(C):
                tl.store(ptrd + c * sdc, dgc.to(dR.dtype.element_ty), mask=mi)


# ----------------------------------------------------------------------------------------
# host side: launch plan, launchers
# ----------------------------------------------------------------------------------------

def _next_pow2(n: int) -> int:
    return 1 << (max(1, int(n)) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def _device_info(device_type: str, index: Optional[int]):
    """(streaming multiprocessors, compute capability) of the device the kernels run on."""
    if device_type == "cuda":
        props = torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device())
        return props.multi_processor_count, (props.major, props.minor)
    return 2, (9, 0)  # the interpreter: few programs, same code paths as sm_90


class _Plan:
    """Block sizes, warp counts and grids of every kernel for one input geometry.

    The compile test reads the launches of a real forward and backward through
    ``_launch_hook``, so it checks exactly these numbers.
    """

    def __init__(self, B, C, H, W, ct, num_sms, capability, strided_pixels=False):
        N = H * W
        self.B, self.C, self.H, self.W, self.N = B, C, H, W, N
        self.ct = ct
        self.tl_ct = tl.float64 if ct == torch.float64 else tl.float32
        self.tl_key = tl.int64 if ct == torch.float64 else tl.int32
        self.key_dtype = torch.int64 if ct == torch.float64 else torch.int32
        self.dot_prec = "ieee" if (ct == torch.float64 or capability < (8, 0)) else "tf32x3"
        # 1. channel mean; 7. mask alone
        self.mean_block, self.mean_warps = 1024, 4
        # 2. selection: one program per image
        self.select_chunk, self.select_digit, self.select_warps = SELECT_CHUNK, SELECT_DIGIT_BITS, 8
        # 3-4. box passes
        (self.hbox_bh, self.hbox_bw), self.hbox_warps = HBOX_BLOCK, 4
        (self.vbox_bh, self.vbox_bw), self.vbox_warps = VBOX_BLOCK, 4
        self.n_colblocks = _cdiv(W, self.vbox_bw)
        # 6. Gram pass over R, x: one tile of up to 128 images (each element read once), pixel
        # blocks of BP, partial Grams per pixel split; beyond one tile, the image-block pairs
        # I <= J only (the Gram is symmetric). Sizes keep the dots free of spills on sm_80 and
        # sm_90 (tests/test_triton_compile.py): on sm_80, 64-image tiles where pixels are not
        # adjacent (channels_last: address registers) or a tile pair is off the diagonal (two
        # sets of 128 rows and two 128 x 128 accumulators spill 88 bytes at B = 256); blocks of
        # 16 pixels where 32 spill: a kernel with off-diagonal blocks and 16-image tiles (small
        # bfloat16 channels_last inputs on sm_90).
        target = 2 * num_sms  # programs in flight per pass
        narrow = capability < (9, 0) and (strided_pixels or B > MAX_IMAGE_BLOCK)
        most = min(MAX_IMAGE_BLOCK, 64) if narrow else MAX_IMAGE_BLOCK
        self.bb = min(most, max(16, _next_pow2(B)))
        self.nbb = _cdiv(B, self.bb)
        self.single = self.nbb == 1
        self.gram_tiles = self.nbb * (self.nbb + 1) // 2
        self.bp = 16 if self.bb >= 128 or self.bb <= 16 or not self.single else 32
        self.big_warps = 8 if self.bb >= 64 else 4
        # 3 stages spill 8 bytes off the diagonal on sm_80 under Triton 3.6 (B = 256)
        self.gram_stages = 3 if self.single or capability >= (9, 0) else 2
        self.gram_bps, self.gram_split = self._split(_cdiv(N, self.bp), target, 2 * self.gram_tiles)
        # 9, 13. backward passes: T = A @ (M R) needs A (B x B) on chip as a dot operand. Up to
        # 32 images it stays there for the whole pass; beyond, programs own 32 rows of images and
        # loop over 32-image column blocks of A (the row blocks of one pixel range run side by
        # side, so the repeated reads of R and x come from L2).
        self.bwd_bp = BWD_PIXEL_BLOCK
        self.bwd_bb, self.bwd_single, self.bwd_nbb, self.bwd_bps, self.bwd_split = \
            self._backward_blocks(B, N, self.bwd_bp, BWD_SINGLE_MAX, target)
        self.bwd_warps = BWD_WARPS
        # 3xTF32 with A split once by _bwd_prep_kernel rather than at every product: fewer
        # registers and no conversions of A in the loops on sm_90 (164 -> 152 registers for
        # pass 2 at B = 128); on sm_80 the two parts as mma.sync operands spill (8-40 bytes)
        self.bwd_presplit = self.dot_prec == "tf32x3" and capability >= (9, 0)
        # pass 1's launches (SHARE of _bwd_dm_kernel): a whole batch over BWD_PAIR_MAX in two,
        # R's share of dM then x's, each with one mixing matrix on chip
        self.bwd_shares = (1, 2) if self.bwd_single and self.bwd_bb > BWD_PAIR_MAX else (0,)
        self.bwd_stages = 1
        # 13. pass 2 may keep A whole for larger batches than pass 1 (BWD_DR_SINGLE_MAX): with A
        # split beforehand, the whole batch of 128 compiles to wgmma with A in shared memory,
        # 147 KB on sm_90, where pass 1 with A and A' would need 278 KB
        self.dr_bb, self.dr_single, self.dr_nbb, self.dr_bps, self.dr_split = \
            self._backward_blocks(B, N, self.bwd_bp, max(BWD_SINGLE_MAX, BWD_DR_SINGLE_MAX), target)
        # 7-8. one-program B x B work
        self.bb_all = max(16, _next_pow2(B))
        self.row_block = 16
        self.reduce_block = 512
        self.small_warps = 4
        self.part_block = 128

    @classmethod
    def _backward_blocks(cls, B, N, bp, single_max, target):
        """A backward pass's image block, whether it holds the whole batch, the number of
        blocks, and the pixel blocks (of bp pixels) per split and splits."""
        single = B <= single_max
        bb = max(16, _next_pow2(B)) if single else BWD_IMAGE_BLOCK
        nbb = _cdiv(B, bb)
        return (bb, single, nbb, *cls._split(_cdiv(N, bp), target, nbb))

    @staticmethod
    def _split(nblocks, target, tiles):
        n_split = max(1, min(nblocks, _cdiv(target, tiles)))
        per_split = _cdiv(nblocks, n_split)
        return per_split, _cdiv(nblocks, per_split)


def _plan(R: torch.Tensor, ct: torch.dtype, *others: torch.Tensor) -> _Plan:
    B, C, H, W = R.shape
    num_sms, capability = _device_info(R.device.type, R.device.index)
    strided = any(t.stride(3) != 1 and W > 1 for t in (R, *others))
    return _Plan(B, C, H, W, ct, num_sms, capability, strided)


# Set by tests to record (kernel, grid, args, meta) instead of launching.
_launch_hook = None


def _launch(kernel, grid, *args, **meta):
    if _launch_hook is not None:
        _launch_hook(kernel, grid, args, meta)
        return
    kernel[grid](*args, **meta)


def _windows(N: int):
    """(first rank, length, exact t) of the rank window of each quantile (SPEC section 2)."""
    out = []
    for q in (Q_LOW, Q_MASK, Q_HIGH, Q_MASK):
        t = q * (N - 1)
        f = math.floor(t)
        r0, r1 = max(0, f - 8), min(N - 1, f + 9)
        out.append((r0, r1 - r0 + 1, t))
    return tuple(out)


def _fixed_point_bits(window_size: int, dtype: torch.dtype) -> int:
    """S such that the forward box sums of h * 2^S (h in (0, 1)) fit the signed integer type.

    In float64 (int64 sums) the grid of the C++ kernels (``box_grid_bits`` in
    csrc/sib_head.h), so that all backends round h alike.
    """
    if dtype == torch.float64:
        return max(0, 52 - (window_size * (window_size + 1)).bit_length())
    return 30 - math.ceil(math.log2(window_size * window_size + 1))


@functools.lru_cache(maxsize=64)
def _table_values(N: int, temperature: float, slope: float, window_size: int, dtype: torch.dtype):
    values = [0.0] * TABLE_SIZE
    for k, (r0, length, t) in enumerate(_windows(N)):
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
    values[N_WINDOWS * SLOTS + P_FIXED] = 2.0 ** _fixed_point_bits(window_size, dtype)
    return tuple(values)


@functools.lru_cache(maxsize=64)
def _table_cached(N, temperature, slope, window_size, dtype, device):
    return torch.tensor(_table_values(N, temperature, slope, window_size, dtype), dtype=dtype, device=device)


def _table(N, temperature, slope, window_size, dtype, device):
    """Rank weights and parameters in the compute dtype, cached per geometry and device."""
    if _launch_hook is not None:  # recording: never cache
        return torch.tensor(_table_values(N, temperature, slope, window_size, dtype), dtype=dtype, device=device)
    return _table_cached(N, float(temperature), float(slope), int(window_size), dtype, device)


def _strides(t: torch.Tensor):
    """(sb, sc, sh, sw) and whether pixel p sits at p * sw (the kernels then skip p // W)."""
    _, _, H, W = t.shape
    sb, sc, sh, sw = t.stride()
    if W == 1:
        sw = sh
    return (sb, sc, sh, sw), (H == 1 or W == 1 or sh == W * sw)


_CONST = dict(N_STATS=STATS, NSLOT=SLOTS, N_WIN=N_WINDOWS)


def _mask_chain(R, ct, window_size, temperature, slope, plan):
    """Stages 1-5: the quantile statistics, the selected ranks and d (B, H, W)."""
    B, C, H, W = R.shape
    N = H * W
    window_size = min(window_size, whole_image_window(H, W))  # the same mask (sib_fast.functional)
    table = _table(N, temperature, slope, window_size, ct, R.device)
    g = R.new_empty((B, H, W), dtype=ct)
    stats = R.new_zeros((B, STATS), dtype=ct)
    sel_idx = R.new_empty((B, N_WINDOWS, SLOTS), dtype=torch.int32)
    sel_w = R.new_empty((B, N_WINDOWS, SLOTS), dtype=ct)
    scratch = R.new_empty((B, N_WINDOWS, SLOTS), dtype=ct)
    (sb, sc, sh, sw), flat = _strides(R)
    _launch(_channel_mean_kernel, (_cdiv(N, plan.mean_block), B), R, g, C, N, W, sb, sc, sh, sw,
            FLAT=flat, CT=plan.tl_ct, BLOCK=plan.mean_block, num_warps=plan.mean_warps)
    win = _windows(N)
    # the box pass's prefix plane is free until then and after it: the selects' candidate lists
    prefix = R.new_empty((B, H, W), dtype=ct)
    lists = prefix.view(torch.int32)
    list_stride = N * (prefix.element_size() // lists.element_size())
    _launch(_select_kernel, (B,), g, lists, list_stride, table, stats, sel_idx, sel_w, scratch, N,
            win[0][0], win[0][1], win[1][0], win[1][1], win[2][0], win[2][1],
            WIN0=0, NQ=3, CT=plan.tl_ct, KT=plan.tl_key, CHUNK=plan.select_chunk, DIGIT=plan.select_digit,
            NSLOT=SLOTS, N_WIN=N_WINDOWS, N_STATS=STATS, num_warps=plan.select_warps)
    d = R.new_empty((B, H, W), dtype=ct)
    rad = window_size // 2
    # forward box sums in fixed point: integer views of the same planes
    prefix_q, d_q = prefix.view(plan.key_dtype), d.view(plan.key_dtype)
    _launch(_hbox_kernel, (_cdiv(H, plan.hbox_bh), B), g, g, stats, table, prefix_q, d_q, H, W, rad, N, 1,
            FROM_G=True, CT=plan.tl_ct, RT=plan.tl_key, BH=plan.hbox_bh, BW=plan.hbox_bw, **_CONST,
            num_warps=plan.hbox_warps)
    _launch(_vbox_kernel, (plan.n_colblocks, B), d_q, g, stats, table, prefix_q, d, stats, H, W, rad,
            window_size * window_size, N, 1, BACKWARD=False, CT=plan.tl_ct, RT=plan.tl_key, BH=plan.vbox_bh, BW=plan.vbox_bw,
            **_CONST, num_warps=plan.vbox_warps)
    _launch(_select_kernel, (B,), d, lists, list_stride, table, stats, sel_idx, sel_w, scratch, N,
            win[3][0], win[3][1], 0, 1, 0, 1,
            WIN0=3, NQ=1, CT=plan.tl_ct, KT=plan.tl_key, CHUNK=plan.select_chunk, DIGIT=plan.select_digit,
            NSLOT=SLOTS, N_WIN=N_WINDOWS, N_STATS=STATS, num_warps=plan.select_warps)
    return table, stats, sel_idx, sel_w, d


def _head_forward_impl(R, x, window_size, temperature, slope):
    ct = compute_dtype(R, x)
    plan = _plan(R, ct, x)
    B, C, H, W = R.shape
    N = H * W
    table, stats, sel_idx, sel_w, d = _mask_chain(R, ct, window_size, temperature, slope, plan)
    mask = R.new_empty((B, H, W), dtype=ct)
    gram_part = R.new_empty((plan.gram_split, 2, B, B), dtype=ct)
    bg_part = R.new_empty((plan.gram_split, B, 3), dtype=ct)
    (sRb, sRc, sRh, sRw), flat_r = _strides(R)
    (sxb, sxc, sxh, sxw), flat_x = _strides(x)
    _launch(_gram_kernel, (plan.gram_tiles, plan.gram_split, 2), R, x, d, stats, table, mask,
            gram_part, bg_part, B, C, N, W, sRb, sRc, sRh, sRw, sxb, sxc, sxh, sxw, plan.gram_bps,
            FLAT=flat_r and flat_x, SINGLE=plan.single, CT=plan.tl_ct, DOT_PREC=plan.dot_prec,
            BB=plan.bb, BP=plan.bp, **_CONST, num_warps=plan.big_warps, num_stages=plan.gram_stages)
    gram = R.new_empty((2, B, B), dtype=ct)
    _launch(_gram_reduce_kernel, (_cdiv(2 * B * B, plan.reduce_block),), gram_part, gram, B,
            plan.gram_split, plan.bb, CT=plan.tl_ct, BLOCK=plan.reduce_block, num_warps=4)
    hsic = R.new_empty((), dtype=ct)
    bg = R.new_empty((), dtype=ct)
    _launch(_finalize_kernel, (1,), gram, bg_part, table, stats, hsic, bg, B, C * N,
            plan.gram_split, CT=plan.tl_ct, BB=plan.bb_all, RB=plan.row_block, N_STATS=STATS, NSLOT=SLOTS, N_WIN=N_WINDOWS,
            num_warps=plan.small_warps)
    return hsic, bg, mask, stats, sel_idx, sel_w, gram


def _mask_forward_impl(R, window_size, temperature, slope):
    ct = compute_dtype(R)
    plan = _plan(R, ct)
    B, C, H, W = R.shape
    N = H * W
    table, stats, sel_idx, sel_w, d = _mask_chain(R, ct, window_size, temperature, slope, plan)
    mask = R.new_empty((B, H, W), dtype=ct)
    _launch(_mask_kernel, (_cdiv(N, plan.mean_block), B), d, stats, table, mask, N,
            BLOCK=plan.mean_block, **_CONST, num_warps=plan.mean_warps)
    return mask, stats, sel_idx, sel_w


def _backward_planes(dR, ct):
    """The backward's three (B, H*W) planes of the compute dtype: g, dz (then dy) and the box
    pass's prefix sums, with pixel (b, p) of each at b * PS + p * PP; returns them, PS and PP.

    They are channels C-1, C-2, C-3 of dR itself when dR holds the compute dtype, has three
    channels or more and evenly spaced pixels (contiguous or channels_last): _bwd_dr_kernel
    reads g and dy at a pixel before it writes dR there. Then the backward allocates no plane
    besides dR, and the head's extra memory is dR and the saved mask. Otherwise, one buffer.
    """
    B, C, H, W = dR.shape
    (sb, sc, _, sw), flat = _strides(dR)
    if dR.dtype == ct and C >= 3 and flat:
        return dR[:, C - 1], dR[:, C - 2], dR[:, C - 3], sb, sw
    own = dR.new_empty((3, B, H, W), dtype=ct)
    return own[0], own[1], own[2], H * W, 1


def _head_backward_impl(grad_hsic, grad_bg, grad_mask, R, x, mask, stats, sel_idx, sel_w, gram,
                        window_size, temperature, slope, head, grad_x):
    ct = stats.dtype
    plan = _plan(R, ct)
    B, C, H, W = R.shape
    N = H * W
    window_size = min(window_size, whole_image_window(H, W))  # as the forward ran
    table = _table(N, temperature, slope, window_size, ct, R.device)
    A = stats  # placeholder pointer when there is no head term
    if head:
        grad_hsic = stats.new_zeros(()) if grad_hsic is None else grad_hsic.to(ct).contiguous()
        grad_bg = stats.new_zeros(()) if grad_bg is None else grad_bg.to(ct).contiguous()
        A = R.new_empty((2, 2, B, B), dtype=ct)
        _launch(_bwd_prep_kernel, (1,), gram, grad_hsic, table, A, B, CT=plan.tl_ct, PRESPLIT=plan.bwd_presplit,
                BB=plan.bb_all, RB=plan.row_block,
                NSLOT=SLOTS, N_WIN=N_WINDOWS, num_warps=plan.small_warps)
    else:
        grad_bg = stats
    has_gm = grad_mask is not None
    gm = grad_mask.contiguous() if has_gm else stats
    dR = torch.empty_like(R)
    g, dz, prefix, PS, PP = _backward_planes(dR, ct)
    dz_part = R.new_empty((B, plan.bwd_split), dtype=ct)
    dx = x.new_empty(0)
    want_dx = bool(head and grad_x)
    if want_dx:
        dx = torch.empty_like(x)
    (sRb, sRc, sRh, sRw), flat_r = _strides(R)
    (sxb, sxc, sxh, sxw), flat_x = _strides(x)
    (sdb, sdc, sdh, sdw), flat_d = _strides(dx) if want_dx else ((0, 0, 0, 0), True)
    for share in (plan.bwd_shares if head else (0,)):
        _launch(_bwd_dm_kernel, (plan.bwd_nbb, plan.bwd_split), R, x, mask, A, stats, table, grad_bg, gm, g, dz,
                dz_part, dx if want_dx else dz, B, C, N, W, sRb, sRc, sRh, sRw, sxb, sxc, sxh, sxw, sdb, sdc, sdh, sdw,
                C * N, plan.bwd_bps, PS, PP, HEAD=bool(head), HAS_GM=has_gm, GRAD_X=want_dx,
                FLAT=flat_r and flat_x and flat_d, SINGLE=plan.bwd_single, NBB=plan.bwd_nbb, CT=plan.tl_ct,
                DOT_PREC=plan.dot_prec, PRESPLIT=plan.bwd_presplit, SHARE=share,
                BB=plan.bwd_bb, BP=plan.bwd_bp, **_CONST,
                num_warps=plan.bwd_warps, num_stages=plan.bwd_stages)
    _launch(_t2_scatter_kernel, (B,), dz, dz_part, sel_idx, sel_w, plan.bwd_split, PS, PP,
            CT=plan.tl_ct, BLOCK=plan.part_block, NSLOT=SLOTS, N_WIN=N_WINDOWS, num_warps=4)
    rad = window_size // 2
    part = R.new_empty((B, plan.n_colblocks, 2), dtype=ct)
    _launch(_hbox_kernel, (_cdiv(H, plan.hbox_bh), B), dz, g, stats, table, prefix, dz, H, W, rad, PS, PP,
            FROM_G=False, CT=plan.tl_ct, RT=plan.tl_ct, BH=plan.hbox_bh, BW=plan.hbox_bw, **_CONST,
            num_warps=plan.hbox_warps)
    _launch(_vbox_kernel, (plan.n_colblocks, B), dz, g, stats, table, prefix, dz, part, H, W, rad,
            window_size * window_size, PS, PP, BACKWARD=True, CT=plan.tl_ct, RT=plan.tl_ct, BH=plan.vbox_bh, BW=plan.vbox_bw,
            **_CONST, num_warps=plan.vbox_warps)
    win = _windows(N)
    _launch(_bwd_scalars_kernel, (B,), dz, part, stats, table, sel_idx, plan.n_colblocks, PS, PP,
            win[0][0], win[0][1], win[1][0], win[1][1], win[2][0], win[2][1], CT=plan.tl_ct, BLOCK=plan.part_block, N_STATS=STATS, NSLOT=SLOTS, N_WIN=N_WINDOWS, num_warps=4)
    (sdb, sdc, sdh, sdw), flat_dr = _strides(dR)
    _launch(_bwd_dr_kernel, (plan.dr_nbb, plan.dr_split), R, mask, g, dz, A, stats, table, grad_bg, dR,
            B, C, N, W, sRb, sRc, sRh, sRw, sdb, sdc, sdh, sdw, C * N, plan.dr_bps, PS, PP,
            HEAD=bool(head), FLAT=flat_r and flat_dr, SINGLE=plan.dr_single, NBB=plan.dr_nbb, CT=plan.tl_ct,
            DOT_PREC=plan.dot_prec, PRESPLIT=plan.bwd_presplit, BB=plan.dr_bb, BP=plan.bwd_bp, **_CONST,
            num_warps=plan.bwd_warps, num_stages=plan.bwd_stages)
    return dR, dx


# ----------------------------------------------------------------------------------------
# ops: schemas, fake kernels, autograd
# ----------------------------------------------------------------------------------------

Tensor = torch.Tensor


@torch.library.custom_op("sib_fast_triton::head_forward", mutates_args=())
def head_forward(R: Tensor, x: Tensor, window_size: int, temperature: float, slope: float
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(hsic, bg, mask, stats, sel_idx, sel_w, gram); the last five are saved for the backward."""
    return _head_forward_impl(R, x, window_size, temperature, slope)


@head_forward.register_fake
def _head_forward_fake(R, x, window_size, temperature, slope):
    ct = compute_dtype(R, x)
    B, _, H, W = R.shape
    return (R.new_empty((), dtype=ct), R.new_empty((), dtype=ct), R.new_empty((B, H, W), dtype=ct),
            R.new_empty((B, STATS), dtype=ct),
            R.new_empty((B, N_WINDOWS, SLOTS), dtype=torch.int32), R.new_empty((B, N_WINDOWS, SLOTS), dtype=ct),
            R.new_empty((2, B, B), dtype=ct))


@torch.library.custom_op("sib_fast_triton::mask_forward", mutates_args=())
def mask_forward(R: Tensor, window_size: int, temperature: float, slope: float
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(mask, stats, sel_idx, sel_w): the mask chain alone."""
    return _mask_forward_impl(R, window_size, temperature, slope)


@mask_forward.register_fake
def _mask_forward_fake(R, window_size, temperature, slope):
    ct = compute_dtype(R)
    B, _, H, W = R.shape
    return (R.new_empty((B, H, W), dtype=ct), R.new_empty((B, STATS), dtype=ct),
            R.new_empty((B, N_WINDOWS, SLOTS), dtype=torch.int32), R.new_empty((B, N_WINDOWS, SLOTS), dtype=ct))


@torch.library.custom_op("sib_fast_triton::head_backward", mutates_args=())
def head_backward(grad_hsic: Optional[Tensor], grad_bg: Optional[Tensor], grad_mask: Optional[Tensor],
                  R: Tensor, x: Tensor, mask: Tensor, stats: Tensor, sel_idx: Tensor,
                  sel_w: Tensor, gram: Tensor, window_size: int, temperature: float, slope: float,
                  head: bool, grad_x: bool) -> tuple[Tensor, Tensor]:
    """(dR, dx); dx is empty unless head and grad_x."""
    return _head_backward_impl(grad_hsic, grad_bg, grad_mask, R, x, mask, stats, sel_idx, sel_w, gram,
                               window_size, temperature, slope, head, grad_x)


@head_backward.register_fake
def _head_backward_fake(grad_hsic, grad_bg, grad_mask, R, x, mask, stats, sel_idx, sel_w, gram,
                        window_size, temperature, slope, head, grad_x):
    return torch.empty_like(R), (torch.empty_like(x) if (head and grad_x) else x.new_empty(0))


def _head_setup_context(ctx, inputs, output):
    R, x, window_size, temperature, slope = inputs
    _, _, mask, stats, sel_idx, sel_w, gram = output
    ctx.save_for_backward(R, x, mask, stats, sel_idx, sel_w, gram)
    ctx.hyperparameters = (window_size, temperature, slope)
    ctx.mark_non_differentiable(stats, sel_idx, sel_w, gram)
    # Unused outputs would otherwise get (B, H, W) planes of zeros as their gradients.
    ctx.set_materialize_grads(False)


def _head_autograd(ctx, grad_hsic, grad_bg, grad_mask, *_unused):
    R, x, mask, stats, sel_idx, sel_w, gram = ctx.saved_tensors
    want_dx = ctx.needs_input_grad[1]
    dR, dx = head_backward(grad_hsic, grad_bg, grad_mask, R, x, mask, stats, sel_idx, sel_w, gram,
                           *ctx.hyperparameters, True, want_dx)
    return dR, (dx if want_dx else None), None, None, None


head_forward.register_autograd(_head_autograd, setup_context=_head_setup_context)


def _mask_setup_context(ctx, inputs, output):
    R, window_size, temperature, slope = inputs
    mask, stats, sel_idx, sel_w = output
    ctx.save_for_backward(R, mask, stats, sel_idx, sel_w)
    ctx.hyperparameters = (window_size, temperature, slope)
    ctx.mark_non_differentiable(stats, sel_idx, sel_w)
    ctx.set_materialize_grads(False)


def _mask_autograd(ctx, grad_mask, *_unused):
    if grad_mask is None:
        return None, None, None, None
    R, mask, stats, sel_idx, sel_w = ctx.saved_tensors
    dR, _ = head_backward(None, None, grad_mask, R, R, mask, stats, sel_idx, sel_w, R.new_empty(0),
                          *ctx.hyperparameters, False, False)
    return dR, None, None, None


mask_forward.register_autograd(_mask_autograd, setup_context=_mask_setup_context)
head_backward.register_autograd(refuse_higher_order_gradient, setup_context=lambda ctx, inputs, output: None)


# ----------------------------------------------------------------------------------------
# the backend interface (sib_fast.backends.dispatch)
# ----------------------------------------------------------------------------------------

def sib_terms(R, x, window_size, temperature, slope):
    """(hsic, bg, mask) of SPEC sections 3-5; differentiable in R and x."""
    hsic, bg, mask, *_ = head_forward(R, x, int(window_size), float(temperature), float(slope))
    return hsic, bg, mask


def spatial_mask(R, window_size, temperature, slope):
    """The mask M of SPEC section 3; differentiable in R."""
    return mask_forward(R, int(window_size), float(temperature), float(slope))[0]
