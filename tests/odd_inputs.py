"""Odd inputs for the property tests of every backend (hypothesis), and the check they run.

A drawn case mixes: tiny and odd shapes, every layout (contiguous, channels_last, transposed,
sliced, and stride-0 expanded for maps constant within each image), every floating dtype,
windows from 1 to past the whole image (2**64 + 1 too), and maps that are normal, ReLU-like,
constant, nearly constant, huge (1e30: the Gram overflows float32), enormous (1e200: it
overflows float64), tiny, or hold NaN / +-Inf at random positions, in R or in x.

``check_backend`` holds every backend to two rules:
- the docs/loss.md section 8 rule, on every case: hsic, bg and each mask value are finite, NaN or
  +-Inf exactly where the reference run in the backend's compute dtype has them (NaN or Inf
  in, NaN out; a sum of squares past the dtype's range gives NaN for hsic, +inf for bg);
- on the cases that are well-conditioned in the backend's dtype, values and gradients
  (random upstream) within tolerance of the float64 reference (``compare_head_with_reference``).

The profile is chosen by SIB_FAST_PROPERTY_PROFILE: "ci" (default, seeded, a few seconds per
backend) or "wide" (many more cases, for a search before a release; RESULTS.md says what it ran).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from comparison import HSIC_FLOOR, RELATIVE_TOLERANCE, assert_matches_reference, compare_head_with_reference

PROFILE = os.environ.get("SIB_FAST_PROPERTY_PROFILE", "ci")
if PROFILE not in ("ci", "wide"):
    raise ValueError(f"SIB_FAST_PROPERTY_PROFILE must be 'ci' or 'wide', got {PROFILE!r}")

KINDS = ("normal", "relu", "constant", "nearly_constant", "huge", "enormous", "tiny", "nonfinite", "all_nan")
X_KINDS = ("normal", "constant", "huge", "nonfinite")
LAYOUTS = ("contiguous", "channels_last", "transposed", "sliced", "expanded")
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
SCALE = {"huge": 1e30, "enormous": 1e200, "tiny": 1e-30}
# Kinds whose values a computation can match to RELATIVE_TOLERANCE: nearly constant maps (a
# spread of 1e-8, the size of u's 1e-8) amplify rounding by about 1e8 through hi - lo + 1e-8, in
# float64 too (1e-10 off), and so do constant ones in float64, where lo = sum w a is a (1 +- 1e-16)
# and u = 1e-16 a / 1e-8 (float32 rounds lo back to a exactly); tiny ones underflow in float32's
# squares.
WELL_CONDITIONED = {torch.float64: {"normal", "relu", "huge", "tiny"},
                    torch.float32: {"normal", "constant"}}
# R kinds compared in the forward only: where hi - lo is 0 or far below 1e-8 (flat or tiny maps)
# u's denominator is the 1e-8 of docs/loss.md section 3, and the mask chain's backward amplifies
# rounding by 1e8 / (R's scale): dR is ill-conditioned in any precision.
FORWARD_ONLY = {"constant", "nearly_constant", "tiny"}


def property_settings(examples_ci: int, examples_wide: int):
    """hypothesis settings of a property test: seeded and small in CI, wide on demand."""
    wide = PROFILE == "wide"
    return settings(max_examples=examples_wide if wide else examples_ci, deadline=None, derandomize=not wide,
                    database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           # the backends' autouse fixtures are stateless patches
                                           HealthCheck.function_scoped_fixture],
                    print_blob=True)


@dataclass
class Case:
    B: int
    C: int
    H: int
    W: int
    window: int
    temperature: float
    slope: float
    dtype: torch.dtype
    kind_R: str
    kind_x: str
    layout: str
    seed: int

    def maps(self, device="cpu"):
        g = torch.Generator().manual_seed(self.seed)
        return self._map(self.kind_R, g, 1e-2, device), self._map(self.kind_x, g, 1.0, device)

    def _map(self, kind, g, scale, device):
        B, C, H, W = self.B, self.C, self.H, self.W
        if kind == "constant":
            v = torch.randn(B, C, 1, 1, generator=g, dtype=torch.float64) * scale
            v = v.to(self.dtype).to(device)
            # stride 0 as drawn, or materialised in the drawn layout
            return v.expand(B, C, H, W) if self.layout == "expanded" else self._laid_out(v.expand(B, C, H, W))
        v = torch.randn(B, C, H, W, generator=g, dtype=torch.float64) * scale
        if kind == "relu":
            v = v.clamp_min(0)
        elif kind == "nearly_constant":
            v = scale * (1 + 1e-6 * v / scale)
        elif kind in SCALE:
            v = v / scale * SCALE[kind]
        elif kind == "all_nan":
            v = torch.full_like(v, float("nan"))
        elif kind == "nonfinite":
            flat = v.view(-1)
            count = int(torch.randint(1, 4, (), generator=g))
            where = torch.randint(0, flat.numel(), (count,), generator=g)
            bad = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=torch.float64)
            flat[where] = bad[torch.randint(0, 3, (count,), generator=g)]
        return self._laid_out(v.to(self.dtype).to(device))

    def _laid_out(self, v):
        if self.layout == "channels_last":
            return v.contiguous(memory_format=torch.channels_last)
        if self.layout == "transposed":
            return v.transpose(2, 3).contiguous().transpose(2, 3)
        if self.layout == "sliced":
            wide = torch.zeros(*v.shape[:3], 2 * v.shape[3], dtype=v.dtype, device=v.device)
            wide[..., ::2] = v
            return wide[..., ::2]
        return v.contiguous()

    def compute_dtype(self):
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    def well_conditioned(self) -> bool:
        """Whether the float64 reference is a fair yardstick at the backend's precision."""
        kinds = WELL_CONDITIONED.get(self.dtype, set())
        whole = 2 * max(self.H, self.W) - 1
        # planes under 16 pixels have nearly tied |g| (hi - lo tiny); windows reaching across
        # most of the image, but not all of it, make d nearly constant with ties decided by
        # rounding (RESULTS.md, fuzzing): both ill-conditioned in the function itself. x constant
        # in each image with one channel makes every x * M parallel: dHSIC/dx is exactly 0 and
        # a backend's dx (rounding noise) has no scale to be compared at
        # In float32 a window of the whole image is ill-conditioned too: its mask passes no
        # gradient in exact arithmetic, and the chain's cancellation leaves 1e-4 of dR.
        whole_ok = self.window >= whole and self.dtype == torch.float64
        return (self.kind_R in kinds and self.kind_x in kinds | {"huge"} and self.H * self.W >= 16
                and (self.window <= max(self.H, self.W) or whole_ok)
                and not (self.kind_x == "constant" and self.C == 1))


@st.composite
def cases(draw, max_side: int = 12, dtypes=DTYPES):
    B = draw(st.integers(2, 5))
    C = draw(st.integers(1, 3))
    H = draw(st.integers(1, max_side))
    W = draw(st.integers(1, max_side))
    if C * H * W < 2:
        W += 1
    window = draw(st.one_of(st.sampled_from((1, 3, 5, 9)), st.integers(0, max_side + 1).map(lambda k: 2 * k + 1),
                            st.just(2 ** 64 + 1)))
    return Case(B, C, H, W, window, draw(st.floats(0.02, 0.2)), draw(st.floats(1.0, 20.0)),
                draw(st.sampled_from(dtypes)), draw(st.sampled_from(KINDS)), draw(st.sampled_from(X_KINDS)),
                draw(st.sampled_from(LAYOUTS)), draw(st.integers(0, 2 ** 31 - 1)))


def _same_finiteness(actual, expected, what):
    a, e = actual.detach().cpu(), expected.detach().cpu()
    for name, test in (("NaN", torch.isnan), ("+-Inf", torch.isinf)):
        if not torch.equal(test(a), test(e)):
            raise AssertionError(f"{what}: {name} at {int(test(a).sum())} of {a.numel()} values, "
                                 f"the reference at {int(test(e).sum())}")


def check_backend(backend: str, case: Case, device="cpu") -> None:
    """Both rules of the module docstring for ``backend`` on ``case``."""
    import sib_fast
    from sib_fast.backends import reference

    R, x = case.maps(device)
    out = sib_fast.sib_terms(R, x, window_size=case.window, temperature=case.temperature, slope=case.slope,
                             backend=backend)
    ct = case.compute_dtype()
    ref = reference.sib_terms(R.to(ct), x.to(ct), case.window, case.temperature, case.slope)
    for name, a, e in zip(("hsic", "bg", "mask"), out, ref):
        _same_finiteness(a, e, f"{backend} {name} on {case}")
    if not (case.well_conditioned() and all(bool(torch.isfinite(t).all()) for t in ref)):
        return
    if case.kind_R in FORWARD_ONLY:
        ref64 = reference.sib_terms(R.double(), x.double(), case.window, case.temperature, case.slope)
        r = R.double() * (1 - ref64[2]).unsqueeze(1)  # bg's floor, as in compare_head_with_reference
        for name, a, e in zip(("hsic", "bg", "mask"), out, ref64):
            assert_matches_reference(a, e, RELATIVE_TOLERANCE[case.dtype], f"{backend} {name} on {case}",
                                     {"bg": (r * r).mean().item(), "hsic": HSIC_FLOOR}.get(name, 0.0))
    else:
        compare_head_with_reference(backend, R, x, case.window, case.temperature, case.slope, seed=case.seed)


def _case(kind_R="normal", dtype=torch.float32, window=3, temperature=0.1, kind_x="normal", layout="contiguous",
          shape=(4, 3, 6, 6)):
    return Case(*shape, window, temperature, 10.0, dtype, kind_R, kind_x, layout, seed=1)


# The bad inputs of the reliability review (issue 17, items 1, 2, 4, 5, 7), each checked by
# check_backend on every backend.
REGRESSION_CASES = {
    **{f"nan-in-R-{d}": _case("nonfinite", getattr(torch, d)) for d in ("float32", "float64", "bfloat16")},
    "all-nan-R": _case("all_nan"),
    "float16-overflow-to-inf": _case("huge", torch.float16),
    "nan-in-x": _case(kind_x="nonfinite"),
    "flat-maps-float32": _case("constant"),
    "flat-maps-float32-stride-0": _case("constant", layout="expanded"),
    "gram-overflow-float32": _case("huge"),
    "gram-overflow-float64": _case("enormous", torch.float64),
    "x-gram-overflow-float32": _case(kind_x="huge"),
    "temperature-1e-41-float32": _case(temperature=1e-41),
    "temperature-1e-320-float64": _case(dtype=torch.float64, temperature=1e-320),
    "window-2**31+1": _case(window=2 ** 31 + 1),
    "window-2**64+1-float64": _case(dtype=torch.float64, window=2 ** 64 + 1),
}


def check_no_second_derivative(backend: str, device="cpu") -> None:
    """A fused backend refuses a gradient of its gradient (it computes first derivatives only)
    with an error that names the remedy, instead of a silent zero; the reference computes it."""
    import pytest

    import sib_fast

    R, x = _case().maps(device)
    for name in (backend, "reference"):
        R_ = R.detach().double().requires_grad_() if name == "reference" else R.detach().requires_grad_()
        hsic, bg, _ = sib_fast.sib_terms(R_, x.to(R_.dtype), window_size=3, backend=name)
        (g,) = torch.autograd.grad(hsic + 1000 * bg, R_, create_graph=True)
        if name == "reference":
            (gg,) = torch.autograd.grad((g * g).sum(), R_)
            assert torch.isfinite(gg).all() and gg.abs().max() > 0
        else:
            with pytest.raises(RuntimeError, match="backend='reference'"):
                torch.autograd.grad((g * g).sum(), R_)
