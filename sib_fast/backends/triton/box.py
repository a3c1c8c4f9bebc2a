"""Stages 3-4 of the forward, and of the backward: the box mean by running sums.

    u = (|g| - lo) / S,  S = hi - lo + eps,  t1 = (q80 - lo) / S,  h = sigmoid(s (u - t1))
    d = box_k(h) / k^2,  box_k(v)_hw = sum over |i - h| <= k//2, |j - w| <= k//2 of v_ij (zeros outside)

as row sums then column sums, each the difference of two prefix sums: O(1) per pixel whatever
the window. The forward sums h * 2^F rounded to integers (F from buffers.fixed_point_bits) in
wrapping fixed point, so box sums are exact and equal windows tie exactly. The box mean is
self-adjoint: the backward runs the same passes on dd and ends with dy = box_k(dd) / k^2 *
s h (1 - h) and its sums per image (sum dy, sum dy u) for the quantiles' gradients.
"""
import triton
import triton.language as tl


@triton.jit
def range_and_threshold(stats, b, reps, N_STATS: tl.constexpr):
    """lo, S = hi - lo + reps and t1 = (q80 - lo) / S of image b, from its quantiles in stats."""
    lo = tl.load(stats + b * N_STATS + 0)
    q80 = tl.load(stats + b * N_STATS + 1)
    hi = tl.load(stats + b * N_STATS + 2)
    S = hi - lo + reps
    return lo, S, (q80 - lo) / S

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
        lo, S, t1 = range_and_threshold(stats, b, reps, N_STATS)
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
        lo, S, t1 = range_and_threshold(stats, b, reps, N_STATS)
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
