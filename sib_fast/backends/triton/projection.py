"""The random-feature HSIC's masked projections (docs/loss.md section 4b), with W computed in the
kernels and never stored.

    u_b = flatten(R_b M_b),  v_b = flatten(x_b M_b)      (M broadcast over C; d = c N + h W + w)
    proj[0] = u @ W,  proj[1] = v @ W                    (2, B, F)
    sq[0]   = ||u_b||^2,  sq[1] = ||v_b||^2              (2, B)
    backward, from gP = d/dproj and gS = d/dsq:
    du = gP[0] @ W^T + 2 gS[0] u,  dv = gP[1] @ W^T + 2 gS[1] v
    dR = M du,  dx = M dv,  dM_b,p = sum_c (R du + x dv)

W (D x F, D = C N) is the Gaussian matrix of sib_fast/backends/random_features.py: entry (d, f)
from a 32-bit hash of (seed, d, f), the columns in pairs (2j, 2j + 1) sharing one Box-Muller
draw. A tile of W is generated in registers where it is multiplied (``_gaussian_pairs``), as two
(rows x pairs) tiles, its cosine columns (f = 2j) and its sine columns (2j + 1), each a separate
product. Its cost per entry, from the row hash a_d and column hash b_f computed once per tile
row and column: one add and one lowbias32 (2 multiplies, 3 shift-xors: 8 integer operations), a
shift and an int-to-float conversion; per pair (two entries) a log and a square root (Triton's),
and a sine and a cosine as polynomials, about 20 multiply-adds with the quadrant's selects: about
25 operations an entry on the CUDA cores, against 4 B flops an entry of the products (u and v) on
the tensor cores (64 at B = 16, three tf32 products each).
The angle 2 pi u2 is split into its nearest quarter turn and a rest of at most pi / 4, exactly (u2
has 24 bits), whose sine and cosine are short polynomials (``_sin_cos_turns``).

Forward (``_projection_kernel``): grid (F blocks of BJ pairs, chunks of d, image blocks); a
program loads the masked tiles of u and v (BB images padded to 16, BD rows of one channel) and
multiplies them by its tile of W, for every block of d in its chunk, accumulating four BB x BJ
products (u and v times the cosine and sine columns); it writes per-chunk partials, summed over
the chunks in a fixed order by ``_chunk_sum_kernel`` (deterministic, no atomics). The programs of
F block 0 also sum u^2 and v^2. Backward (``_projection_backward_kernel``): grid (pixel blocks of
BP, image blocks of up to 32: its gradient tiles are loaded once per pixel block); a program
takes every channel of its pixels (dM sums over c), and for each
channel loops over the F blocks, generating the BJ x BP tiles of W^T and accumulating
du = gP[0] @ W^T and dv with four products; then it adds 2 gS u, writes dR and dx, and after the
last channel dM.

Work, B images (BB-image blocks, nb = ceil(B / BB) of them), D = C N, F features: each pass
generates every entry of W once per image block, D F nb entries (at 3x224x224, F = 512: 77 M);
the products are 4 B D F flops a pass (u and v; 3xTF32 runs three tensor-core products for each),
1.2 GFLOP at B = 16. Bytes: the forward reads R and x once per F block (from L2 when the F
blocks of a chunk run together, as they are adjacent in the grid) and M likewise; the backward
reads R, x and M once and writes dR, dx and dM once (grad_proj from L1/L2, per pixel block,
channel and F block: 2 BB / BP values per entry of W). No D x F array exists anywhere: the forward's extra memory is the partials,
chunks x (2 B F + 2 B) values.
"""
import math

import triton
import triton.language as tl

from sib_fast.backends.triton.gram import tf32_parts
from sib_fast.backends.triton.pixels import pixel_offsets


@triton.jit
def _lowbias32(z):
    """lowbias32 of random_features.mix, on uint32 (the products wrap mod 2^32)."""
    z = z ^ (z >> 16)
    z = z * 0x7FEB352D
    z = z ^ (z >> 15)
    z = z * 0x846CA68B
    return z ^ (z >> 16)


@triton.jit
def _column_hashes(j, col_key):
    """b_f = mix(f ^ col_key) of the columns f = 2j (cosine) and 2j + 1 (sine) of the pairs j."""
    f = (2 * j).to(tl.uint32)
    return _lowbias32(f ^ col_key), _lowbias32((f + 1) ^ col_key)


@triton.jit
def _sin_cos_turns(k, CT: tl.constexpr):
    """(cos, sin) of the angle 2 pi k / 2^24, k an int32 in [0, 2^24): k less its nearest quarter
    turn q is an exact integer, so the polynomials see |x| <= pi / 4 and the quadrant rotates
    the result; Taylor series to x^9 / x^10 in float32 (error 2e-9) and x^15 / x^16 in float64
    (7e-17). No library call: libdevice's sine and cosine keep a stack frame for huge arguments."""
    q = (k + 2097152) >> 22  # nearest quarter turn, 0 .. 4
    x = (k - q * 4194304).to(CT) * (2.0 * math.pi / 16777216.0)
    x2 = x * x
    if CT == tl.float64:
        s = ((((((-1.0 / 1307674368000.0 * x2 + 1.0 / 6227020800.0) * x2 - 1.0 / 39916800.0) * x2 + 1.0 / 362880.0)
               * x2 - 1.0 / 5040.0) * x2 + 1.0 / 120.0) * x2 - 1.0 / 6.0) * x2
        c = (((((((1.0 / 20922789888000.0 * x2 - 1.0 / 87178291200.0) * x2 + 1.0 / 479001600.0) * x2
                 - 1.0 / 3628800.0) * x2 + 1.0 / 40320.0) * x2 - 1.0 / 720.0) * x2 + 1.0 / 24.0) * x2 - 0.5) * x2
    else:
        s = (((1.0 / 362880.0 * x2 - 1.0 / 5040.0) * x2 + 1.0 / 120.0) * x2 - 1.0 / 6.0) * x2
        c = ((((-1.0 / 3628800.0 * x2 + 1.0 / 40320.0) * x2 - 1.0 / 720.0) * x2 + 1.0 / 24.0) * x2 - 0.5) * x2
    s = x + x * s
    c = 1.0 + c
    quadrant = q & 3
    cos = tl.where(quadrant == 0, c, tl.where(quadrant == 1, -s, tl.where(quadrant == 2, -c, s)))
    sin = tl.where(quadrant == 0, s, tl.where(quadrant == 1, c, tl.where(quadrant == 2, -s, -c)))
    return cos, sin


@triton.jit
def _gaussian_pairs(a, b_cos, b_sin, CT: tl.constexpr):
    """W's entries (cosine, sine) of the pairs whose row hashes a_d and column hashes b_f broadcast
    to one tile: Box-Muller of the 24-bit uniforms u1 in (0, 1] and u2 in [0, 1)."""
    h1 = _lowbias32(a + b_cos)
    h2 = _lowbias32(a + b_sin)
    u1 = ((h1 >> 8) + 1).to(CT) * (1.0 / 16777216.0)
    radius = tl.sqrt(-2.0 * tl.log(u1))
    cos, sin = _sin_cos_turns((h2 >> 8).to(tl.int32), CT)
    return radius * cos, radius * sin


@triton.jit
def _dot3(a_hi, a_lo, b_hi, b_lo, acc, CT: tl.constexpr, DOT_PREC: tl.constexpr):
    """acc + a @ b: 3xTF32 from parts split once (tf32_parts) when DOT_PREC is "tf32x3" (Triton's
    own tf32x3 splits every operand at every product and keeps it off wgmma), else one product."""
    if DOT_PREC == "tf32x3":
        acc = tl.dot(a_lo, b_hi, acc, input_precision="tf32", out_dtype=CT)
        acc = tl.dot(a_hi, b_lo, acc, input_precision="tf32", out_dtype=CT)
        acc = tl.dot(a_hi, b_hi, acc, input_precision="tf32", out_dtype=CT)
    else:
        acc = tl.dot(a_hi, b_hi, acc, input_precision=DOT_PREC, out_dtype=CT)
    return acc


@triton.jit
def _split(t, DOT_PREC: tl.constexpr):
    """t's tf32 parts for _dot3 (t twice unless 3xTF32)."""
    if DOT_PREC == "tf32x3":
        hi, lo = tf32_parts(t)
    else:
        hi = t
        lo = t
    return hi, lo


@triton.jit
def _four_products(u, v, w_cos, w_sin, acc_uc, acc_us, acc_vc, acc_vs, CT: tl.constexpr, DOT_PREC: tl.constexpr):
    """The forward's products u @ W and v @ W with W's cosine and sine columns, each operand split once."""
    u_hi, u_lo = _split(u, DOT_PREC)
    v_hi, v_lo = _split(v, DOT_PREC)
    c_hi, c_lo = _split(w_cos, DOT_PREC)
    s_hi, s_lo = _split(w_sin, DOT_PREC)
    acc_uc = _dot3(u_hi, u_lo, c_hi, c_lo, acc_uc, CT, DOT_PREC)
    acc_us = _dot3(u_hi, u_lo, s_hi, s_lo, acc_us, CT, DOT_PREC)
    acc_vc = _dot3(v_hi, v_lo, c_hi, c_lo, acc_vc, CT, DOT_PREC)
    acc_vs = _dot3(v_hi, v_lo, s_hi, s_lo, acc_vs, CT, DOT_PREC)
    return acc_uc, acc_us, acc_vc, acc_vs


@triton.jit
def _row_hashes(d, row_key):
    """a_d = mix(d ^ row_key) of the rows d of W."""
    return _lowbias32(d.to(tl.uint32) ^ row_key)


@triton.jit(do_not_specialize=["row_key", "col_key"])  # one compilation for every seed
def _projection_kernel(R, x, M, proj_part, sq_part, B, C, N, W, F, sRb, sRc, sRh, sRw, sxb, sxc, sxh, sxw,
                       row_key, col_key, blocks_per_chunk, FLAT: tl.constexpr, CT: tl.constexpr,
                       DOT_PREC: tl.constexpr, BB: tl.constexpr, BD: tl.constexpr, BJ: tl.constexpr):
    """Partial proj (u @ W, v @ W) and squared norms of one chunk of d, F block and image block.

    The chunk's blocks are BD pixels of one channel (blk = c * ceil(N / BD) + pixel block), so
    the channel is one scalar per block and the pixels contiguous. Writes proj_part[chunk]
    (2, B, F) and, from F block 0, sq_part[chunk] (2, B)."""
    fb = tl.program_id(0)
    chunk = tl.program_id(1)
    ib = tl.program_id(2)
    rk = row_key.to(tl.uint32)
    ck = col_key.to(tl.uint32)
    rows = ib * BB + tl.arange(0, BB)
    rm = rows < B
    rows64 = rows.to(tl.int64)
    n_pairs = (F + 1) // 2
    j = fb * BJ + tl.arange(0, BJ)
    b_cos, b_sin = _column_hashes(j, ck)
    acc_uc = tl.zeros([BB, BJ], CT)
    acc_us = tl.zeros([BB, BJ], CT)
    acc_vc = tl.zeros([BB, BJ], CT)
    acc_vs = tl.zeros([BB, BJ], CT)
    sq_u = tl.zeros([BB], CT)
    sq_v = tl.zeros([BB], CT)
    pblocks = tl.cdiv(N, BD)
    first = chunk * blocks_per_chunk
    last = tl.minimum(first + blocks_per_chunk, C * pblocks)
    for blk in range(first, last):
        c = blk // pblocks
        p = (blk - c * pblocks) * BD + tl.arange(0, BD)
        pm = p < N
        inside = rm[:, None] & pm[None, :]
        m = tl.load(M + rows64[:, None] * N + p[None, :], mask=inside, other=0)
        pix = pixel_offsets(p, W, sRh, sRw, FLAT)
        u = tl.load(R + rows64[:, None] * sRb + c * sRc + pix[None, :], mask=inside, other=0).to(CT) * m
        pix = pixel_offsets(p, W, sxh, sxw, FLAT)
        v = tl.load(x + rows64[:, None] * sxb + c * sxc + pix[None, :], mask=inside, other=0).to(CT) * m
        a = _row_hashes(c * N + p, rk)
        w_cos, w_sin = _gaussian_pairs(a[:, None], b_cos[None, :], b_sin[None, :], CT)
        acc_uc, acc_us, acc_vc, acc_vs = _four_products(u, v, w_cos, w_sin, acc_uc, acc_us, acc_vc, acc_vs, CT,
                                                        DOT_PREC)
        if fb == 0:
            sq_u += tl.sum(u * u, axis=1)
            sq_v += tl.sum(v * v, axis=1)
    base = proj_part + chunk.to(tl.int64) * 2 * B * F + rows64[:, None] * F + 2 * j[None, :]
    cos_ok = rm[:, None] & (j < n_pairs)[None, :]
    sin_ok = rm[:, None] & (2 * j + 1 < F)[None, :]  # an odd F leaves the last sine out
    tl.store(base, acc_uc, mask=cos_ok)
    tl.store(base + 1, acc_us, mask=sin_ok)
    tl.store(base + B * F, acc_vc, mask=cos_ok)
    tl.store(base + B * F + 1, acc_vs, mask=sin_ok)
    sq_at = sq_part + chunk.to(tl.int64) * 2 * B + rows
    tl.store(sq_at, sq_u, mask=rm & (fb == 0))
    tl.store(sq_at + B, sq_v, mask=rm & (fb == 0))


@triton.jit
def _chunk_sum_kernel(part, out, n, n_chunks, CT: tl.constexpr, BLOCK: tl.constexpr):
    """out[o] = sum over the chunks s of part[s, o], in chunk order (o < n)."""
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    acc = tl.zeros([BLOCK], CT)
    for s in range(n_chunks):
        acc += tl.load(part + s * n + o, mask=m, other=0)
    tl.store(out + o, acc, mask=m)


@triton.jit
def _backward_products(grad_proj, rows, rm, a, B, F, ck, acc_u, acc_v, CT: tl.constexpr,
                       DOT_PREC: tl.constexpr, BJ: tl.constexpr):
    """acc_u + gP[0] @ W^T and acc_v + gP[1] @ W^T at the rows of W whose hashes are a (the
    program's pixels of one channel), over all F blocks: BJ x BP tiles of W^T, cosine and sine.

    The gradient is split into tf32 parts here, not beforehand: loading both parts doubled the
    loads and took more registers (compile test: spills at 64 images)."""
    P = (F + 1) // 2
    for jb in range(0, tl.cdiv(P, BJ)):
        j = jb * BJ + tl.arange(0, BJ)
        b_cos, b_sin = _column_hashes(j, ck)
        wt_cos, wt_sin = _gaussian_pairs(a[None, :], b_cos[:, None], b_sin[:, None], CT)
        c_hi, c_lo = _split(wt_cos, DOT_PREC)
        s_hi, s_lo = _split(wt_sin, DOT_PREC)
        at = grad_proj + rows.to(tl.int64)[:, None] * F + 2 * j[None, :]
        cos_ok = rm[:, None] & (j < P)[None, :]
        sin_ok = rm[:, None] & (2 * j + 1 < F)[None, :]  # an odd F has no last sine
        g_hi, g_lo = _split(tl.load(at, mask=cos_ok, other=0), DOT_PREC)
        acc_u = _dot3(g_hi, g_lo, c_hi, c_lo, acc_u, CT, DOT_PREC)
        g_hi, g_lo = _split(tl.load(at + 1, mask=sin_ok, other=0), DOT_PREC)
        acc_u = _dot3(g_hi, g_lo, s_hi, s_lo, acc_u, CT, DOT_PREC)
        g_hi, g_lo = _split(tl.load(at + B * F, mask=cos_ok, other=0), DOT_PREC)
        acc_v = _dot3(g_hi, g_lo, c_hi, c_lo, acc_v, CT, DOT_PREC)
        g_hi, g_lo = _split(tl.load(at + B * F + 1, mask=sin_ok, other=0), DOT_PREC)
        acc_v = _dot3(g_hi, g_lo, s_hi, s_lo, acc_v, CT, DOT_PREC)
    return acc_u, acc_v


@triton.jit(do_not_specialize=["row_key", "col_key"])
def _projection_backward_kernel(grad_proj, grad_sq, R, x, M, dR, dx, dM, B, C, N, W, F,
                                sRb, sRc, sRh, sRw, sxb, sxc, sxh, sxw, sdb, sdc, sdh, sdw, sgb, sgc, sgh, sgw,
                                row_key, col_key, HAS_SQ: tl.constexpr, GRAD_X: tl.constexpr, FLAT: tl.constexpr,
                                CT: tl.constexpr, DOT_PREC: tl.constexpr, BB: tl.constexpr, BP: tl.constexpr,
                                BJ: tl.constexpr):
    """dR, dx (GRAD_X) and dM of one pixel block and image block, every channel.

    grad_proj (2, B, F) and grad_sq (2, B) contiguous in the compute dtype; dR has R's strides
    (sd*), dx x's (sg*), dM is contiguous (B, N)."""
    pb = tl.program_id(0)
    ib = tl.program_id(1)
    rk = row_key.to(tl.uint32)
    ck = col_key.to(tl.uint32)
    rows = ib * BB + tl.arange(0, BB)
    rm = rows < B
    rows64 = rows.to(tl.int64)
    p = pb * BP + tl.arange(0, BP)
    pm = p < N
    inside = rm[:, None] & pm[None, :]
    plane = rows64[:, None] * N + p[None, :]
    m = tl.load(M + plane, mask=inside, other=0)
    if HAS_SQ:
        two_su = 2 * tl.load(grad_sq + rows, mask=rm, other=0)
        two_sv = 2 * tl.load(grad_sq + B + rows, mask=rm, other=0)
    pix_r = pixel_offsets(p, W, sRh, sRw, FLAT)
    pix_x = pixel_offsets(p, W, sxh, sxw, FLAT)
    pix_d = pixel_offsets(p, W, sdh, sdw, FLAT)
    pix_g = pixel_offsets(p, W, sgh, sgw, FLAT)
    dm = tl.zeros([BB, BP], CT)
    for c in range(C):
        a = _row_hashes(c * N + p, rk)
        du = tl.zeros([BB, BP], CT)
        dv = tl.zeros([BB, BP], CT)
        du, dv = _backward_products(grad_proj, rows, rm, a, B, F, ck, du, dv, CT, DOT_PREC, BJ)
        r = tl.load(R + rows64[:, None] * sRb + c * sRc + pix_r[None, :], mask=inside, other=0).to(CT)
        xv = tl.load(x + rows64[:, None] * sxb + c * sxc + pix_x[None, :], mask=inside, other=0).to(CT)
        if HAS_SQ:
            du += two_su[:, None] * (r * m)
            dv += two_sv[:, None] * (xv * m)
        tl.store(dR + rows64[:, None] * sdb + c * sdc + pix_d[None, :], (m * du).to(dR.dtype.element_ty),
                 mask=inside)
        if GRAD_X:
            tl.store(dx + rows64[:, None] * sgb + c * sgc + pix_g[None, :], (m * dv).to(dx.dtype.element_ty),
                     mask=inside)
        dm += r * du + xv * dv
    tl.store(dM + plane, dm.to(dM.dtype.element_ty), mask=inside)
