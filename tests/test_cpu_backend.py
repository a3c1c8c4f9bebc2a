"""The fused CPU backend against the float64 reference (issue 3's correctness matrix)."""
import pytest
import torch

import sib_fast
from comparison import PIECEWISE_CASES, compare_head_with_reference, compare_piecewise_constant_with_reference

pytestmark = pytest.mark.skipif("cpu" not in sib_fast.available_backends("cpu"),
                                reason="sib_fast._C was not built with CPU kernels")

# (B, C, H, W, window, temperature, slope): every B in {2, 3, 7}, C in {1, 3, 4},
# H x W in {1x1, 5x5, 17x23, 64x64, 224x224} and window in {1, 3, 31} appears,
# with shapes smaller than the window and non-default temperature and slope.
CASES = [
    (2, 3, 1, 1, 31, 0.1, 10.0),
    (7, 4, 1, 1, 1, 0.1, 10.0),
    (3, 1, 5, 5, 3, 0.1, 10.0),
    (7, 1, 5, 5, 1, 0.3, 5.0),
    (2, 3, 5, 5, 31, 0.1, 10.0),
    (7, 3, 17, 23, 31, 0.1, 10.0),
    (2, 4, 17, 23, 1, 0.05, 20.0),
    (3, 1, 23, 17, 3, 0.2, 4.0),
    (2, 4, 64, 64, 31, 0.1, 10.0),
    (3, 3, 64, 64, 3, 0.07, 15.0),
    (2, 3, 224, 224, 31, 0.1, 10.0),
]


def _maps(B, C, H, W, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    R = torch.randn(B, C, H, W, generator=g, dtype=torch.float64) * 1e-3
    x = torch.rand(B, C, H, W, generator=g, dtype=torch.float64)
    return R.to(dtype), x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES, ids=["x".join(map(str, c[:4])) + f"-k{c[4]}" for c in CASES])
def test_matches_reference(case, dtype):
    B, C, H, W, window, temperature, slope = case
    R, x = _maps(B, C, H, W, dtype)
    compare_head_with_reference("cpu", R, x, window, temperature, slope)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed"])
def test_strided_inputs(layout, dtype):
    R, x = _maps(4, 3, 40, 36, dtype, seed=1)
    if layout == "channels_last":
        R, x = R.contiguous(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":  # every other column and a channel window: non-dense strides
        R, x = _maps(4, 5, 40, 72, dtype, seed=1)
        R, x = R[:, 1:4, :, ::2], x[:, 1:4, :, ::2]
    else:
        R, x = R.transpose(2, 3), x.transpose(2, 3)
    compare_head_with_reference("cpu", R, x, 9, 0.1, 10.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    R, x = _maps(3, 3, 32, 24, torch.float32, seed=2)
    compare_head_with_reference("cpu", R.to(dtype) * 100, x.to(dtype), 7, 0.1, 10.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_maps_with_many_exact_zeros(dtype):
    # As ReLU networks give: whole regions of R exactly zero, so |g| and d have many ties.
    R, x = _maps(4, 3, 48, 40, dtype, seed=3)
    R = torch.relu(R)
    R[:, :, :20] = 0
    R[:, :, :, 30:] = 0
    R[1] = 0  # one image with no VJP at all
    compare_head_with_reference("cpu", R, x, 7, 0.1, 10.0)


def test_no_grad_for_x_when_it_does_not_require_it():
    R, x = _maps(3, 2, 12, 12, torch.float64, seed=4)
    compare_head_with_reference("cpu", R, x, 5, 0.1, 10.0, x_grad=False)


def test_results_do_not_depend_on_the_thread_count():
    R, x = _maps(5, 3, 70, 50, torch.float32, seed=5)
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


@pytest.mark.parametrize("where", ["R", "x"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_give_nan(where, bad):
    R, x = _maps(3, 2, 9, 9, torch.float32, seed=6)
    (R if where == "R" else x)[1, 0, 4, 4] = bad
    R.requires_grad_()
    hsic, bg, _ = sib_fast.sib_terms(R, x, window_size=3, backend="cpu")
    assert torch.isnan(hsic)
    if where == "R":
        assert torch.isnan(bg)
    (dR,) = torch.autograd.grad(hsic + bg, R)  # must not crash or hang
    assert dR.shape == R.shape


def test_op_checks_its_inputs_when_called_directly():
    R, x = _maps(3, 2, 9, 9, torch.float32)
    with pytest.raises(RuntimeError, match="same dtype"):
        torch.ops.sib_fast.sib_head_forward(R, x.double(), 3, 0.1, 10.0)
    with pytest.raises(RuntimeError, match="odd"):
        torch.ops.sib_fast.sib_head_forward(R, x, 4, 0.1, 10.0)


@pytest.mark.parametrize("shape,dtype", [((3, 2, 9, 11), torch.float64), ((2, 3, 16, 16), torch.float32)])
def test_opcheck(shape, dtype):
    R, x = _maps(*shape, dtype)
    torch.library.opcheck(torch.ops.sib_fast.sib_head_forward.default,
                          (R.requires_grad_(), x, 5, 0.1, 10.0))
    torch.library.opcheck(torch.ops.sib_fast.sib_head_forward.default,
                          (R.detach().contiguous(memory_format=torch.channels_last).requires_grad_(),
                           x.requires_grad_(), 3, 0.2, 8.0))


def test_torch_compile_fullgraph_matches_eager():
    R, x = _maps(3, 3, 20, 18, torch.float32, seed=7)

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
    R, x = _maps(3, 3, 16, 12, torch.float32, seed=8)
    R = (R * 100).bfloat16()
    compare_head_with_reference("cpu", R.float(), x, 5, 0.1, 10.0)  # what promotion must give
    mixed = sib_fast.sib_terms(R, x, window_size=5, backend="cpu")
    promoted = sib_fast.sib_terms(R.float(), x, window_size=5, backend="cpu")
    for a, b in zip(mixed, promoted):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", PIECEWISE_CASES, ids=lambda c: "b{}-{}x{}-k{}".format(*c))
def test_piecewise_constant_maps_tie_windows_exactly(case):
    compare_piecewise_constant_with_reference("cpu", case)
