"""The masked projections of the random-feature HSIC (docs/loss.md section 4b) in float64 with the
materialised W of random_features.gaussian_matrix, and the comparison of a fused backend's
``masked_projection(R, x, mask, features, seed) -> (proj, sq)`` with it: values and the
gradients of R, x and the mask for random upstream gradients.

Shared by the Triton and the emulated CUDA tests, so that both check the same contract.
"""
from __future__ import annotations

import torch

from comparison import GRADIENT_TOLERANCE, assert_matches_reference
from sib_fast.backends.random_features import gaussian_matrix

# agreement with the float64 contract, relative to the largest value of each output
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}


def maps(B, C, H, W, dtype=torch.float32, seed=0, device="cpu", layout="contiguous"):
    """R (signed, small), x (in [0, 1)) and a mask in (0, 1), in ``layout``; the mask in the compute dtype."""
    g = torch.Generator().manual_seed(seed)
    R = torch.randn(B, C, H, W, generator=g, dtype=torch.float64) * 1e-2
    x = torch.rand(B, C, H, W, generator=g, dtype=torch.float64)
    mask = torch.rand(B, H, W, generator=g, dtype=torch.float64)
    R, x = (with_layout(t.to(dtype).to(device), layout) for t in (R, x))
    return R, x, mask.to(torch.float64 if dtype == torch.float64 else torch.float32).to(device)


def with_layout(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":  # pixels not evenly spaced
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    if layout == "sliced":  # every other column of a wider map: strided rows and pixels
        B, C, H, W = t.shape
        wide = torch.zeros(B, C, H, 2 * W, dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t


def contract(R, x, mask, features, seed):
    """(proj, sq) in float64 with W materialised, differentiable in the float64 copies returned."""
    R, x, mask = (t.detach().double().requires_grad_() for t in (R, x, mask))
    B = R.shape[0]
    W = gaussian_matrix(seed, R[0].numel(), features, device=R.device)
    u = (R * mask[:, None]).reshape(B, -1)
    v = (x * mask[:, None]).reshape(B, -1)
    proj = torch.stack((u @ W, v @ W))
    sq = torch.stack(((u * u).sum(1), (v * v).sum(1)))
    return proj, sq, (R, x, mask)


def upstream(B, features, seed, device, use_proj=True, use_sq=True):
    """Random upstream gradients of proj and sq (float64), None where that output is unused."""
    g = torch.Generator().manual_seed(1000 + seed)
    gp = torch.randn(2, B, features, generator=g, dtype=torch.float64).to(device) if use_proj else None
    gs = torch.randn(2, B, generator=g, dtype=torch.float64).to(device) if use_sq else None
    return gp, gs


def _loss(proj, sq, gp, gs):
    total = proj.sum() * 0
    if gp is not None:
        total = total + (proj * gp.to(proj.dtype)).sum()
    if gs is not None:
        total = total + (sq * gs.to(sq.dtype)).sum()
    return total


def compare_projection(masked_projection, R, x, mask, features, seed, *, x_grad=True, use_proj=True,
                       use_sq=True, what="projection"):
    """proj, sq and the gradients of R, x (when x_grad) and mask of ``masked_projection`` against
    the float64 contract at the same seed."""
    rtol = TOLERANCE[R.dtype]
    R_, x_, m_ = R.detach().requires_grad_(), x.detach().requires_grad_(x_grad), mask.detach().requires_grad_()
    proj, sq = masked_projection(R_, x_, m_, features, seed)
    ct = torch.float64 if torch.float64 in (R.dtype, x.dtype) else torch.float32
    assert proj.dtype == sq.dtype == ct and proj.shape == (2, R.shape[0], features) and sq.shape == (2, R.shape[0])
    ref_proj, ref_sq, ref_inputs = contract(R, x, mask, features, seed)
    assert_matches_reference(proj, ref_proj, rtol, f"{what} proj")
    assert_matches_reference(sq, ref_sq, rtol, f"{what} sq")
    gp, gs = upstream(R.shape[0], features, seed, R.device, use_proj, use_sq)
    inputs = (R_, x_, m_) if x_grad else (R_, m_)
    grads = torch.autograd.grad(_loss(proj, sq, gp, gs), inputs)
    ref_grads = torch.autograd.grad(_loss(ref_proj, ref_sq, gp, gs), ref_inputs if x_grad else ref_inputs[::2])
    names = ("dR", "dx", "dmask") if x_grad else ("dR", "dmask")
    for name, got, ref, t in zip(names, grads, ref_grads, inputs):
        assert got.dtype == t.dtype and got.shape == t.shape, f"{what} {name}: {got.dtype} {tuple(got.shape)}"
        # a gradient written in half precision carries its own rounding
        tol = GRADIENT_TOLERANCE[t.dtype] if t.dtype in (torch.bfloat16, torch.float16) else rtol
        assert_matches_reference(got, ref, tol, f"{what} {name}")
    if R.is_contiguous(memory_format=torch.channels_last) and not R.is_contiguous():
        assert grads[0].is_contiguous(memory_format=torch.channels_last), f"{what} dR: not channels_last as R"


# (B, C, H, W, features, layout, dtype, x requires grad): the cases every fused backend's
# projection is held to against the contract
CASES = [
    (2, 1, 1, 1, 1, "contiguous", torch.float32, True),         # 1x1, one feature (a pair's cosine alone)
    (3, 3, 5, 7, 7, "contiguous", torch.float32, True),         # odd everything, odd F
    (2, 3, 4, 3, 64, "channels_last", torch.float32, False),    # x without its gradient
    (2, 1, 2, 3, 512, "contiguous", torch.float32, True),       # F = 512 on a tiny image: several F blocks
    (3, 3, 3, 5, 7, "transposed", torch.float32, True),         # pixels not evenly spaced
    (2, 3, 3, 4, 7, "sliced", torch.float32, True),
    (3, 3, 5, 3, 7, "contiguous", torch.float64, True),
    (2, 3, 4, 5, 64, "channels_last", torch.float64, True),
    (2, 3, 4, 5, 64, "channels_last", torch.float64, False),
    (2, 1, 1, 1, 512, "sliced", torch.float64, True),
    (2, 3, 5, 4, 7, "contiguous", torch.bfloat16, True),
    (3, 1, 3, 3, 64, "channels_last", torch.bfloat16, True),
]


def case_id(case) -> str:
    B, C, H, W, F, layout, dtype, x_grad = case
    return f"{B}x{C}x{H}x{W}-F{F}-{layout}-{str(dtype)[6:]}" + ("" if x_grad else "-x-no-grad")


#: seeds whose row and column keys take both signs as int32 (the kernels' argument type)
UNIT_IMAGE_SEEDS = [0, 1, 2**31 + 5, 2**32 + 3, 2**63 - 1, 987654321987]


def check_unit_images(masked_projection, seed, dtype, device="cpu"):
    """R = x = the unit vector of d, mask = 1: proj[0, b] = proj[1, b] = W[d_b], entry by entry as
    gaussian_matrix makes it (float64 to 1e-14, float32 to 2e-6), and sq = 1."""
    C, H, W, features = 2, 3, 3, 37
    D = C * H * W
    rows = torch.tensor([0, 5, 9, D - 1])
    R = torch.zeros(len(rows), D, dtype=dtype)
    R[torch.arange(len(rows)), rows] = 1
    R = R.reshape(-1, C, H, W).to(device)
    proj, sq = masked_projection(R, R, torch.ones(len(rows), H, W, dtype=dtype, device=device), features, seed)
    expected = gaussian_matrix(seed, D, features)[rows]
    torch.testing.assert_close(proj[0].cpu().double(), expected, rtol=0, atol=1e-14 if dtype == torch.float64 else 2e-6)
    assert torch.equal(proj[0], proj[1]) and torch.equal(sq.cpu(), torch.ones(2, len(rows), dtype=dtype))
