"""Comparison against the float64 reference, with a report that says where it differs."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

# Error allowed relative to the reference's scale, per dtype of the backend's inputs.
RELATIVE_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 1e-4, torch.float16: 1e-4}


def relative_error(actual: torch.Tensor, expected: torch.Tensor, floor: float = 0.0) -> float:
    """max |actual - expected| / max(max |expected|, floor) (both in float64)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = expected.abs().max().clamp_min(max(floor, torch.finfo(torch.float64).tiny))
    return ((actual - expected).abs().max() / scale).item()


def assert_matches_reference(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str,
                             floor: float = 0.0) -> None:
    """Within rtol of the reference, relative to its largest value (or to ``floor``, if larger)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != reference {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(e).all(), f"{what}: the reference itself is not finite"
    err = relative_error(a, e, floor)
    if not err <= rtol:  # also catches NaN
        diff = (a - e).abs()
        worst = torch.unravel_index(torch.nan_to_num(diff, nan=float("inf")).argmax(), diff.shape)
        worst = tuple(int(i) for i in worst)
        bad = (diff > rtol * e.abs().max()).sum().item()
        raise AssertionError(
            f"{what}: relative error {err:.3e} > {rtol:.1e}; {bad} of {e.numel()} elements off; "
            f"worst at {worst}: got {a[worst].item():.10e}, reference {e[worst].item():.10e}; "
            f"reference max |.| {e.abs().max().item():.3e}")


HSIC_FLOOR = 1e-3  # see compare_head_with_reference

# Largest relative error of a gradient written in a half-precision dtype: its own rounding.
GRADIENT_TOLERANCE = {**RELATIVE_TOLERANCE, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def compare_head_with_reference(backend: str, R: torch.Tensor, x: torch.Tensor, window_size: int,
                                temperature: float, slope: float, *, x_grad: bool = True, seed: int = 0) -> None:
    """hsic, bg, mask and dR (and dx) of ``backend`` against the reference run in float64.

    The upstream gradients of hsic, bg and mask are random, so every output's
    backward path is exercised; the reference sees the same input values in float64.
    """
    import sib_fast
    from sib_fast.backends import reference

    dtype = R.dtype
    R_ref = R.detach().double().requires_grad_()
    x_ref = x.detach().double().requires_grad_(x_grad)
    R = R.detach().requires_grad_()
    x = x.detach().requires_grad_(x_grad)
    out = sib_fast.sib_terms(R, x, window_size=window_size, temperature=temperature, slope=slope, backend=backend)
    ref = reference.sib_terms(R_ref, x_ref, window_size, temperature, slope)

    tol = RELATIVE_TOLERANCE[dtype]
    # The fused backends take BG from each image's sums of r = R (1 - M) and r^2: their rounding
    # is relative to mean(r^2), which a variance near 0 (r nearly constant) is far below.
    # K and L have unit diagonals, so HSIC's rounding is absolute: an HSIC near 0 (nearly
    # parallel vectors) is a difference of numbers near 1, compared at 1e-3.
    r = (R_ref * (1 - ref[2]).unsqueeze(1)).detach()
    floors = {"bg": (r * r).mean().item(), "hsic": HSIC_FLOOR}
    for name, a, e in zip(("hsic", "bg", "mask"), out, ref):
        assert a.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), f"{name} dtype {a.dtype}"
        assert_matches_reference(a, e, tol, f"{backend} {name}", floors.get(name, 0.0))

    # Random upstream gradients, each scaled so that its term's share of dR is of the
    # same size: otherwise the tiny background term (R is small) would hide its errors.
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(shape, generator=g, dtype=torch.float64) for shape in ((), (), ref[2].shape)]
    # A term whose share is zero in exact arithmetic (a mask that cannot move, as on
    # 1x1 images or with a window covering the image) keeps its raw weight.
    shares = [torch.autograd.grad((term * w.to(term)).sum(), R_ref, retain_graph=True)[0].norm().item()
              for term, w in zip(ref, weights)]
    largest = max(shares)
    weights = [w * (largest / s if s > 1e-6 * largest else 1.0) for w, s in zip(weights, shares)]

    def upstream(terms):
        return sum((t * w.to(t)).sum() for t, w in zip(terms, weights))

    inputs, inputs_ref = ((R, x), (R_ref, x_ref)) if x_grad else ((R,), (R_ref,))
    grads = torch.autograd.grad(upstream(out), inputs)
    grads_ref = torch.autograd.grad(upstream(ref), inputs_ref)
    for name, a, e, t in zip(("dR", "dx"), grads, grads_ref, inputs):
        assert a.dtype == t.dtype and a.shape == t.shape, f"{name}: {a.dtype} {tuple(a.shape)}"
        assert_matches_reference(a, e, GRADIENT_TOLERANCE[dtype], f"{backend} {name}")


def compare_each_output_alone(backend: str, R: torch.Tensor, x: torch.Tensor, window_size: int,
                              temperature: float, slope: float) -> None:
    """dR of hsic alone, of bg alone and of the mask alone against the reference: the backward of
    a loss that uses one output gets no gradient (None) for the others."""
    import sib_fast
    from sib_fast.backends import reference

    for k, name in enumerate(("hsic", "bg", "mask")):
        R_ref = R.detach().double().requires_grad_()
        R_k = R.detach().requires_grad_()
        out = sib_fast.sib_terms(R_k, x, window_size=window_size, temperature=temperature, slope=slope,
                                 backend=backend)[k]
        ref = reference.sib_terms(R_ref, x.detach().double(), window_size, temperature, slope)[k]
        weight = torch.linspace(-1.0, 1.0, ref.numel(), dtype=torch.float64, device=R.device).reshape(ref.shape)
        (grad,) = torch.autograd.grad((out * weight.to(out)).sum(), R_k)
        (grad_ref,) = torch.autograd.grad((ref * weight).sum(), R_ref)
        assert_matches_reference(grad, grad_ref, GRADIENT_TOLERANCE[R.dtype], f"{backend} dR of {name} alone")


def piecewise_constant_maps(B, C, H, W, block, seed=0, dtype=torch.float64, device="cpu"):
    """R made of block x block squares of three levels, and a random x.

    Many windows of h then hold the same values in different arrangements: ties in d that
    avg_pool2d's summation order may split by an ulp (see reference_with_exact_box_sums).
    """
    g = torch.Generator().manual_seed(seed)
    levels = torch.randint(0, 3, (B, C, -(-H // block), -(-W // block)), generator=g).double() * 0.25
    R = levels.repeat_interleave(block, 2).repeat_interleave(block, 3)[:, :, :H, :W]
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    return R.to(dtype=dtype, device=device), x.to(dtype=dtype, device=device)


@contextlib.contextmanager
def reference_with_exact_box_sums():
    """The reference with the box mean of h summed exactly, as the fused backends sum it.

    The fused backends put h on a dyadic grid (about 1e-13 apart for k = 31) so that window
    sums are exact and windows holding the same values in any arrangement tie exactly;
    avg_pool2d sums each window in row order and may split such ties by an ulp, and the
    tie order decides which pixel receives a rank's gradient. On inputs with such ties
    (piecewise-constant maps) compare against this reference; everywhere else against the
    plain one. The grid is the one of ``box_grid_bits`` in csrc/sib_head.h.
    """
    from sib_fast.backends import reference

    plain = reference.box_mean

    def exact_box_mean(h, window_size):
        scale = 2.0 ** (52 - (window_size * (window_size + 1)).bit_length())
        on_grid = h + (torch.round(h.double() * scale) / scale - h.double()).to(h.dtype).detach()
        # sums of grid values below 2^52 quanta are exact in float64 in any order
        box = F.avg_pool2d(on_grid.double().unsqueeze(1), window_size, stride=1, padding=window_size // 2)
        return box.squeeze(1).to(h.dtype)

    reference.box_mean = exact_box_mean
    try:
        yield
    finally:
        reference.box_mean = plain


# (block, H, W, window): windows of h holding the same levels in different arrangements
PIECEWISE_CASES = [(4, 24, 20, 5), (2, 17, 23, 3), (8, 64, 48, 31)]


def compare_piecewise_constant_with_reference(backend, case, seeds=(0, 1, 2), device="cpu"):
    """``backend`` on piecewise_constant_maps against the reference with exact box sums.

    float64 only: in float32, windows whose exact sums differ by less than h's own rounding
    are near-ties that any float32 computation may order either way.
    """
    block, H, W, window = case
    for seed in seeds:
        R, x = piecewise_constant_maps(3, 3, H, W, block, seed=seed, device=device)
        with reference_with_exact_box_sums():
            compare_head_with_reference(backend, R, x, window, 0.1, 10.0)
