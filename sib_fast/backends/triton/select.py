"""Stages 1-2 of the forward: the channel mean g and the rank select of the soft quantiles.

    g_p = (1/C) sum_c R_cp                           (one plane per image, B x N)
    Q(v, q) = sum_i w_i v_(r0 + i),  w_i = softmax_i(-|r0 + i - t| / T),  t = q (N - 1)

with v_(r) the r-th smallest |v| in a stable sort (ties by flat index) and r0 .. r0 + 17 the
ranks floor(t) - 8 .. floor(t) + 9, clipped to 0 .. N - 1 (buffers.rank_windows). The select
finds those ranks without a sort: a radix select over the keys of |v| (non-negative floats
order like their integer bit patterns), narrowing every window's first and last rank at once,
then listing the few pixels still in range. Run on |g| for Q(a, .05), Q(a, .8), Q(a, .95) and
on d for Q(d, .8).
"""
import triton
import triton.language as tl

from sib_fast.backends.triton.pixels import pixel_offsets

@triton.jit
def _channel_mean_kernel(R, g, C, N, W, sb, sc, sh, sw,
                         FLAT: tl.constexpr, CT: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(1)
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    pm = p < N
    pix = pixel_offsets(p, W, sh, sw, FLAT)
    base = R + b.to(tl.int64) * sb + pix
    acc = tl.zeros([BLOCK], CT)
    for c in range(C):
        acc += tl.load(base + c * sc, mask=pm, other=0).to(CT)
    tl.store(g + b.to(tl.int64) * N + p, acc / C, mask=pm)



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
    # docs/loss.md section 8: NaN or +-Inf anywhere in the plane (keys from that of inf up) makes Q NaN,
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

