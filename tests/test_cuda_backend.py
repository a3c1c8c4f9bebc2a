"""The fused CUDA backend against the float64 reference, on a GPU (issue 5).

The correctness matrix of the CPU backend (tests/test_cpu_backend.py) on CUDA tensors,
plus what only a GPU shows: realistic shapes (B = 128 at 224 x 224, several image tiles),
bitwise-identical repeated runs, the current stream, opcheck and torch.compile. Every
test is marked ``gpu`` (skipped without one); on a GPU machine whose sib_fast._C lacks
the CUDA kernels, test_cuda_backend_is_available fails with the reason and the rest skip.
Without a GPU, tests/test_cuda_emulated.py runs the same kernels through an emulation.
"""
import pytest
import torch

import sib_fast
from comparison import (PIECEWISE_CASES, assert_matches_reference, compare_each_output_alone,
                        compare_head_with_reference, compare_piecewise_constant_with_reference)
from head_inputs import (LAYOUTS, SMALL_CASES, case_id, check_non_finite_gives_nan, check_op_checks_its_inputs,
                         check_repeated_runs_are_bitwise_equal, non_finite_cases, random_maps, relu_like_maps,
                         strided_maps)
from memory_budget import check_head_memory_budget
from projection_contract import compare_projection, maps, upstream
from sib_fast.backends import dispatch
from test_random_features import compare_hsic_f_with_reference  # sib_terms(hsic_features=F) against the reference

pytestmark = pytest.mark.gpu

DEVICE = "cuda"


def _unavailable():
    return dispatch.unavailable_reason("cuda", "cuda") if torch.cuda.is_available() else "no GPU"


def test_cuda_backend_is_available():
    assert _unavailable() is None, f"the cuda backend cannot run: {_unavailable()}"


@pytest.fixture(autouse=True)
def _needs_backend(request):
    if request.node.name != "test_cuda_backend_is_available" and _unavailable() is not None:
        pytest.skip(f"the cuda backend cannot run: {_unavailable()}")


# (B, C, H, W, window, temperature, slope): as the CPU matrix, and realistic shapes
CASES = SMALL_CASES + [
    (2, 4, 64, 64, 31, 0.1, 10.0),
    (3, 3, 64, 64, 3, 0.07, 15.0),
    (2, 3, 224, 224, 31, 0.1, 10.0),
    (40, 3, 56, 56, 31, 0.1, 10.0),     # image tile 64
    (128, 3, 224, 224, 31, 0.1, 10.0),  # the benchmark's shape: image tile 128
    (160, 3, 48, 48, 9, 0.1, 10.0),     # two Gram tiles, two j-chunks in the backward
]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_extra_memory_within_budget(layout):
    # the benchmark's shape at batch 32: the backward's planes live in channels of dR
    R, x = random_maps(32, 3, 224, 224, torch.float32, device=DEVICE)
    if layout == "channels_last":
        R, x = (t.contiguous(memory_format=torch.channels_last) for t in (R, x))
    print(f"cuda {layout}: {check_head_memory_budget('cuda', R, x):.2f}x R")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(case, dtype):
    B, C, H, W, window, temperature, slope = case
    if dtype == torch.float64 and B * C * H * W > 4_000_000:
        pytest.skip("the float64 reference at this size is slow; float32 covers it")
    R, x = random_maps(B, C, H, W, dtype, device=DEVICE)
    compare_head_with_reference("cuda", R, x, window, temperature, slope)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_strided_inputs(layout, dtype):
    compare_head_with_reference("cuda", *strided_maps(layout, dtype, device=DEVICE), 9, 0.1, 10.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    R, x = random_maps(3, 3, 32, 24, torch.float32, seed=2, device=DEVICE)
    compare_head_with_reference("cuda", R.to(dtype) * 100, x.to(dtype), 7, 0.1, 10.0)


def test_bfloat16_at_realistic_shape():
    R, x = random_maps(32, 3, 224, 224, torch.float32, seed=9, device=DEVICE)
    compare_head_with_reference("cuda", (R * 100).to(torch.bfloat16), x.to(torch.bfloat16), 31, 0.1, 10.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_maps_with_many_exact_zeros(dtype):
    compare_head_with_reference("cuda", *relu_like_maps(dtype, device=DEVICE), 7, 0.1, 10.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gradient_of_each_output_alone(dtype):
    compare_each_output_alone("cuda", *random_maps(3, 2, 9, 11, dtype, device=DEVICE), 3, 0.1, 10.0)


def test_no_grad_for_x_when_it_does_not_require_it():
    R, x = random_maps(3, 2, 12, 12, torch.float64, seed=4, device=DEVICE)
    compare_head_with_reference("cuda", R, x, 5, 0.1, 10.0, x_grad=False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_saved_tensors_are_the_cpu_kernels(dtype):
    """Same ranks (ties by index) and, to rounding, the same mask, Gram matrices and stats."""
    R, x = random_maps(5, 3, 33, 29, dtype, seed=5, device=DEVICE)
    gpu = torch.ops.sib_fast.sib_head_forward(R, x, 5, 0.1, 10.0)
    cpu = torch.ops.sib_fast.sib_head_forward(R.cpu(), x.cpu(), 5, 0.1, 10.0)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for name, a, b in zip(("hsic", "bg", "mask", "gram", "image_stats"), gpu[:5], cpu[:5]):
        assert a.device.type == "cuda" and a.dtype == b.dtype and a.shape == b.shape, name
        assert_matches_reference(a, b, tol, f"CUDA {name} vs CPU")
    assert torch.equal(gpu[5].cpu(), cpu[5]), "rank_index differs from the CPU kernels'"


def test_repeated_runs_are_bitwise_equal():
    R, x = random_maps(32, 3, 224, 224, torch.float32, seed=10, device=DEVICE)
    check_repeated_runs_are_bitwise_equal("cuda", R, x)


def test_runs_on_the_current_stream():
    R, x = random_maps(8, 3, 64, 64, torch.float32, seed=11, device=DEVICE)
    grads = (torch.tensor(0.5, device=DEVICE), torch.tensor(2.0, device=DEVICE))

    def run():
        out = torch.ops.sib_fast.sib_head_forward(R, x, 9, 0.1, 10.0)
        return (*out, *torch.ops.sib_fast.sib_head_backward(*grads, None, R, x, *out[2:], 9, 0.1, 10.0, True))

    expected = run()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = run()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for a, b in zip(expected, got):
        assert torch.equal(a, b)


def test_no_host_synchronisation():
    R, x = random_maps(8, 3, 32, 32, torch.float32, seed=12, device=DEVICE)
    R.requires_grad_()
    sib_fast.sib_terms(R, x, backend="cuda")  # warm up
    torch.cuda.set_sync_debug_mode("error")
    try:
        hsic, bg, mask = sib_fast.sib_terms(R, x, backend="cuda")
        torch.autograd.grad(hsic + bg + mask.sum(), R)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@non_finite_cases
def test_non_finite_inputs_give_nan(where, bad):
    check_non_finite_gives_nan("cuda", where, bad, device=DEVICE)


def test_op_checks_its_inputs_when_called_directly():
    check_op_checks_its_inputs(DEVICE)


@pytest.mark.parametrize("shape,dtype", [((3, 2, 9, 11), torch.float64), ((2, 3, 16, 16), torch.float32)])
def test_opcheck(shape, dtype):
    R, x = random_maps(*shape, dtype, device=DEVICE)
    torch.library.opcheck(torch.ops.sib_fast.sib_head_forward.default, (R.requires_grad_(), x, 5, 0.1, 10.0))
    torch.library.opcheck(torch.ops.sib_fast.sib_head_forward.default,
                          (R.detach().contiguous(memory_format=torch.channels_last).requires_grad_(),
                           x.requires_grad_(), 3, 0.2, 8.0))


def test_torch_compile_fullgraph_matches_eager():
    R, x = random_maps(3, 3, 20, 18, torch.float32, seed=7, device=DEVICE)

    def loss(R, x):
        hsic, bg, mask = sib_fast.sib_terms(R, x, window_size=5, backend="cuda")
        return 1000 * torch.exp(bg) + 0.01 * torch.exp(-hsic) + mask.mean()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    Re, Rc = R.clone().requires_grad_(), R.clone().requires_grad_()
    eager, comp = loss(Re, x), compiled(Rc, x)
    (ge,) = torch.autograd.grad(eager, Re)
    (gc,) = torch.autograd.grad(comp, Rc)
    assert torch.equal(eager, comp) and torch.equal(ge, gc)


def test_auto_picks_a_fused_backend_on_cuda_tensors():
    assert dispatch.resolve_backend(torch.device(DEVICE)) in ("cuda", "triton")


@pytest.mark.parametrize("case", PIECEWISE_CASES, ids=lambda c: "b{}-{}x{}-k{}".format(*c))
def test_piecewise_constant_maps_tie_windows_exactly(case):
    compare_piecewise_constant_with_reference("cuda", case, device=DEVICE)


# ---- the random-feature HSIC's masked projections (issue 22; csrc/cuda/sib_projection_cuda.cu),
# in the emulation in tests/test_cuda_emulated_projection.py; here on the GPU, at real sizes


def _cuda_projection(R, x, mask, features, seed):
    return torch.ops.sib_fast.masked_projection_forward(R, x, mask, features, seed)


@pytest.mark.parametrize("B,dtype", [(16, torch.float32), (128, torch.float32), (16, torch.bfloat16),
                                     (5, torch.float64)], ids=["16-float32", "128-float32", "16-bfloat16", "5-float64"])
def test_projection_target_shape(B, dtype):
    # 3x224x224 at F = 512 (the contract's float64 W: 0.6 GB): several chunks and image blocks
    R, x, mask = maps(B, 3, 224, 224, dtype, seed=9, device=DEVICE)
    compare_projection(_cuda_projection, R, x, mask, 512, seed=2024, what=f"cuda B={B}")


def test_projection_channels_last_odd_features_and_no_grad_x():
    R, x, mask = maps(5, 3, 37, 29, device=DEVICE, layout="channels_last", seed=10)
    compare_projection(_cuda_projection, R, x, mask, 77, seed=5, what="cuda channels_last")
    R, x, mask = maps(20, 1, 31, 33, device=DEVICE, layout="sliced", seed=11)
    compare_projection(_cuda_projection, R, x, mask, 7, seed=6, x_grad=False, what="cuda sliced")


def test_projection_repeated_runs_are_bitwise_equal():
    R, x, mask = maps(32, 3, 224, 224, seed=11, device=DEVICE)
    gp, gs = upstream(32, 512, 0, DEVICE)
    results = []
    for _ in range(2):
        R_, x_, m_ = (t.clone().requires_grad_() for t in (R, x, mask))
        proj, sq = _cuda_projection(R_, x_, m_, 512, 3)
        results.append((proj, sq, *torch.autograd.grad((proj * gp.float()).sum() + (sq * gs.float()).sum(),
                                                       (R_, x_, m_))))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("F", [1, 7, 64, 512])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_hsic_f_matches_reference(F, dtype):
    # sib_terms(backend="cuda", hsic_features=F): hsic, bg, mask, dR, dx against the reference
    R, x = random_maps(3, 3, 23, 17, dtype, seed=F, device=DEVICE)
    compare_hsic_f_with_reference("cuda", R, x, 31, F, seed=31 * F + 3)
