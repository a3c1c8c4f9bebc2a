"""Odd inputs (tests/odd_inputs.py) on the cpu backend: a property-based test (the docs/loss.md section 8
rule on every drawn case, values and gradients against the float64 reference where the case is
well-conditioned) and the bad inputs of the reliability review; the reference's own behaviour on
them. The Triton backend (interpreter) and the CUDA emulation run the same checks in their own
test files, with fewer drawn cases."""
import pytest
from hypothesis import given

import torch

import sib_fast
from sib_fast.backends import reference
from odd_inputs import REGRESSION_CASES, cases, check_backend, check_no_second_derivative, property_settings

pytestmark = pytest.mark.skipif("cpu" not in sib_fast.available_backends("cpu"),
                                reason="the compiled extension is not built")


@property_settings(examples_ci=150, examples_wide=5000)
@given(cases(max_side=24))
def test_cpu_backend_on_odd_inputs(case):
    check_backend("cpu", case)


@pytest.mark.parametrize("name", REGRESSION_CASES)
def test_cpu_backend_on_the_bad_inputs_of_the_review(name):
    check_backend("cpu", REGRESSION_CASES[name])


def test_reference_nan_in_one_image_gives_that_image_a_nan_mask():
    R = torch.randn(4, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    R[1, 0, 20, 20] = float("nan")
    R[2, 1, 5, 5] = float("inf")
    mask = reference.spatial_mask(R, 3)
    assert mask[1].isnan().all() and mask[2].isnan().all()
    assert torch.isfinite(mask[[0, 3]]).all()


def test_reference_hsic_is_nan_not_zero_when_the_gram_overflows():
    R = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = torch.rand(4, 3, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    hsic, bg, _ = reference.sib_terms((R * 1e30).float(), x.float(), 3, 0.1, 10.0)
    assert torch.isnan(hsic) and bg == float("inf")  # was hsic 0: u / inf
    # in float64 the same values are in range, and HSIC depends on R's scale only through the
    # 1e-8 of u's denominator (hi - lo is about 1 here, 1e30 there)
    hsic64 = reference.sib_terms(R * 1e30, x, 3, 0.1, 10.0)[0]
    torch.testing.assert_close(hsic64, reference.sib_terms(R, x, 3, 0.1, 10.0)[0], rtol=1e-7, atol=0)


@pytest.mark.parametrize("dtype,tiny", [(torch.float32, 1e-41), (torch.float64, 1e-320)])
def test_reference_at_a_tiny_temperature_gives_the_nearest_rank_limit(dtype, tiny):
    R = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(0), dtype=dtype)
    x = torch.rand(4, 3, 6, 6, generator=torch.Generator().manual_seed(1), dtype=dtype)
    at_tiny = reference.sib_terms(R, x, 3, tiny, 10.0)
    at_small = reference.sib_terms(R, x, 3, 1e-3, 10.0)  # weights already one-hot: exp(-500) = 0
    for a, b in zip(at_tiny, at_small):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("window", [2 ** 31 + 1, 2 ** 63 - 1, 2 ** 64 + 1])
def test_reference_window_wider_than_the_whole_image_window(window):
    R = torch.randn(3, 2, 5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = torch.rand(3, 2, 5, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    whole = reference.whole_image_window(5, 7)
    assert whole == 13
    huge, exact = reference.sib_terms(R, x, window, 0.1, 10.0), reference.sib_terms(R, x, whole, 0.1, 10.0)
    torch.testing.assert_close(huge[2], torch.full_like(huge[2], 0.5), rtol=0, atol=1e-12)
    for a, b in zip(huge, exact):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    # and the box mean keeps the divisor of docs/loss.md section 3, k * k
    h = torch.rand(1, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(reference.box_mean(h, window), torch.full_like(h, h.sum().item() / window ** 2))


def test_cpu_backend_refuses_a_second_derivative():
    check_no_second_derivative("cpu")
