"""Inputs of the head's correctness matrix, shared by every backend's test file."""
from __future__ import annotations

import pytest
import torch

import sib_fast

# (B, C, H, W, window, temperature, slope): every B in {2, 3, 7}, C in {1, 3, 4}, H x W in
# {1x1, 5x5, 17x23} and window in {1, 3, 31} appears, with shapes smaller than the window and
# non-default temperature and slope. Each backend adds its own larger shapes.
SMALL_CASES = [
    (2, 3, 1, 1, 31, 0.1, 10.0),
    (7, 4, 1, 1, 1, 0.1, 10.0),
    (3, 1, 5, 5, 3, 0.1, 10.0),
    (7, 1, 5, 5, 1, 0.24, 5.0),  # near the largest temperature the fused backends take in float64
    (2, 3, 5, 5, 31, 0.1, 10.0),
    (7, 3, 17, 23, 31, 0.1, 10.0),
    (2, 4, 17, 23, 1, 0.05, 20.0),
    (3, 1, 23, 17, 3, 0.2, 4.0),
]

LAYOUTS = ["channels_last", "sliced", "transposed", "offset"]


def case_id(case) -> str:
    return "x".join(map(str, case[:4])) + f"-k{case[4]}"


def random_maps(B, C, H, W, dtype, seed=0, device="cpu"):
    """R ~ 1e-3 N(0, 1) (the scale of a real VJP map) and x ~ U(0, 1), drawn in float64."""
    g = torch.Generator().manual_seed(seed)
    R = torch.randn(B, C, H, W, generator=g, dtype=torch.float64) * 1e-3
    x = torch.rand(B, C, H, W, generator=g, dtype=torch.float64)
    return R.to(device, dtype), x.to(device, dtype)


def strided_maps(layout, dtype, H=40, W=36, device="cpu"):
    """R and x of batch 4, 3 channels, in a memory layout other than contiguous."""
    R, x = random_maps(4, 3, H, W, dtype, seed=1, device=device)
    if layout == "channels_last":
        return R.contiguous(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":  # every other column and a channel window: non-dense strides
        R, x = random_maps(4, 5, H, 2 * W, dtype, seed=1, device=device)
        return R[:, 1:4, :, ::2], x[:, 1:4, :, ::2]
    if layout == "transposed":  # pixels not evenly spaced: h and w strides apart
        return R.transpose(2, 3), x.transpose(2, 3)
    if layout == "offset":  # dense but one element past an aligned start: no vector loads
        return torch.cat([R.new_zeros(1), R.flatten()])[1:].view(R.shape), x
    raise ValueError(layout)


def random_cases(count, seed, max_side=40):
    """``count`` seeded random cases (B, C, H, W, window, temperature, slope, layout, relu) beyond
    the fixed matrix, for a float64 comparison with the reference. They avoid the inputs on which
    the function itself is ill-conditioned, where any two float64 computations differ by more than
    the tolerance: windows reaching across most of the image (d is constant along a side, its
    ranks decided by rounding) and planes of fewer than 16 pixels (two nearly tied |g| make
    hi - lo about 1e-8)."""
    import random

    rng = random.Random(seed)
    cases = []
    while len(cases) < count:
        H, W = rng.randint(1, max_side), rng.randint(1, max_side)
        if H * W < 16:
            continue
        windows = [k for k in (1, 3, 5, 9, 15, 31) if k // 2 < max(1, min(H, W) // 2)]
        cases.append((rng.randint(2, 9), rng.randint(1, 4), H, W, rng.choice(windows),
                      rng.choice((0.02, 0.05, 0.1, 0.2)), rng.choice((1.0, 5.0, 10.0, 20.0)),
                      rng.choice(("contiguous", "channels_last", "transposed")), rng.random() < 0.3))
    return cases


def random_case_maps(case, seed, device="cpu"):
    """The float64 R (ReLU'd when the case says so) and x of a ``random_cases`` case, in its layout."""
    B, C, H, W, _, _, _, layout, relu = case
    R, x = random_maps(B, C, H, W, torch.float64, seed=seed, device=device)
    R = torch.relu(R) if relu else R
    if layout == "channels_last":
        return R.contiguous(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":
        return R.transpose(2, 3).contiguous().transpose(2, 3), x.transpose(2, 3).contiguous().transpose(2, 3)
    return R, x


def relu_like_maps(dtype, H=48, W=40, device="cpu"):
    """As ReLU networks give: whole regions of R exactly zero, so |g| and d have many ties."""
    R, x = random_maps(4, 3, H, W, dtype, seed=3, device=device)
    R = torch.relu(R)
    R[:, :, :H * 5 // 12] = 0
    R[:, :, :, W * 3 // 4:] = 0
    R[1] = 0  # one image with no VJP at all
    return R, x


def check_non_finite_gives_nan(backend, where, bad, device="cpu"):
    """NaN or Inf in R or x: a NaN result and a backward that neither crashes nor hangs."""
    R, x = random_maps(3, 2, 9, 9, torch.float32, seed=6, device=device)
    (R if where == "R" else x)[1, 0, 4, 4] = bad
    R.requires_grad_()
    hsic, bg, _ = sib_fast.sib_terms(R, x, window_size=3, backend=backend)
    assert torch.isnan(hsic)
    if where == "R":
        assert torch.isnan(bg)
    (dR,) = torch.autograd.grad(hsic + bg, R)
    assert dR.shape == R.shape


def check_op_checks_its_inputs(device="cpu"):
    """The compiled op checks its arguments itself, for callers that bypass sib_terms."""
    R, x = random_maps(3, 2, 9, 9, torch.float32, device=device)
    with pytest.raises(RuntimeError, match="same dtype"):
        torch.ops.sib_fast.sib_head_forward(R, x.double(), 3, 0.1, 10.0)
    with pytest.raises(RuntimeError, match="odd"):
        torch.ops.sib_fast.sib_head_forward(R, x, 4, 0.1, 10.0)


def check_repeated_runs_are_bitwise_equal(backend, R, x, runs=3):
    """Forward and backward give the same bits every time (fixed-order reductions)."""
    results = []
    for _ in range(runs):
        Rg, xg = R.clone().requires_grad_(), x.clone().requires_grad_()
        hsic, bg, mask = sib_fast.sib_terms(Rg, xg, backend=backend)
        (hsic + 1e3 * bg + mask.mean()).backward()
        results.append((hsic, bg, mask, Rg.grad, xg.grad))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


non_finite_cases = pytest.mark.parametrize(
    "where,bad", [(w, b) for w in ("R", "x") for b in (float("nan"), float("inf"))])
