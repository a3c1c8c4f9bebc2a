"""The fused CPU backend against the float64 reference (issue 3's correctness matrix)."""
import pytest
import torch

import sib_fast
from sib_fast.backends.dispatch import fused_temperature_limit
from comparison import (PIECEWISE_CASES, compare_each_output_alone, compare_head_with_reference,
                        compare_piecewise_constant_with_reference)
from head_inputs import (LAYOUTS, SMALL_CASES, case_id, check_non_finite_gives_nan, check_op_checks_its_inputs,
                         check_repeated_runs_are_bitwise_equal, non_finite_cases, random_case_maps, random_cases,
                         random_maps, relu_like_maps, strided_maps)
from memory_budget import check_head_memory_budget

pytestmark = pytest.mark.skipif("cpu" not in sib_fast.available_backends("cpu"),
                                reason="sib_fast._C was not built with CPU kernels")

# the shared small cases, and 64x64 and 224x224
CASES = SMALL_CASES + [
    (2, 4, 64, 64, 31, 0.1, 10.0),
    (3, 3, 64, 64, 3, 0.07, 15.0),
    (2, 3, 224, 224, 31, 0.1, 10.0),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(case, dtype):
    B, C, H, W, window, temperature, slope = case
    R, x = random_maps(B, C, H, W, dtype)
    compare_head_with_reference("cpu", R, x, window, temperature, slope)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_strided_inputs(layout, dtype):
    R, x = strided_maps(layout, dtype)
    compare_head_with_reference("cpu", R, x, 9, 0.1, 10.0)


RANDOM_CASES = random_cases(120, seed=7, max_side=40)


@pytest.mark.parametrize("index", range(len(RANDOM_CASES)), ids=lambda i: f"{i}-" + case_id(RANDOM_CASES[i]))
def test_random_cases(index):
    # seeded random shapes, windows, temperatures, slopes, layouts and ReLU-like maps beyond the
    # fixed matrix, in float64 and away from ill-conditioned inputs (head_inputs.random_cases)
    case = RANDOM_CASES[index]
    compare_head_with_reference("cpu", *random_case_maps(case, seed=index), *case[4:7], x_grad=index % 2 == 0,
                                seed=index)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gradient_of_each_output_alone(dtype):
    compare_each_output_alone("cpu", *random_maps(3, 2, 9, 11, dtype), 3, 0.1, 10.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_temperature_at_the_limit_of_the_rank_windows(dtype):
    # the largest temperature the fused backends take (dispatch.fused_temperature_limit: the
    # ranks their windows leave out weigh less than the dtype's rounding), on planes big enough
    # to leave ranks out on both sides of every window
    temperature = fused_temperature_limit(dtype)
    R, x = random_maps(3, 2, 17, 23, dtype)
    compare_head_with_reference("cpu", R, x, 5, temperature, 10.0)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_extra_memory_within_budget(layout):
    # dM, dg and g live in channels of dR between the passes: dR and the mask only
    R, x = random_maps(4, 3, 64, 56, torch.float32)
    if layout == "channels_last":
        R, x = strided_maps(layout, torch.float32)
    check_head_memory_budget("cpu", R, x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    R, x = random_maps(3, 3, 32, 24, torch.float32, seed=2)
    compare_head_with_reference("cpu", R.to(dtype) * 100, x.to(dtype), 7, 0.1, 10.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_maps_with_many_exact_zeros(dtype):
    compare_head_with_reference("cpu", *relu_like_maps(dtype), 7, 0.1, 10.0)


def test_no_grad_for_x_when_it_does_not_require_it():
    R, x = random_maps(3, 2, 12, 12, torch.float64, seed=4)
    compare_head_with_reference("cpu", R, x, 5, 0.1, 10.0, x_grad=False)


def test_results_do_not_depend_on_the_thread_count():
    R, x = random_maps(5, 3, 70, 50, torch.float32, seed=5)
    R.requires_grad_()
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            hsic, bg, mask = sib_fast.sib_terms(R, x, window_size=9, backend="cpu")
            (dR,) = torch.autograd.grad(hsic + bg + mask.sum(), R)
            results.append((hsic, bg, mask, dR))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_repeated_runs_are_bitwise_equal():
    R, x = random_maps(6, 3, 40, 36, torch.float32, seed=10)
    check_repeated_runs_are_bitwise_equal("cpu", R, x)


@non_finite_cases
def test_non_finite_inputs_give_nan(where, bad):
    check_non_finite_gives_nan("cpu", where, bad)


def test_op_checks_its_inputs_when_called_directly():
    check_op_checks_its_inputs()


@pytest.mark.parametrize("shape,dtype", [((3, 2, 9, 11), torch.float64), ((2, 3, 16, 16), torch.float32)])
def test_opcheck(shape, dtype):
    R, x = random_maps(*shape, dtype)
    torch.library.opcheck(torch.ops.sib_fast.sib_head_forward.default,
                          (R.requires_grad_(), x, 5, 0.1, 10.0))
    torch.library.opcheck(torch.ops.sib_fast.sib_head_forward.default,
                          (R.detach().contiguous(memory_format=torch.channels_last).requires_grad_(),
                           x.requires_grad_(), 3, 0.2, 8.0))


def test_torch_compile_fullgraph_matches_eager():
    R, x = random_maps(3, 3, 20, 18, torch.float32, seed=7)

    def loss(R, x):
        hsic, bg, mask = sib_fast.sib_terms(R, x, window_size=5, backend="cpu")
        return 1000 * torch.exp(bg) + 0.01 * torch.exp(-hsic) + mask.mean()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    Re = R.clone().requires_grad_()
    Rc = R.clone().requires_grad_()
    eager, comp = loss(Re, x), compiled(Rc, x)
    (ge,) = torch.autograd.grad(eager, Re)
    (gc,) = torch.autograd.grad(comp, Rc)
    assert torch.equal(eager, comp) and torch.equal(ge, gc)


def test_switching_reference_to_cpu_keeps_the_training_curve():
    # A user changing backend="reference" to "cpu" must see the same losses step after step.
    def curve(backend):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Softplus(), torch.nn.Conv2d(8, 8, 3, padding=1),
            torch.nn.Softplus(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-4)
        criterion = sib_fast.SIBLoss(window_size=7, lambda_bg=1e4, lambda_fg=1.0, backend=backend)
        g = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(4):
            x = torch.rand(6, 3, 20, 20, generator=g).requires_grad_()
            y = torch.randint(0, 4, (6,), generator=g)
            loss = criterion(model(x), y, x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append([criterion.loss.item(), criterion.hsic.item(), criterion.bg.item()])
        assert criterion.backend_used == backend
        return torch.tensor(losses, dtype=torch.float64)

    reference, fused = curve("reference"), curve("cpu")
    assert torch.allclose(fused, reference, rtol=1e-4, atol=0), f"\nreference {reference}\ncpu {fused}"


def test_mixed_input_dtypes_are_promoted():
    # Under autocast R can come in bfloat16 while x stays float32: both are read as float32.
    R, x = random_maps(3, 3, 16, 12, torch.float32, seed=8)
    R = (R * 100).bfloat16()
    compare_head_with_reference("cpu", R.float(), x, 5, 0.1, 10.0)  # what promotion must give
    mixed = sib_fast.sib_terms(R, x, window_size=5, backend="cpu")
    promoted = sib_fast.sib_terms(R.float(), x, window_size=5, backend="cpu")
    for a, b in zip(mixed, promoted):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", PIECEWISE_CASES, ids=lambda c: "b{}-{}x{}-k{}".format(*c))
def test_piecewise_constant_maps_tie_windows_exactly(case):
    compare_piecewise_constant_with_reference("cpu", case)
