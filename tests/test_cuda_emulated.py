"""The CUDA kernels (csrc/cuda) run on the CPU, against the float64 reference.

Machines without a GPU cannot launch the kernels, so this module compiles the same
sources as plain C++ against tests/cuda_emulation/cuda_emu.h, a host emulation of the
CUDA subset they use (every CUDA thread a fiber, barriers and warp collectives
emulated, WMMA fragments holding whole tiles, tf32 operands truncated as on tensor
cores), and registers them as ``sib_fast_emu::sib_head_forward/backward`` on CPU
tensors. The launch configuration, indexing, rank selection, box sums, Gram and
backward products and reductions are the CUDA code's own; what it cannot check is
what only hardware shows (timing, occupancy, real races, device memory errors):
tests/test_cuda_backend.py does that on a GPU.

The emulation runs a block's threads one after another, so the cases are small; they
cover B in {2, 3, 7, 20, 64, 70, 128, 140} (image tiles of 16, 64 and 128, and several
tiles), C in {1, 2, 3, 4}, 1x1 to 64x64 images, windows {1, 3, 5, 9, 31},
non-default temperature and slope, strided inputs, half precision, ties, NaN.
Set SIB_FAST_SKIP_CUDA_EMULATION=1 to skip (the build takes about a minute).
"""
from __future__ import annotations

import os
import pathlib

import pytest
import torch

import sib_fast
from hypothesis import given
from sib_fast.backends import reference
from sib_fast.backends.autograd import register_head_ops, register_projection_ops
from comparison import (PIECEWISE_CASES, assert_matches_reference, compare_each_output_alone,
                        compare_head_with_reference, compare_piecewise_constant_with_reference)
from head_inputs import (LAYOUTS, SMALL_CASES, case_id, check_non_finite_gives_nan, non_finite_cases, random_case_maps,
                         random_cases, random_maps, relu_like_maps, strided_maps)
from memory_budget import check_head_memory_budget
from odd_inputs import REGRESSION_CASES, cases, check_backend, check_no_second_derivative, property_settings

ROOT = pathlib.Path(__file__).resolve().parents[1]
EMULATION = ROOT / "tests" / "cuda_emulation"
BACKEND = "cuda-emulated"

pytestmark = pytest.mark.skipif(os.environ.get("SIB_FAST_SKIP_CUDA_EMULATION") == "1",
                                reason="SIB_FAST_SKIP_CUDA_EMULATION=1")

_registered = False


def _build_and_register():
    global _registered
    if _registered:
        return
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        pytest.skip("ninja is needed to build the CUDA emulation")
    sources = [str(EMULATION / f"emu_{part}.cpp") for part in ("head", "gram", "backward", "ops", "projection")]
    cpp_extension.load(name="sib_fast_cuda_emulation", sources=sources,
                       extra_include_paths=[str(ROOT / "csrc"), str(EMULATION)],
                       extra_cflags=["-O1", "-Wno-unknown-pragmas"], with_cuda=False,
                       is_python_module=False, verbose=False)

    register_head_ops("sib_fast_emu")
    register_projection_ops("sib_fast_emu")  # the masked projections (tests/test_cuda_emulated_projection.py)
    _registered = True


def _emulated_terms(R, x, window_size, temperature, slope):
    hsic, bg, mask, *_ = torch.ops.sib_fast_emu.sib_head_forward(R, x, window_size, temperature, slope)
    return hsic, bg, mask


@pytest.fixture(scope="module", autouse=True)
def emulated_backend():
    """Builds the emulation and routes backend="cuda-emulated" of sib_fast.sib_terms to it."""
    _build_and_register()
    original = sib_fast.sib_terms

    def sib_terms(R, x, *, window_size=31, temperature=0.1, slope=10.0, backend="auto"):
        if backend != BACKEND:
            return original(R, x, window_size=window_size, temperature=temperature, slope=slope, backend=backend)
        # as sib_fast.functional: every window from the whole image's up is that one
        window_size = min(window_size, reference.whole_image_window(R.shape[2], R.shape[3]))
        return _emulated_terms(R, x, window_size, temperature, slope)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sib_fast, "sib_terms", sib_terms)
        yield


# (B, C, H, W, window, temperature, slope)
CASES = SMALL_CASES + [
    (20, 2, 9, 7, 5, 0.1, 10.0),   # image tile 64
    (70, 1, 4, 6, 3, 0.1, 10.0),   # image tile 128 in float32; two tiles and two j-chunks in float64
    (64, 1, 5, 4, 3, 0.1, 10.0),   # a full 64-image tile: every warp region of the diagonal order holds images
    (128, 1, 4, 6, 3, 0.1, 10.0),  # a full 128-image tile, likewise; two full tiles in float64
    (140, 1, 3, 4, 3, 0.1, 10.0),  # two 128-image tiles in float32: a tile pair off the diagonal
    (2, 2, 64, 64, 31, 0.1, 10.0),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(case, dtype):
    B, C, H, W, window, temperature, slope = case
    R, x = random_maps(B, C, H, W, dtype)
    compare_head_with_reference(BACKEND, R, x, window, temperature, slope)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_extra_memory_within_budget(layout):
    # the backward's planes (dM_u, dM_v, g) live in channels of dR: dR and the mask only
    R, x = random_maps(4, 3, 64, 64, torch.float32)
    if layout == "channels_last":
        R, x = (t.contiguous(memory_format=torch.channels_last) for t in (R, x))
    check_head_memory_budget(BACKEND, R, x)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("num_sms", [108, 132], ids=["A100", "H100"])
def test_allocations_at_the_target_shape_within_budget(monkeypatch, num_sms, layout):
    # The target's own shape (B = 128, 3x224x224, float32), far too large to emulate: the
    # launches are checked (grid, block) but not run, so what is measured is everything the host
    # code allocates, with the grids (pixel splits, partial Grams) of a GPU of this size.
    monkeypatch.setenv("SIB_FAST_EMU_DRY_RUN", "1")
    monkeypatch.setenv("SIB_FAST_EMU_NUM_SMS", str(num_sms))
    R, x = (torch.empty(128, 3, 224, 224) for _ in range(2))
    if layout == "channels_last":
        R, x = (t.contiguous(memory_format=torch.channels_last) for t in (R, x))
    before = torch.ops.sib_fast_emu.launches_checked()
    ratio = check_head_memory_budget(BACKEND, R, x)
    # two forwards and backwards (the first warms caches), 15 launches each when this was written
    assert torch.ops.sib_fast_emu.launches_checked() - before >= 18, "the head did not reach its launches"
    # dR alone is the size of R: a measurement below that did not see the allocations
    assert ratio >= 1.0, f"measured {ratio:.2f}x R, less than dR itself"
    print(f"cuda {layout} at B = 128, 3x224x224: {ratio:.2f}x R")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_strided_inputs(layout):
    compare_head_with_reference(BACKEND, *strided_maps(layout, torch.float32, H=20, W=18), 5, 0.1, 10.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    R, x = random_maps(3, 3, 16, 24, torch.float32, seed=2)
    compare_head_with_reference(BACKEND, R.to(dtype) * 100, x.to(dtype), 7, 0.1, 10.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_maps_with_many_exact_zeros(dtype):
    compare_head_with_reference(BACKEND, *relu_like_maps(dtype, H=24, W=20), 7, 0.1, 10.0)


def test_sparse_maps_tie_in_d_as_the_reference():
    # Nearly all of R is zero, so lo = q80 = 0, h = 1/2 there and Q(d, 0.8) falls on a
    # plateau of equal box means: the selection must break those ties by index, as the
    # reference's stable sort. (Windows holding the same values in another arrangement are
    # a different matter: avg_pool2d's summation order can split such ties by an ulp, and
    # no running sum reproduces that; the kernels then tie them exactly.)
    R, x = random_maps(3, 2, 30, 30, torch.float64, seed=4)
    R[:, :, 4:, :] = 0
    compare_head_with_reference(BACKEND, R, x, 5, 0.1, 10.0)


RANDOM_CASES = random_cases(16, seed=7, max_side=16)


@pytest.mark.parametrize("index", range(len(RANDOM_CASES)), ids=lambda i: f"{i}-" + case_id(RANDOM_CASES[i]))
def test_random_cases(index):
    # seeded random shapes, windows, temperatures, slopes, layouts and ReLU-like maps beyond the
    # fixed matrix, in float64 and away from ill-conditioned inputs (head_inputs.random_cases)
    case = RANDOM_CASES[index]
    compare_head_with_reference(BACKEND, *random_case_maps(case, seed=index), *case[4:7], x_grad=index % 2 == 0,
                                seed=index)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gradient_of_each_output_alone(dtype):
    compare_each_output_alone(BACKEND, *random_maps(3, 2, 9, 11, dtype), 3, 0.1, 10.0)


def test_no_grad_for_x_when_it_does_not_require_it():
    R, x = random_maps(3, 2, 12, 12, torch.float64, seed=4)
    compare_head_with_reference(BACKEND, R, x, 5, 0.1, 10.0, x_grad=False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_saved_tensors_are_the_cpu_kernels(dtype):
    """Same ranks (ties by index) and, to rounding, the same mask, Gram matrices and stats."""
    R, x = random_maps(5, 3, 13, 11, dtype, seed=5)
    emu = torch.ops.sib_fast_emu.sib_head_forward(R, x, 5, 0.1, 10.0)
    cpu = torch.ops.sib_fast.sib_head_forward(R, x, 5, 0.1, 10.0)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for name, a, b in zip(("hsic", "bg", "mask", "gram", "image_stats"), emu[:5], cpu[:5]):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert_matches_reference(a, b, tol, f"emulated CUDA {name} vs CPU")
    assert torch.equal(emu[5], cpu[5]), "rank_index differs from the CPU kernels'"
    grads = (torch.tensor(0.7, dtype=emu[0].dtype), torch.tensor(-2.0, dtype=emu[0].dtype),
             torch.randn(emu[2].shape, dtype=emu[2].dtype, generator=torch.Generator().manual_seed(0)))
    d_emu = torch.ops.sib_fast_emu.sib_head_backward(*grads, R, x, *cpu[2:], 5, 0.1, 10.0, True)
    d_cpu = torch.ops.sib_fast.sib_head_backward(*grads, R, x, *cpu[2:], 5, 0.1, 10.0, True)
    for name, a, b in zip(("dR", "dx"), d_emu, d_cpu):
        assert_matches_reference(a, b, tol, f"emulated CUDA {name} vs CPU")


@pytest.mark.parametrize("order", ["reverse", "random"])
def test_results_do_not_depend_on_the_thread_schedule(order, monkeypatch):
    """Threads resumed in another order between barriers: a missing barrier would show."""
    R, x = random_maps(3, 2, 11, 9, torch.float32, seed=6)
    grads = (torch.tensor(0.5), torch.tensor(1.5), torch.randn(3, 11, 9, generator=torch.Generator().manual_seed(1)))

    def run():
        out = torch.ops.sib_fast_emu.sib_head_forward(R, x, 3, 0.1, 10.0)
        return (*out, *torch.ops.sib_fast_emu.sib_head_backward(*grads, R, x, *out[2:], 3, 0.1, 10.0, True))

    forward_order = run()
    monkeypatch.setenv("SIB_EMU_ORDER", order)
    other_order = run()
    for a, b in zip(forward_order, other_order):
        assert torch.equal(a, b)


@non_finite_cases
def test_non_finite_inputs_give_nan(where, bad):
    check_non_finite_gives_nan(BACKEND, where, bad)


def test_op_checks_its_inputs():
    R, x = random_maps(3, 2, 9, 9, torch.float32)
    with pytest.raises(RuntimeError, match="same dtype"):
        torch.ops.sib_fast_emu.sib_head_forward(R, x.double(), 3, 0.1, 10.0)
    with pytest.raises(RuntimeError, match="odd"):
        torch.ops.sib_fast_emu.sib_head_forward(R, x, 4, 0.1, 10.0)
    with pytest.raises(RuntimeError, match="at least 2 images"):
        torch.ops.sib_fast_emu.sib_head_forward(R[:1], x[:1], 3, 0.1, 10.0)


def test_opcheck():
    R, x = random_maps(3, 2, 6, 5, torch.float32)
    torch.library.opcheck(torch.ops.sib_fast_emu.sib_head_forward.default, (R.requires_grad_(), x, 3, 0.1, 10.0))


@pytest.mark.parametrize("case", PIECEWISE_CASES, ids=lambda c: "b{}-{}x{}-k{}".format(*c))
def test_piecewise_constant_maps_tie_windows_exactly(case):
    compare_piecewise_constant_with_reference(BACKEND, case)


@property_settings(examples_ci=12, examples_wide=300)
@given(case=cases(max_side=8, dtypes=(torch.float64, torch.float32, torch.bfloat16)))
def test_odd_inputs(case):
    """tests/odd_inputs.py: the docs/loss.md section 8 rule, and the float64 reference where well-conditioned."""
    check_backend(BACKEND, case)


@pytest.mark.parametrize("name", REGRESSION_CASES)
def test_bad_inputs_of_the_review(name):
    check_backend(BACKEND, REGRESSION_CASES[name])


def test_refuses_a_second_derivative():
    check_no_second_derivative(BACKEND)
