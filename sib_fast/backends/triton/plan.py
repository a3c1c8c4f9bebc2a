"""The launch plan: block sizes, warp counts and grids of every kernel, from the input's
geometry, the device it is planned for and the tunables.

Three seams, for tests and ``python -m sib_fast.bench.tune``: ``tunables(**overrides)`` sets
plan constants for a block (``tunable_values()`` reads them), ``planned_device(device)`` is the
device description a plan is made for and ``planned_for(multiprocessors, capability)``
overrides it for a block. docs/triton.md says what each tunable trades.
"""
import functools
import re
from contextlib import contextmanager
from types import MappingProxyType
from typing import NamedTuple

import torch
import triton
import triton.language as tl

_TRITON_VERSION = tuple(map(int, re.match(r"(\d+)\.(\d+)", triton.__version__).groups()))

#: The plan constants and their defaults; override them with ``tunables``.
DEFAULT_TUNABLES = MappingProxyType({
    "MAX_IMAGE_BLOCK": 128,  # images per Gram tile
    "BWD_SINGLE_MAX": 32,  # largest batch whose backward passes keep the mixing matrix A on chip
    "BWD_DR_SINGLE_MAX": 32,  # the same for the backward's second pass (dR) alone
    "BWD_IMAGE_BLOCK": 32,  # images per row block of the backward passes beyond that
    "BWD_PAIR_MAX": 64,  # largest whole batch whose first backward pass holds A and A' together
    "BWD_PIXEL_BLOCK": 16,  # pixels per iteration of the backward passes
    "BWD_WARPS": 8,  # warps per program of the backward passes
    "SELECT_CHUNK": 2048,  # elements per iteration of the rank select
    "SELECT_DIGIT_BITS": 8 if _TRITON_VERSION >= (3, 8) else 4,  # bits per radix pass of the rank select
    "HBOX_BLOCK": (4, 128),  # rows x columns per iteration of the row running sums
    "VBOX_BLOCK": (32, 32),  # rows x columns per iteration of the column running sums
    "DOT_PRECISION": "tf32x3",  # input precision of float32 dots on tensor cores (sm_80 on)
    "PROJ_IMAGE_BLOCK": 64,  # most images per program of the random-feature projections' forward
    "PROJ_TILE": (32, 32),  # projection forward: rows of W per iteration x column pairs per program
    "PROJ_BWD_IMAGE_BLOCK": 32,  # the same for their backward
    "PROJ_BWD_TILE": (64, 16),  # projection backward: pixels per program x column pairs per iteration
    "PROJ_WARPS": 8,  # warps per projection program
})
_tunables = dict(DEFAULT_TUNABLES)


def tunable_values() -> dict:
    """The plan constants in effect now (the defaults, or a ``tunables`` block's)."""
    return dict(_tunables)


@contextmanager
def tunables(**overrides):
    """Plan every launch inside the block with these constants (names of ``DEFAULT_TUNABLES``),
    restored on exit; an unknown name raises ValueError before anything changes.

        with tunables(SELECT_CHUNK=32, HBOX_BLOCK=(4, 16)):
            ...
    """
    unknown = [name for name in overrides if name not in DEFAULT_TUNABLES]
    if unknown:
        raise ValueError(f"unknown Triton tunable {unknown[0]!r}; the tunables are {', '.join(DEFAULT_TUNABLES)}")
    saved = dict(_tunables)
    _tunables.update(overrides)
    try:
        yield tunable_values()
    finally:
        _tunables.clear()
        _tunables.update(saved)


class DeviceDescription(NamedTuple):
    """What a plan needs to know of the device: its streaming multiprocessors (the programs in
    flight) and compute capability (the code paths and their precision)."""
    multiprocessors: int
    capability: tuple


_planned_for = []  # overrides of planned_for blocks, innermost last


@functools.lru_cache(maxsize=None)
def _device_properties(device_type: str, index):
    if device_type == "cuda":
        props = torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device())
        return DeviceDescription(props.multi_processor_count, (props.major, props.minor))
    return DeviceDescription(2, (9, 0))  # the interpreter: few programs, same code paths as sm_90


def planned_device(device) -> DeviceDescription:
    """The device description the launches on ``device`` are planned for: the innermost
    ``planned_for`` block's, else the device's own."""
    if _planned_for:
        return _planned_for[-1]
    device = torch.device(device)
    return _device_properties(device.type, device.index)


@contextmanager
def planned_for(multiprocessors: int, capability: tuple):
    """Plan every launch inside the block as for a GPU of this many multiprocessors and this
    compute capability, e.g. ``planned_for(132, (9, 0))`` for an H100 (whatever runs it)."""
    description = DeviceDescription(int(multiprocessors), tuple(capability))
    _planned_for.append(description)
    try:
        yield description
    finally:
        _planned_for.remove(description)


def next_pow2(n: int) -> int:
    return 1 << (max(1, int(n)) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Plan:
    """Block sizes, warp counts and grids of every kernel for one input geometry.

    The compile test records the launches of a real forward and backward (``record_launches``),
    so it checks exactly these numbers. docs/triton.md, "The plan", gives the figures behind them.
    """

    def __init__(self, B, C, H, W, ct, num_sms, capability, strided_pixels=False):
        t = _tunables
        N = H * W
        self.B, self.C, self.H, self.W, self.N = B, C, H, W, N
        self.ct = ct
        self.strided = strided_pixels
        self.tl_ct = tl.float64 if ct == torch.float64 else tl.float32
        self.tl_key = tl.int64 if ct == torch.float64 else tl.int32
        self.key_dtype = torch.int64 if ct == torch.float64 else torch.int32
        self.dot_prec = "ieee" if (ct == torch.float64 or capability < (8, 0)) else t["DOT_PRECISION"]
        # 1. channel mean; 7. mask alone
        self.mean_block, self.mean_warps = 1024, 4
        # 2. selection: one program per image
        self.select_chunk, self.select_digit, self.select_warps = t["SELECT_CHUNK"], t["SELECT_DIGIT_BITS"], 8
        # 3-4. box passes
        (self.hbox_bh, self.hbox_bw), self.hbox_warps = t["HBOX_BLOCK"], 4
        (self.vbox_bh, self.vbox_bw), self.vbox_warps = t["VBOX_BLOCK"], 4
        self.n_colblocks = cdiv(W, self.vbox_bw)
        # 6. Gram pass over R, x: one tile of up to MAX_IMAGE_BLOCK images (each element read
        # once), pixel blocks of BP, partial Grams per pixel split; beyond one tile, the
        # image-block pairs I <= J only (the Gram is symmetric). Narrower tiles and pixel blocks
        # where the wider ones spill (sm_80 with strided pixels or several tiles).
        target = 2 * num_sms  # programs in flight per pass
        max_image_block = t["MAX_IMAGE_BLOCK"]
        narrow = capability < (9, 0) and (strided_pixels or B > max_image_block)
        most = min(max_image_block, 64) if narrow else max_image_block
        self.bb = min(most, max(16, next_pow2(B)))
        self.nbb = cdiv(B, self.bb)
        self.single = self.nbb == 1
        self.gram_tiles = self.nbb * (self.nbb + 1) // 2
        self.bp = 16 if self.bb >= 128 or self.bb <= 16 or not self.single else 32
        self.big_warps = 8 if self.bb >= 64 else 4
        # 2 pipeline stages where 3 spill: off the diagonal on sm_80
        self.gram_stages = 3 if self.single or capability >= (9, 0) else 2
        self.gram_bps, self.gram_split = self._split(cdiv(N, self.bp), target, 2 * self.gram_tiles)
        # 9, 13. backward passes: T = A @ (M R) needs A (B x B) on chip as a dot operand. Up to
        # BWD_SINGLE_MAX images it stays there for the whole pass; beyond, programs own row blocks
        # of images and loop over column blocks of A (the row blocks of one pixel range run side
        # by side, so the repeated reads of R and x come from L2).
        self.bwd_bp = t["BWD_PIXEL_BLOCK"]
        self.bwd_bb, self.bwd_single, self.bwd_nbb, self.bwd_bps, self.bwd_split = \
            self._backward_blocks(B, N, self.bwd_bp, t["BWD_SINGLE_MAX"], target, t["BWD_IMAGE_BLOCK"])
        self.bwd_warps = t["BWD_WARPS"]
        # 3xTF32 with A split once by _bwd_prep_kernel rather than at every product: fewer
        # registers and no conversions of A in the loops on sm_90 (on sm_80 the parts spill)
        self.bwd_presplit = self.dot_prec == "tf32x3" and capability >= (9, 0)
        # pass 1's launches (SHARE of _bwd_dm_kernel): a whole batch over BWD_PAIR_MAX in two,
        # R's share of dM then x's, each with one mixing matrix on chip (both would not fit)
        self.bwd_shares = (1, 2) if self.bwd_single and self.bwd_bb > t["BWD_PAIR_MAX"] else (0,)
        self.bwd_stages = 1
        # 13. pass 2 may keep A whole for larger batches than pass 1 (BWD_DR_SINGLE_MAX): it holds
        # one matrix, pass 1 two
        self.dr_bb, self.dr_single, self.dr_nbb, self.dr_bps, self.dr_split = \
            self._backward_blocks(B, N, self.bwd_bp, max(t["BWD_SINGLE_MAX"], t["BWD_DR_SINGLE_MAX"]), target,
                                  t["BWD_IMAGE_BLOCK"])
        # 7-8. one-program B x B work
        self.bb_all = max(16, next_pow2(B))
        self.row_block = 16
        self.reduce_block = 512
        self.small_warps = 4
        self.part_block = 128

    @classmethod
    def _backward_blocks(cls, B, N, bp, single_max, target, image_block):
        """A backward pass's image block, whether it holds the whole batch, the number of
        blocks, and the pixel blocks (of bp pixels) per split and splits."""
        single = B <= single_max
        bb = max(16, next_pow2(B)) if single else image_block
        nbb = cdiv(B, bb)
        return (bb, single, nbb, *cls._split(cdiv(N, bp), target, nbb))

    @staticmethod
    def _split(nblocks, target, tiles):
        n_split = max(1, min(nblocks, cdiv(target, tiles)))
        per_split = cdiv(nblocks, n_split)
        return per_split, cdiv(nblocks, per_split)


class ProjectionPlan(NamedTuple):
    """Blocks and grids of the random-feature projections (projection.py) for one geometry."""
    bb: int  # forward: images per program (16 at least: a dot operand's minimum)
    nbb: int  # forward: image blocks (each generates W anew)
    bd: int  # forward: rows of W (pixels of one channel) per iteration
    bj: int  # forward: column pairs per program
    n_fblocks: int  # forward: programs along F
    blocks_per_chunk: int  # forward: blocks of bd rows per chunk of d
    chunks: int  # forward: chunks of d, each with its partial products
    bwd_bb: int  # backward: images per program
    bwd_nbb: int
    bwd_bp: int  # backward: pixels per program
    bwd_bj: int  # backward: column pairs per iteration
    warps: int
    stages: int  # forward pipeline stages
    bwd_stages: int


def projection_plan(B: int, C: int, N: int, features: int, device, strided_pixels: bool = False) -> ProjectionPlan:
    """The projections' plan: forward programs over (F blocks, chunks of d, image blocks), about
    2 per multiprocessor; the backward one program per pixel block and image block."""
    t = _tunables
    num_sms, _ = planned_device(device)
    bb, bwd_bb = (min(max(16, next_pow2(t[name])), max(16, next_pow2(B)))
                  for name in ("PROJ_IMAGE_BLOCK", "PROJ_BWD_IMAGE_BLOCK"))
    nbb = cdiv(B, bb)
    bd, bj = t["PROJ_TILE"]
    pairs = (features + 1) // 2
    bj = min(bj, max(16, next_pow2(pairs)))  # 16: a dot's minimum
    n_fblocks = cdiv(pairs, bj)
    per_chunk, chunks = Plan._split(C * cdiv(N, bd), 2 * num_sms, n_fblocks * nbb)
    bwd_bp, bwd_bj = t["PROJ_BWD_TILE"]
    if strided_pixels:  # pixels not adjacent (channels_last): 32 or 64 took 255 registers and spilled (3.6, sm_80)
        bwd_bp = min(bwd_bp, 16)
    if bwd_bb == 16:  # twice the pairs: with 16 ptxas chose 128 registers and spilled (bfloat16, sm_80)
        bwd_bj *= 2
    bwd_bj = min(bwd_bj, max(16, next_pow2(pairs)))
    # 8 warps: 4 need more registers for the same tiles; 2 forward stages where 3 need more
    # registers and shared memory, 1 in the backward (2 spill at 32-64 images). The backward's
    # gradient blocks (images x pairs) are loaded once per BP pixels: 2 BB / BP values per
    # entry of W, hence its own narrower image block and wider pixel block.
    return ProjectionPlan(bb, nbb, bd, bj, n_fblocks, per_chunk, chunks, bwd_bb, cdiv(B, bwd_bb), bwd_bp, bwd_bj,
                          t["PROJ_WARPS"], 2, 1)


def make_plan(R: torch.Tensor, ct: torch.dtype, *others: torch.Tensor) -> Plan:
    """The plan for R (and the other big tensors read alongside it) in compute dtype ``ct``."""
    B, C, H, W = R.shape
    num_sms, capability = planned_device(R.device)
    strided = any(t.stride(3) != 1 and W > 1 for t in (R, *others))
    return Plan(B, C, H, W, ct, num_sms, capability, strided)
