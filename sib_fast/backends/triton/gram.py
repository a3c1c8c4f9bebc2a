"""Stages 6-7 of the forward: the mask, the masked Gram matrices, the background moments and
the scalar head.

    M = sigmoid(s (d - t2)),  t2 = Q(d, .8)
    G_ij = sum_p M_ip M_jp sum_c T_icp T_jcp      (T = R, then x: raw masked Grams, B x B)
    K_ij = G_ij / (n_i n_j),  n_i = max(sqrt(G_ii), eps),  Kc = H K H  (centred; L likewise for x)
    HSIC = sum_ij Kc_ij Lc_ij / (B - 1)^2
    BG = (1/B) sum_i var(r_i),  r = R (1 - M),  var over image i's C N values, by 1/(CN - 1)

One pass over R and x computes M and the Grams of the image-block pairs I <= J (the Gram is
symmetric), with partial sums per pixel split reduced in a fixed order; float32 dots in 3xTF32,
a diagonal block in two tf32 products (hi hi^T + 2 hi lo^T, whose symmetric part is the 3xTF32
Gram). The background moments combine per-tile (count, mean, M2) by Chan's rule: no cancellation.
"""
import triton
import triton.language as tl

from sib_fast.backends.triton.pixels import pixel_offsets, split_blocks


@triton.jit
def gram_stats(raw, B, jj, norm_eps, CT: tl.constexpr, RB: tl.constexpr, BB: tl.constexpr):
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
def at_rows(vec, rows, jj):
    """vec (indexed by jj) read at the indices ``rows``."""
    return tl.sum(tl.where(rows[:, None] == jj[None, :], vec[None, :], 0.0), axis=1)


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
def tf32_parts(u):
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
        pix = pixel_offsets(p, W, sh, sw, FLAT)
        M_i, plane, inside = _masked_rows(d, stats, slope, rows, p, pm, B, N, N_STATS)
        tl.store(M + plane, M_i, mask=inside & (which == 0))
        ptr = src + rows.to(tl.int64)[:, None] * sb + pix[None, :]
        nb = tl.sum(pm.to(CT), axis=0)
        for c in range(C):
            v = tl.load(ptr + c * sc, mask=inside, other=0).to(CT)
            u = v * M_i
            if SPLIT:
                hi, lo = tf32_parts(u)
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
        pix = pixel_offsets(p, W, sh, sw, FLAT)
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
    first, last = split_blocks(N, split, blocks_per_split, BP)
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
    """One program: HSIC of docs/loss.md section 4 from the raw Grams, BG of section 5 from the
    partial moments. Works on row blocks of RB rows so that B up to a few hundred fits."""
    jj = tl.arange(0, BB)
    jm = jj < B
    neps = tl.load(table + N_WIN * NSLOT + 2)
    _, nK, meanK, allK = gram_stats(gram, B, jj, neps, CT, RB, BB)
    _, nL, meanL, allL = gram_stats(gram + B * B, B, jj, neps, CT, RB, BB)
    acc = tl.zeros([RB], CT)
    for r0 in range(0, B, RB):
        rows = r0 + tl.arange(0, RB)
        m = (rows < B)[:, None] & jm[None, :]
        offs = rows[:, None] * B + jj[None, :]
        Kc = tl.load(gram + offs, mask=m, other=0) / (at_rows(nK, rows, jj)[:, None] * nK[None, :]) \
            - at_rows(meanK, rows, jj)[:, None] - meanK[None, :] + allK
        Lc = tl.load(gram + B * B + offs, mask=m, other=0) / (at_rows(nL, rows, jj)[:, None] * nL[None, :]) \
            - at_rows(meanL, rows, jj)[:, None] - meanL[None, :] + allL
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
