"""How the kernels address and divide the pixels of the big tensors, in any layout.

A (B, C, H, W) tensor is read through its strides (contiguous, channels_last, sliced): the host
side (``strides``) gives them and whether pixel p of an image sits at p * sw (FLAT: rows are
contiguous in pixels, so no division); the device side (``pixel_offsets``) turns flat pixel
indices p = h * W + w into element offsets h * sh + w * sw. The passes over the big tensors
divide the pixels into splits of contiguous blocks, one split per program (``split_blocks``).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def pixel_offsets(p, W, sh, sw, FLAT: tl.constexpr):
    """Offsets of the pixels p (flat over H x W) in a map of row and column strides sh, sw;
    FLAT: pixel p sits at p * sw (contiguous rows), so no division."""
    if FLAT:
        off = p.to(tl.int64) * sw
    else:
        off = (p // W).to(tl.int64) * sh + (p % W).to(tl.int64) * sw
    return off


@triton.jit
def split_blocks(N, split, blocks_per_split, BP: tl.constexpr):
    """The blocks first .. last - 1 of BP pixels that pixel split ``split`` covers."""
    nblocks = tl.cdiv(N, BP)
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, nblocks)
    return first, last


def strides(t: torch.Tensor):
    """(sb, sc, sh, sw) and whether pixel p sits at p * sw (the kernels then skip p // W)."""
    _, _, H, W = t.shape
    sb, sc, sh, sw = t.stride()
    if W == 1:
        sw = sh
    return (sb, sc, sh, sw), (H == 1 or W == 1 or sh == W * sw)
