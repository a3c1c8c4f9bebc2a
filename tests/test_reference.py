"""The reference path against the definitions of docs/loss.md and torch.autograd.gradcheck."""
import math

import pytest
import torch
import torch.nn.functional as F

from sib_fast.backends import reference


def window_quantile(v, q, temperature):
    """docs/loss.md section 2's window rule: only ranks floor(t)-8 .. floor(t)+9, renormalised."""
    n = v.shape[1]
    t = q * (n - 1)
    lo, hi = max(0, math.floor(t) - 8), min(n - 1, math.floor(t) + 9)
    ranks = torch.arange(lo, hi + 1, dtype=v.dtype)
    w = torch.softmax(-(ranks - t).abs() / temperature, dim=0)
    return (torch.sort(v, dim=1).values[:, lo:hi + 1] * w).sum(1)


@pytest.mark.parametrize("n", [1, 2, 7, 50176])
@pytest.mark.parametrize("q", [0.05, 0.8, 0.95, 0.5])
def test_window_quantile_equals_full_quantile(n, q):
    v = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    full = reference.soft_quantile(v, q, 0.1)
    windowed = window_quantile(v, q, 0.1)
    assert torch.allclose(full, windowed, rtol=1e-15, atol=0)


def test_soft_quantile_matches_hand_computed_weights():
    v = torch.tensor([[3.0, 1.0, 2.0]], dtype=torch.float64)  # sorted: 1, 2, 3
    t = 0.5 * 2  # q = 0.5 sits exactly on rank 1
    w = torch.tensor([math.exp(-1 / 0.1), 1.0, math.exp(-1 / 0.1)], dtype=torch.float64)
    expected = (w / w.sum() * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).sum()
    assert t == 1.0
    assert torch.allclose(reference.soft_quantile(v, 0.5, 0.1), expected.reshape(1), rtol=1e-15)


def test_soft_quantile_affine_identity():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(4, 999, dtype=torch.float64, generator=g)
    c, s = 0.3, 2.7
    for q in (0.05, 0.8, 0.95):
        lhs = reference.soft_quantile((a - c) / s, q, 0.1)
        rhs = (reference.soft_quantile(a, q, 0.1) - c) / s
        assert torch.allclose(lhs, rhs, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("shape,k", [((2, 1, 1), 31), ((2, 5, 7), 3), ((3, 17, 23), 31), ((1, 40, 9), 9)])
def test_box_mean_is_its_own_adjoint(shape, k):
    g = torch.Generator().manual_seed(1)
    h, e = torch.randn(shape, dtype=torch.float64, generator=g), torch.randn(shape, dtype=torch.float64, generator=g)
    lhs = (reference.box_mean(h, k) * e).sum()
    rhs = (h * reference.box_mean(e, k)).sum()
    assert torch.allclose(lhs, rhs, rtol=1e-13)


def test_box_mean_matches_its_definition():
    h = torch.randn(2, 6, 5, dtype=torch.float64)
    k, r = 3, 1
    padded = F.pad(h, (r, r, r, r))
    expected = torch.zeros_like(h)
    for i in range(6):
        for j in range(5):
            expected[:, i, j] = padded[:, i:i + k, j:j + k].sum(dim=(1, 2)) / (k * k)
    assert torch.allclose(reference.box_mean(h, k), expected, rtol=1e-14)


@pytest.mark.parametrize("shape,window", [((3, 2, 5, 6), 3), ((2, 1, 4, 4), 1), ((4, 3, 3, 5), 31)])
def test_head_passes_gradcheck(shape, window):
    g = torch.Generator().manual_seed(2)
    R = (torch.randn(shape, dtype=torch.float64, generator=g) * 1e-2).requires_grad_()
    x = torch.randn(shape, dtype=torch.float64, generator=g).requires_grad_()

    def head(R, x):
        hsic, bg, mask = reference.sib_terms(R, x, window, 0.3, 4.0)
        return hsic, bg * 1e3, mask

    assert torch.autograd.gradcheck(head, (R, x), eps=1e-7, atol=1e-6, rtol=1e-4)


def test_hsic_of_identical_directions_is_known():
    # With M ~ 1 everywhere HSIC(U, U) = ||P K P||_F^2/(B-1)^2; for orthonormal U: K = I, so
    # ||P||_F^2 = B - 1 and HSIC = 1/(B-1).
    B = 4
    R = torch.eye(B, dtype=torch.float64).reshape(B, 1, 2, 2)
    mask = torch.ones(B, 2, 2, dtype=torch.float64)
    assert torch.allclose(reference.hsic(R, R, mask), torch.tensor(1 / (B - 1), dtype=torch.float64))


def test_background_variance_is_unbiased_per_image():
    R = torch.arange(2 * 1 * 2 * 2, dtype=torch.float64).reshape(2, 1, 2, 2)
    mask = torch.zeros(2, 2, 2, dtype=torch.float64)
    expected = torch.tensor([0.0, 1, 2, 3]).var().double()  # both images have the same spread
    assert torch.allclose(reference.background_variance(R, mask), expected)


def test_low_precision_inputs_are_computed_in_float32():
    R = torch.randn(2, 3, 8, 8).bfloat16()
    hsic, bg, mask = reference.sib_terms(R, R, 3, 0.1, 10.0)
    assert hsic.dtype == bg.dtype == mask.dtype == torch.float32
    hsic64, bg64, mask64 = reference.sib_terms(R.double(), R.double(), 3, 0.1, 10.0)
    assert torch.allclose(mask.double(), mask64, atol=1e-5)


@pytest.mark.parametrize("where", ["R", "x"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_give_nan(where, bad):
    R, x = torch.randn(3, 2, 6, 6, dtype=torch.float64), torch.randn(3, 2, 6, 6, dtype=torch.float64)
    (R if where == "R" else x)[1, 0, 2, 3] = bad
    hsic, bg, _ = reference.sib_terms(R, x, 3, 0.1, 10.0)
    assert torch.isnan(hsic)
    if where == "R":
        assert torch.isnan(bg)
