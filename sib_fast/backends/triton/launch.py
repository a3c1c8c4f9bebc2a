"""The launch sequences: which kernels run, in which order, on which buffers, for the head's
forward, the mask alone and the backward (docs/triton.md, "Stages").

Every launch goes through ``_launch``, so ``record_launches`` sees each one (kernel, grid,
arguments, meta-parameters) and may keep it from running: the compile test and the memory test
at the target's shape plan real launches on CPU tensors this way.
"""
from contextlib import contextmanager
from typing import NamedTuple, Optional

import torch

from sib_fast.backends import random_features
from sib_fast.backends.reference import compute_dtype, whole_image_window
from sib_fast.backends.triton.backward import (_bwd_dm_kernel, _bwd_dr_kernel, _bwd_prep_kernel, _bwd_scalars_kernel,
                                               _t2_scatter_kernel)
from sib_fast.backends.triton.box import _hbox_kernel, _vbox_kernel
from sib_fast.backends.triton.buffers import CONST, N_WINDOWS, SLOTS, STATS, rank_table, rank_windows
from sib_fast.backends.triton.gram import _finalize_kernel, _gram_kernel, _gram_reduce_kernel, _mask_kernel
from sib_fast.backends.triton.plan import cdiv, make_plan, projection_plan
from sib_fast.backends.triton.projection import _chunk_sum_kernel, _projection_backward_kernel, _projection_kernel
from sib_fast.backends.triton.select import _channel_mean_kernel, _select_kernel
from sib_fast.backends.triton.pixels import strides


class Launch(NamedTuple):
    """One kernel launch as ``kernel[grid](*args, **meta)`` (args None where not kept)."""
    kernel: object
    grid: tuple
    args: Optional[tuple]
    meta: dict


_recorders = []  # (calls, execute, keep_args) of the record_launches blocks open now, innermost last


@contextmanager
def record_launches(execute: bool = False, keep_args: bool = True):
    """Yields a list that gets a ``Launch`` for every kernel launch inside the block, in order.

    With ``execute=False`` (the default) the launches are recorded instead of run, so the
    outputs are never written: a dry run that allocates and plans as the real one does (on
    CPU tensors too). Kept arguments keep their tensors alive: a memory measurement records
    with ``keep_args=False``. Rank tables are not cached while recording.
    """
    entry = ([], bool(execute), bool(keep_args))
    _recorders.append(entry)
    try:
        yield entry[0]
    finally:
        _recorders[:] = [r for r in _recorders if r is not entry]


def _launch(kernel, grid, *args, **meta):
    for calls, _, keep_args in _recorders:
        calls.append(Launch(kernel, grid, args if keep_args else None, meta))
    if all(execute for _, execute, _ in _recorders):
        kernel[grid](*args, **meta)


def _table(N, temperature, slope, window_size, dtype, device):
    """The rank table (buffers.rank_table); never cached while launches are recorded."""
    return rank_table(N, temperature, slope, window_size, dtype, device, cached=not _recorders)


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
    (sb, sc, sh, sw), flat = strides(R)
    _launch(_channel_mean_kernel, (cdiv(N, plan.mean_block), B), R, g, C, N, W, sb, sc, sh, sw,
            FLAT=flat, CT=plan.tl_ct, BLOCK=plan.mean_block, num_warps=plan.mean_warps)
    win = rank_windows(N)
    # the box pass's prefix plane is free until then and after it: the selects' candidate lists
    prefix = R.new_empty((B, H, W), dtype=ct)
    lists = prefix.view(torch.int32)
    list_stride = N * (prefix.element_size() // lists.element_size())

    def select(plane, first, windows):
        """Q of |plane| for the rank windows first .. first + len(windows) - 1 (up to 3)."""
        ranks = [v for r0, length, _ in windows for v in (r0, length)] + [0, 1] * (3 - len(windows))
        _launch(_select_kernel, (B,), plane, lists, list_stride, table, stats, sel_idx, sel_w, scratch, N, *ranks,
                WIN0=first, NQ=len(windows), CT=plan.tl_ct, KT=plan.tl_key, CHUNK=plan.select_chunk,
                DIGIT=plan.select_digit, **CONST, num_warps=plan.select_warps)

    select(g, 0, win[0:3])
    d = R.new_empty((B, H, W), dtype=ct)
    rad = window_size // 2
    # forward box sums in fixed point: integer views of the same planes
    prefix_q, d_q = prefix.view(plan.key_dtype), d.view(plan.key_dtype)
    _launch(_hbox_kernel, (cdiv(H, plan.hbox_bh), B), g, g, stats, table, prefix_q, d_q, H, W, rad, N, 1,
            FROM_G=True, CT=plan.tl_ct, RT=plan.tl_key, BH=plan.hbox_bh, BW=plan.hbox_bw, **CONST,
            num_warps=plan.hbox_warps)
    _launch(_vbox_kernel, (plan.n_colblocks, B), d_q, g, stats, table, prefix_q, d, stats, H, W, rad,
            window_size * window_size, N, 1, BACKWARD=False, CT=plan.tl_ct, RT=plan.tl_key, BH=plan.vbox_bh, BW=plan.vbox_bw,
            **CONST, num_warps=plan.vbox_warps)
    select(d, 3, win[3:4])
    return table, stats, sel_idx, sel_w, d


def launch_head_forward(R, x, window_size, temperature, slope):
    """Stages 1-7: (hsic, bg, mask, stats, sel_idx, sel_w, gram)."""
    ct = compute_dtype(R, x)
    plan = make_plan(R, ct, x)
    B, C, H, W = R.shape
    N = H * W
    table, stats, sel_idx, sel_w, d = _mask_chain(R, ct, window_size, temperature, slope, plan)
    mask = R.new_empty((B, H, W), dtype=ct)
    gram_part = R.new_empty((plan.gram_split, 2, B, B), dtype=ct)
    bg_part = R.new_empty((plan.gram_split, B, 3), dtype=ct)
    (sRb, sRc, sRh, sRw), flat_r = strides(R)
    (sxb, sxc, sxh, sxw), flat_x = strides(x)
    _launch(_gram_kernel, (plan.gram_tiles, plan.gram_split, 2), R, x, d, stats, table, mask,
            gram_part, bg_part, B, C, N, W, sRb, sRc, sRh, sRw, sxb, sxc, sxh, sxw, plan.gram_bps,
            FLAT=flat_r and flat_x, SINGLE=plan.single, CT=plan.tl_ct, DOT_PREC=plan.dot_prec,
            BB=plan.bb, BP=plan.bp, **CONST, num_warps=plan.big_warps, num_stages=plan.gram_stages)
    gram = R.new_empty((2, B, B), dtype=ct)
    _launch(_gram_reduce_kernel, (cdiv(2 * B * B, plan.reduce_block),), gram_part, gram, B,
            plan.gram_split, plan.bb, CT=plan.tl_ct, BLOCK=plan.reduce_block, num_warps=4)
    hsic = R.new_empty((), dtype=ct)
    bg = R.new_empty((), dtype=ct)
    _launch(_finalize_kernel, (1,), gram, bg_part, table, stats, hsic, bg, B, C * N,
            plan.gram_split, CT=plan.tl_ct, BB=plan.bb_all, RB=plan.row_block, **CONST, num_warps=plan.small_warps)
    return hsic, bg, mask, stats, sel_idx, sel_w, gram


def launch_mask_forward(R, window_size, temperature, slope):
    """Stages 1-5 and the mask alone: (mask, stats, sel_idx, sel_w)."""
    ct = compute_dtype(R)
    plan = make_plan(R, ct)
    B, C, H, W = R.shape
    N = H * W
    table, stats, sel_idx, sel_w, d = _mask_chain(R, ct, window_size, temperature, slope, plan)
    mask = R.new_empty((B, H, W), dtype=ct)
    _launch(_mask_kernel, (cdiv(N, plan.mean_block), B), d, stats, table, mask, N,
            BLOCK=plan.mean_block, **CONST, num_warps=plan.mean_warps)
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
    (sb, sc, _, sw), flat = strides(dR)
    if dR.dtype == ct and C >= 3 and flat:
        return dR[:, C - 1], dR[:, C - 2], dR[:, C - 3], sb, sw
    own = dR.new_empty((3, B, H, W), dtype=ct)
    return own[0], own[1], own[2], H * W, 1


def launch_head_backward(grad_hsic, grad_bg, grad_mask, R, x, mask, stats, sel_idx, sel_w, gram,
                         window_size, temperature, slope, head, grad_x):
    """Stages 8-13: (dR, dx) from the upstream gradients and what the forward saved; dx is
    empty unless head and grad_x; without head, the mask chain's share alone (the mask op)."""
    ct = stats.dtype
    plan = make_plan(R, ct)
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
    (sRb, sRc, sRh, sRw), flat_r = strides(R)
    (sxb, sxc, sxh, sxw), flat_x = strides(x)
    (sdb, sdc, sdh, sdw), flat_d = strides(dx) if want_dx else ((0, 0, 0, 0), True)
    for share in (plan.bwd_shares if head else (0,)):
        _launch(_bwd_dm_kernel, (plan.bwd_nbb, plan.bwd_split), R, x, mask, A, stats, table, grad_bg, gm, g, dz,
                dz_part, dx if want_dx else dz, B, C, N, W, sRb, sRc, sRh, sRw, sxb, sxc, sxh, sxw, sdb, sdc, sdh, sdw,
                C * N, plan.bwd_bps, PS, PP, HEAD=bool(head), HAS_GM=has_gm, GRAD_X=want_dx,
                FLAT=flat_r and flat_x and flat_d, SINGLE=plan.bwd_single, NBB=plan.bwd_nbb, CT=plan.tl_ct,
                DOT_PREC=plan.dot_prec, PRESPLIT=plan.bwd_presplit, SHARE=share,
                BB=plan.bwd_bb, BP=plan.bwd_bp, **CONST,
                num_warps=plan.bwd_warps, num_stages=plan.bwd_stages)
    _launch(_t2_scatter_kernel, (B,), dz, dz_part, sel_idx, sel_w, plan.bwd_split, PS, PP,
            CT=plan.tl_ct, BLOCK=plan.part_block, NSLOT=SLOTS, N_WIN=N_WINDOWS, num_warps=4)
    rad = window_size // 2
    part = R.new_empty((B, plan.n_colblocks, 2), dtype=ct)
    _launch(_hbox_kernel, (cdiv(H, plan.hbox_bh), B), dz, g, stats, table, prefix, dz, H, W, rad, PS, PP,
            FROM_G=False, CT=plan.tl_ct, RT=plan.tl_ct, BH=plan.hbox_bh, BW=plan.hbox_bw, **CONST,
            num_warps=plan.hbox_warps)
    _launch(_vbox_kernel, (plan.n_colblocks, B), dz, g, stats, table, prefix, dz, part, H, W, rad,
            window_size * window_size, PS, PP, BACKWARD=True, CT=plan.tl_ct, RT=plan.tl_ct, BH=plan.vbox_bh, BW=plan.vbox_bw,
            **CONST, num_warps=plan.vbox_warps)
    win = rank_windows(N)
    _launch(_bwd_scalars_kernel, (B,), dz, part, stats, table, sel_idx, plan.n_colblocks, PS, PP,
            win[0][0], win[0][1], win[1][0], win[1][1], win[2][0], win[2][1], CT=plan.tl_ct, BLOCK=plan.part_block,
            **CONST, num_warps=4)
    (sdb, sdc, sdh, sdw), flat_dr = strides(dR)
    _launch(_bwd_dr_kernel, (plan.dr_nbb, plan.dr_split), R, mask, g, dz, A, stats, table, grad_bg, dR,
            B, C, N, W, sRb, sRc, sRh, sRw, sdb, sdc, sdh, sdw, C * N, plan.dr_bps, PS, PP,
            HEAD=bool(head), FLAT=flat_r and flat_dr, SINGLE=plan.dr_single, NBB=plan.dr_nbb, CT=plan.tl_ct,
            DOT_PREC=plan.dot_prec, PRESPLIT=plan.bwd_presplit, BB=plan.dr_bb, BP=plan.bwd_bp, **CONST,
            num_warps=plan.bwd_warps, num_stages=plan.bwd_stages)
    return dR, dx


# the random-feature projections (projection.py)

def _signed_keys(seed):
    """The generator's two 32-bit keys as int32 values (the kernels read their bits as uint32),
    so that every seed gives the kernels the same argument types."""
    return tuple(k - (1 << 32) if k >= 1 << 31 else k for k in random_features.keys(int(seed)))


def _check_projection_inputs(R, x, mask, features):
    if R.dim() != 4 or x.shape != R.shape or mask.shape != (R.shape[0], *R.shape[2:]):
        raise ValueError(f"masked_projection: R and x must be (B, C, H, W) and mask (B, H, W), got "
                         f"{tuple(R.shape)}, {tuple(x.shape)} and {tuple(mask.shape)}")
    if not (R.device == x.device == mask.device):
        raise ValueError(f"masked_projection: R, x and mask must be on one device, got {R.device}, {x.device}, "
                         f"{mask.device}")
    if R.numel() >= 2**31 or not 1 <= features <= random_features.MAX_FEATURES:
        raise ValueError(f"masked_projection: needs fewer than 2^31 elements and 1 <= features < 2^31, got "
                         f"{R.numel()} elements and features={features}")


def launch_projection_forward(R, x, mask, features, seed):
    """(proj (2, B, F), sq (2, B)) in the compute dtype: per-chunk partials, then their sums."""
    _check_projection_inputs(R, x, mask, features)
    ct = compute_dtype(R, x)
    plan = make_plan(R, ct, x)
    B, C, H, W = R.shape
    pp = projection_plan(B, C, H * W, features, R.device, plan.strided)
    m = mask.to(ct).contiguous()
    proj_part = R.new_empty((pp.chunks, 2, B, features), dtype=ct)
    sq_part = R.new_empty((pp.chunks, 2, B), dtype=ct)
    (sRb, sRc, sRh, sRw), flat_r = strides(R)
    (sxb, sxc, sxh, sxw), flat_x = strides(x)
    _launch(_projection_kernel, (pp.n_fblocks, pp.chunks, pp.nbb), R, x, m, proj_part, sq_part, B, C, H * W, W,
            features, sRb, sRc, sRh, sRw, sxb, sxc, sxh, sxw, *_signed_keys(seed), pp.blocks_per_chunk,
            FLAT=flat_r and flat_x, CT=plan.tl_ct, DOT_PREC=plan.dot_prec, BB=pp.bb, BD=pp.bd, BJ=pp.bj,
            num_warps=pp.warps, num_stages=pp.stages)
    proj = R.new_empty((2, B, features), dtype=ct)
    sq = R.new_empty((2, B), dtype=ct)
    for part, out in ((proj_part, proj), (sq_part, sq)):
        _launch(_chunk_sum_kernel, (cdiv(out.numel(), 1024),), part, out, out.numel(), pp.chunks, CT=plan.tl_ct,
                BLOCK=1024, num_warps=4)
    return proj, sq


def launch_projection_backward(grad_proj, grad_sq, R, x, mask, features, seed, compute_grad_x):
    """(dR, dx, dM): dx is empty unless compute_grad_x; grad_sq None counts as zeros."""
    _check_projection_inputs(R, x, mask, features)
    ct = compute_dtype(R, x)
    plan = make_plan(R, ct, x)
    B, C, H, W = R.shape
    pp = projection_plan(B, C, H * W, features, R.device, plan.strided)
    gp = grad_proj.to(ct).contiguous()
    gs = grad_sq.to(ct).contiguous() if grad_sq is not None else gp
    m = mask.to(ct).contiguous()
    dR = torch.empty_like(R)
    dx = torch.empty_like(x) if compute_grad_x else x.new_empty(0)
    dM = torch.empty((B, H, W), dtype=mask.dtype, device=mask.device)
    (sRb, sRc, sRh, sRw), flat_r = strides(R)
    (sxb, sxc, sxh, sxw), flat_x = strides(x)
    (sdb, sdc, sdh, sdw), flat_d = strides(dR)
    (sgb, sgc, sgh, sgw), flat_g = strides(dx) if compute_grad_x else ((0, 0, 0, 0), True)
    _launch(_projection_backward_kernel, (cdiv(H * W, pp.bwd_bp), pp.bwd_nbb), gp, gs, R, x, m, dR,
            dx if compute_grad_x else dR, dM, B, C, H * W, W, features, sRb, sRc, sRh, sRw, sxb, sxc, sxh, sxw,
            sdb, sdc, sdh, sdw, sgb, sgc, sgh, sgw, *_signed_keys(seed), HAS_SQ=grad_sq is not None,
            GRAD_X=bool(compute_grad_x), FLAT=flat_r and flat_x and flat_d and flat_g, CT=plan.tl_ct,
            DOT_PREC=plan.dot_prec, BB=pp.bwd_bb, BP=pp.bwd_bp, BJ=pp.bwd_bj, num_warps=pp.warps,
            num_stages=pp.bwd_stages)
    return dR, dx, dM
