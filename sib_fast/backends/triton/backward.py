"""The backward of the head: dR (and dx) from the upstream dHSIC, dBG and dM.

    A = 2 G / (n n^T) - diag(alpha / n^2),  G = dHSIC Lc / (B-1)^2,  alpha_i = 2 sum_j G_ij K_ij
    dM_i = sum_c R_i (A @ MR)_i + sum_c x_i (A' @ Mx)_i - beta sum_c R_i (r_i - mean_i) + gM
    dz = dM s M (1 - M),  dt2 = -sum dz  (scattered to the selected ranks of d: dd)
    dy = box_k(dd) / k^2 * s h (1 - h)  (box.py),  dt1, dlo, dq80, dhi from sum dy, sum dy u
    dR_i = M_i (A @ MR)_i + (1 - M_i) beta (r_i - mean_i) + sign(g_i) dy_i / (S_i C)

with beta = 2 dBG / (B (CN - 1)) and A' as A for x's Gram. Two passes over the big tensors:
pass 1 (``_bwd_dm_kernel``) reads R, x and M for dM (and writes dx), pass 2 (``_bwd_dr_kernel``)
reads R and M and writes dR. On sm_90 A is stored as its tf32 parts, so the 3xTF32 products
do not split it again in each loop.
"""
import triton
import triton.language as tl

from sib_fast.backends.triton.box import range_and_threshold
from sib_fast.backends.triton.gram import at_rows, gram_stats, tf32_parts
from sib_fast.backends.triton.pixels import pixel_offsets, split_blocks


@triton.jit
def _store_mixing(A, which, offs, value, mask, B, PRESPLIT: tl.constexpr):
    """Mixing matrix ``which`` (0: R's, 1: x's) at offs: as its tf32 parts when PRESPLIT."""
    if PRESPLIT:
        hi, lo = tf32_parts(value)
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
        u_hi, u_lo = tf32_parts(u)
        acc = tl.dot(a_lo, u_hi, acc, input_precision="tf32", out_dtype=CT)
        acc = tl.dot(a_hi, u_lo, acc, input_precision="tf32", out_dtype=CT)
        acc = tl.dot(a_hi, u_hi, acc, input_precision="tf32", out_dtype=CT)
    else:
        acc = tl.dot(a_hi, u, acc, input_precision=DOT_PREC, out_dtype=CT)
    return acc


@triton.jit
def _mix_column_blocks(A, which, src, sb, pix, c_off, M, rows_i, ri, p, pm, acc, B, N, NBB: tl.constexpr,
                       BB: tl.constexpr, PRESPLIT: tl.constexpr, DOT_PREC: tl.constexpr, CT: tl.constexpr):
    """acc + (A @ (M T))_I over the column blocks J of mixing matrix ``which`` (rows_i: block I),
    T the channel at c_off of src, for the pixels p: one block of A and one product at a time."""
    for jb in range(NBB):
        rows_j = jb * BB + tl.arange(0, BB)
        rj = rows_j < B
        mj = rj[:, None] & pm[None, :]
        M_j = tl.load(M + rows_j.to(tl.int64)[:, None] * N + p[None, :], mask=mj, other=0)
        u = tl.load(src + rows_j.to(tl.int64)[:, None] * sb + pix[None, :] + c_off, mask=mj, other=0).to(CT) * M_j
        A_hi, A_lo = _load_mixing(A, which, rows_i, rows_j, ri[:, None] & rj[None, :], B, PRESPLIT)
        acc = _mix(A_hi, A_lo, u, acc, PRESPLIT, DOT_PREC, CT)
    return acc


@triton.jit
def _pixel_block(blk, rows_i, ri, N, PS, PP, BP: tl.constexpr):
    """Pixel block ``blk`` of the images rows_i (in range: ri): the pixels p, which exist, which
    (image, pixel) pairs exist, and their offsets in the (B, N) planes and in the planes of
    pixel (b, p) at b * PS + p * PP."""
    p = blk * BP + tl.arange(0, BP)
    pm = p < N
    mi = ri[:, None] & pm[None, :]
    plane_i = rows_i.to(tl.int64)[:, None] * N + p[None, :]
    slot_i = rows_i.to(tl.int64)[:, None] * PS + p.to(tl.int64)[None, :] * PP
    return p, pm, mi, plane_i, slot_i


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
    rootK, nK, meanK, allK = gram_stats(gram, B, jj, neps, CT, RB, BB)
    rootL, nL, meanL, allL = gram_stats(gram + B * B, B, jj, neps, CT, RB, BB)
    for r0 in range(0, B, RB):
        rows = r0 + tl.arange(0, RB)
        m = (rows < B)[:, None] & jm[None, :]
        offs = rows[:, None] * B + jj[None, :]
        eye = rows[:, None] == jj[None, :]
        nK_i = at_rows(nK, rows, jj)
        nL_i = at_rows(nL, rows, jj)
        K = tl.where(m, tl.load(gram + offs, mask=m, other=0) / (nK_i[:, None] * nK[None, :]), 0.0)
        L = tl.where(m, tl.load(gram + B * B + offs, mask=m, other=0) / (nL_i[:, None] * nL[None, :]), 0.0)
        Kc = tl.where(m, K - at_rows(meanK, rows, jj)[:, None] - meanK[None, :] + allK, 0.0)
        Lc = tl.where(m, L - at_rows(meanL, rows, jj)[:, None] - meanL[None, :] + allL, 0.0)
        GK = scale * Lc
        alpha = 2.0 * tl.sum(GK * K, axis=1)
        alpha = tl.where(at_rows(rootK, rows, jj) >= neps, alpha, 0.0)
        AK = 2.0 * GK / (nK_i[:, None] * nK[None, :]) - tl.where(eye, (alpha / (nK_i * nK_i))[:, None], 0.0)
        _store_mixing(A, 0, offs, AK, m, B, PRESPLIT)
        GL = scale * Kc
        alpha = 2.0 * tl.sum(GL * L, axis=1)
        alpha = tl.where(at_rows(rootL, rows, jj) >= neps, alpha, 0.0)
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
    first, last = split_blocks(N, split, blocks_per_split, BP)
    for blk in range(first, last):
        p, pm, mi, plane_i, slot_i = _pixel_block(blk, rows_i, ri, N, PS, PP, BP)
        M_i = tl.load(M + plane_i, mask=mi, other=0)
        if SHARE == 2:  # R's share, from the first launch
            dM = tl.load(dz + slot_i, mask=mi, other=0)
        else:
            dM = tl.zeros([BB, BP], CT)
        pixR = pixel_offsets(p, W, sRh, sRw, FLAT)
        ptrR = R + rows_i.to(tl.int64)[:, None] * sRb + pixR[None, :]
        gsum = tl.zeros([BB, BP], CT)
        if HEAD:
            pixx = pixel_offsets(p, W, sxh, sxw, FLAT)
            ptrx = x + rows_i.to(tl.int64)[:, None] * sxb + pixx[None, :]
            if GRAD_X:
                pixd = pixel_offsets(p, W, sdh, sdw, FLAT)
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
                    TR = _mix_column_blocks(A, 0, R, sRb, pixR, c * sRc, M, rows_i, ri, p, pm,
                                             tl.zeros([BB, BP], CT), B, N, NBB, BB, PRESPLIT, DOT_PREC, CT)
                    dM += vR * (TR - beta * (r - mean_i[:, None]))
                    Tx = _mix_column_blocks(A, 1, x, sxb, pixx, c * sxc, M, rows_i, ri, p, pm,
                                             tl.zeros([BB, BP], CT), B, N, NBB, BB, PRESPLIT, DOT_PREC, CT)
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
    _, S, t1 = range_and_threshold(stats, b, reps, N_STATS)
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
    first, last = split_blocks(N, split, blocks_per_split, BP)
    for blk in range(first, last):
        p, pm, mi, plane_i, slot_i = _pixel_block(blk, rows_i, ri, N, PS, PP, BP)
        gv = tl.load(g + slot_i, mask=mi, other=0)
        sgn = tl.where(gv > 0, 1.0, tl.where(gv < 0, -1.0, 0.0))
        dgc = sgn * tl.load(dy + slot_i, mask=mi, other=0) * inv_SC[:, None]
        pixd = pixel_offsets(p, W, sdh, sdw, FLAT)
        ptrd = dR + rows_i.to(tl.int64)[:, None] * sdb + pixd[None, :]
        if HEAD:
            M_i = tl.load(M + plane_i, mask=mi, other=0)
            pixR = pixel_offsets(p, W, sRh, sRw, FLAT)
            ptrR = R + rows_i.to(tl.int64)[:, None] * sRb + pixR[None, :]
            bgc = beta * (1.0 - M_i)
            for c in range(C):
                vR = tl.load(ptrR + c * sRc, mask=mi, other=0).to(CT)
                if SINGLE:
                    TR = _mix(AR_hi, AR_lo, vR * M_i, tl.zeros([BB, BP], CT), PRESPLIT, DOT_PREC, CT)
                else:
                    TR = _mix_column_blocks(A, 0, R, sRb, pixR, c * sRc, M, rows_i, ri, p, pm,
                                             tl.zeros([BB, BP], CT), B, N, NBB, BB, PRESPLIT, DOT_PREC, CT)
                val = M_i * TR + bgc * (vR * (1.0 - M_i) - mean_i[:, None]) + dgc
                tl.store(ptrd + c * sdc, val.to(dR.dtype.element_ty), mask=mi)
        else:
            for c in range(C):
                tl.store(ptrd + c * sdc, dgc.to(dR.dtype.element_ty), mask=mi)
