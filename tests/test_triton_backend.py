"""The ``triton`` backend against the float64 reference (issue 4).

Without a GPU the kernels run on CPU tensors in Triton's interpreter: this module
imports ``sib_fast.backends.triton.ops`` with ``TRITON_INTERPRET=1`` (the interpreter is
chosen when the kernels are decorated) and sets the variable only while its own tests
run, so dispatch accepts CPU tensors for "triton" here and nowhere else. There the dots
round their operands as tensor cores do (``_tensor_core_rounding``), so float32 results
meet the tolerance only with the GPU's own precision choices. With a GPU the
same cases run on CUDA tensors, and the tests marked ``gpu`` add realistic shapes,
determinism and ``torch.compile``.

The interpreter is slow (a few seconds per small case on 2 cores), so the cases are
few and chosen to cover: B in {2, 3, 5}, C in {1, 3}, windows {1, 3, 9}, 1x1, odd,
non-square and smaller-than-window images, channels_last and sliced (non-dense)
inputs, x without grad, float64 and bfloat16, several pixel splits, loops over
several chunks (small block sizes) and several image blocks (small image blocks), and six
seeded random cases up to 12x12.
"""
import importlib
import os

import pytest
import torch

from comparison import (GRADIENT_TOLERANCE, RELATIVE_TOLERANCE, assert_matches_reference, compare_each_output_alone,
                        compare_head_with_reference, compare_piecewise_constant_with_reference)
from head_inputs import case_id, random_case_maps, random_cases
from hypothesis import given
from odd_inputs import REGRESSION_CASES, cases, check_backend, check_no_second_derivative, property_settings
from memory_budget import check_head_memory_budget

# The interpreter evaluates in numpy, which warns where the kernels rely on IEEE overflow
# (sigmoid of a large argument: exp overflows to inf, 1 / (1 + inf) = 0).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

HAS_GPU = torch.cuda.is_available()
DEVICE = "cuda" if HAS_GPU else "cpu"


def _import_backend():
    if HAS_GPU:
        return importlib.import_module("sib_fast.backends.triton.ops")
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        return importlib.import_module("sib_fast.backends.triton.ops")
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = previous


try:
    tb = _import_backend()
except ImportError as exc:  # no Triton
    pytest.skip(f"the Triton backend cannot be imported: {exc}", allow_module_level=True)

# the stage modules, imported by tb (with the interpreter where there is no GPU) and reached here
# through their public seams: tunables, planned_for, record_launches
import triton.language as tl  # noqa: E402
from sib_fast.backends.triton.buffers import (N_WINDOWS, SLOTS, STATS, rank_table, rank_table_values,  # noqa: E402
                                              rank_windows)
from sib_fast.backends.triton.launch import record_launches  # noqa: E402
from sib_fast.backends.triton.plan import (DEFAULT_TUNABLES, Plan, make_plan, planned_device, planned_for,  # noqa: E402
                                           tunable_values, tunables)
from sib_fast.backends.triton.select import _select_kernel  # noqa: E402

if not HAS_GPU and type(_select_kernel).__name__ != "InterpretedFunction":
    pytest.skip("sib_fast.backends.triton.ops was imported before this module without TRITON_INTERPRET=1, "
                "so its kernels cannot run on CPU tensors", allow_module_level=True)


@pytest.fixture(autouse=True)
def _interpreter_for_dispatch(monkeypatch):
    """dispatch lets "triton" take CPU tensors only while TRITON_INTERPRET=1."""
    if not HAS_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _tensor_core_rounding(monkeypatch):
    """Without a GPU, the interpreter's dots round their operands as sm_80+ tensor cores do (its
    own dots are exact float32), so every comparison with the reference here sees the GPU's
    precision: "tf32" keeps the operands' top 10 mantissa bits (the tensor cores ignore the
    other 13), "tf32x3" is Triton's split big = tf32(a), small = a - big, summed as
    small*big + big*small + big*big, each product rounded likewise."""
    if HAS_GPU:
        return
    import numpy as np
    from triton.runtime import interpreter

    precision = interpreter._ir.INPUT_PRECISION
    exact_dot = interpreter.InterpreterBuilder.create_dot

    def keep_tf32(v, nearest=False):
        bits = v.astype(np.float32).view(np.uint32)
        return ((bits + np.uint32(0x1000 if nearest else 0)) & np.uint32(0xFFFFE000)).view(np.float32)

    def handle(like, data):
        return interpreter.TensorHandle(np.ascontiguousarray(data), like.dtype.scalar)

    def rounded_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.data.dtype != np.float32 or input_precision not in (precision.TF32, precision.TF32x3):
            return exact_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        if input_precision == precision.TF32:
            return exact_dot(self, handle(a, keep_tf32(a.data)), handle(b, keep_tf32(b.data)), d,
                             precision.IEEE, max_num_imprecise_acc)
        a_big, b_big = keep_tf32(a.data, nearest=True), keep_tf32(b.data, nearest=True)
        out = d
        for left, right in ((a.data - a_big, b_big), (a_big, b.data - b_big), (a_big, b_big)):
            out = rounded_dot(self, handle(a, left), handle(b, right), out, precision.TF32, max_num_imprecise_acc)
        return out

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", rounded_dot)


def _maps(B, C, H, W, dtype=torch.float32, seed=0, scale=1e-2):
    g = torch.Generator().manual_seed(seed)
    R = torch.randn(B, C, H, W, generator=g, dtype=torch.float64) * scale
    x = torch.rand(B, C, H, W, generator=g, dtype=torch.float64)
    return R.to(dtype).to(DEVICE), x.to(dtype).to(DEVICE)


def _layout(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":  # a window of a larger map: rows of the wrong pitch, non-dense strides
        B, C, H, W = t.shape
        big = torch.zeros(B, C + 1, H + 3, W + 4, dtype=t.dtype, device=t.device)
        big[:, 1:, 2:H + 2, 1:W + 1] = t
        return big[:, 1:, 2:H + 2, 1:W + 1]
    if layout == "transposed":
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    return t


# (B, C, H, W, window, temperature, slope, layout, x requires grad)
CASES = [
    (2, 3, 1, 1, 3, 0.1, 10.0, "contiguous", True),       # 1x1, smaller than the window
    (3, 1, 7, 5, 9, 0.1, 10.0, "contiguous", True),       # odd, non-square, smaller than the window
    (5, 3, 40, 48, 9, 0.1, 10.0, "contiguous", True),     # the largest: several pixel splits and column blocks
    (3, 3, 8, 6, 3, 0.1, 10.0, "channels_last", True),
    (2, 3, 9, 7, 1, 0.3, 4.0, "sliced", False),          # window 1, other T and s, x without grad
    (2, 3, 7, 9, 3, 0.1, 10.0, "transposed", True),      # pixels not evenly spaced: planes of its own
]


@pytest.mark.parametrize("case", CASES, ids=["x".join(map(str, c[:4])) + f"-k{c[4]}-{c[7]}" for c in CASES])
def test_matches_reference_float32(case):
    B, C, H, W, window, temperature, slope, layout, x_grad = case
    R, x = _maps(B, C, H, W)
    compare_head_with_reference("triton", _layout(R, layout), _layout(x, layout), window, temperature, slope,
                                x_grad=x_grad)


def test_matches_reference_float64():
    R, x = _maps(3, 2, 6, 5, torch.float64, seed=1)
    compare_head_with_reference("triton", R, x, 3, 0.1, 10.0)


RANDOM_CASES = random_cases(6, seed=7, max_side=12)


@pytest.mark.parametrize("index", range(len(RANDOM_CASES)), ids=lambda i: f"{i}-" + case_id(RANDOM_CASES[i]))
def test_random_cases(index):
    # seeded random shapes, windows, temperatures, slopes, layouts and ReLU-like maps beyond the
    # fixed matrix, in float64 and away from ill-conditioned inputs (head_inputs.random_cases)
    case = RANDOM_CASES[index]
    compare_head_with_reference("triton", *random_case_maps(case, seed=index, device=DEVICE), *case[4:7],
                                x_grad=index % 2 == 0, seed=index)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gradient_of_each_output_alone(dtype):
    compare_each_output_alone("triton", *_maps(3, 2, 9, 11, dtype), 3, 0.1, 10.0)


def test_bfloat16_inputs():
    # Computed in float32: hsic, bg and mask within float32 tolerance of the float64 reference
    # on the same (rounded) values; the gradients are written in bfloat16.
    R, x = _maps(2, 3, 6, 6, torch.bfloat16, seed=2)
    compare_head_with_reference("triton", R, x, 3, 0.1, 10.0)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_extra_memory_within_budget(layout):
    # the backward's planes (g, dz, prefix sums) live in channels of dR: dR and the mask only.
    # On a GPU the benchmark's shape at batch 32 (small ones are dominated by fixed buffers).
    R, x = _maps(32, 3, 224, 224) if HAS_GPU else _maps(4, 3, 32, 28)
    ratio = check_head_memory_budget("triton", _layout(R, layout), _layout(x, layout))
    print(f"triton {layout}: {ratio:.2f}x R")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("gpu", [(108, (8, 0)), (132, (9, 0))], ids=["A100", "H100"])
def test_allocations_at_the_target_shape_within_budget(gpu, layout):
    # The target's own shape (B = 128, 3x224x224, float32), too large for the interpreter:
    # the launches are recorded instead of run, so what is measured is everything the
    # launchers allocate, with the plan (pixel splits, partial Grams) of a GPU of this many
    # multiprocessors and this capability.
    R, x = (_layout(t, layout) for t in (torch.empty(128, 3, 224, 224, device=DEVICE) for _ in range(2)))
    with record_launches(execute=False, keep_args=False) as launched, planned_for(*gpu):  # args: R-sized planes
        ratio = check_head_memory_budget("triton", R, x)
    assert "_bwd_dr_kernel" in {call.kernel.fn.__name__ for call in launched}, "the backward did not reach its launches"
    # dR alone is the size of R: a measurement below that did not see the allocations
    assert ratio >= 1.0, f"measured {ratio:.2f}x R, less than dR itself"
    print(f"triton {layout} at B = 128, 3x224x224: {ratio:.2f}x R")


def test_loops_over_several_chunks():
    # Small blocks, so that every kernel's loops carry state across iterations: the select's
    # radix passes and collection, the row and column running sums, the Gram and backward pixel
    # loops (several pixel splits); and the select's digits as wide as the other Triton
    # versions' default (4 bits for 3.6/3.7's ballot histograms, 8 for 3.8's atomics)
    other_digits = 12 - tunable_values()["SELECT_DIGIT_BITS"]
    with tunables(SELECT_CHUNK=32, SELECT_DIGIT_BITS=other_digits, HBOX_BLOCK=(4, 16), VBOX_BLOCK=(4, 16)):
        R, x = _maps(3, 2, 11, 21, seed=3)
        compare_head_with_reference("triton", R, x, 9, 0.1, 10.0)


def test_several_image_blocks():
    # B > the image block: the Gram tiles over image-block pairs I <= J (a diagonal block in
    # halves, an off-diagonal one whole, the lower one mirrored), the backward loops over column
    # blocks of A (the paths of B > 128 and B > 32 at full size).
    with tunables(MAX_IMAGE_BLOCK=32, BWD_SINGLE_MAX=16, BWD_IMAGE_BLOCK=16):
        plan = Plan(70, 1, 4, 5, torch.float32, 2, (9, 0))
        assert plan.nbb == 3 and plan.gram_tiles == 6 and not plan.single and plan.bwd_nbb == 5 and not plan.bwd_single
        R, x = _maps(70, 1, 4, 5, seed=4)
        compare_head_with_reference("triton", R, x, 3, 0.1, 10.0)


def test_a100_launch_plan():
    # The plan of an sm_80 GPU (the interpreter otherwise plans as sm_90): the backward keeps A
    # whole, 3xTF32 split by each product rather than once beforehand; channels_last pixels
    # take 64-image Gram tiles, so B = 70 makes two, with a tile pair off the diagonal.
    with planned_for(multiprocessors=2, capability=(8, 0)):
        R, x = (_layout(t, "channels_last") for t in _maps(70, 2, 4, 5, seed=8))
        plan = make_plan(R, torch.float32, x)
        assert plan.bb == 64 and plan.nbb == 2 and not plan.bwd_presplit and plan.dot_prec == "tf32x3"
        compare_head_with_reference("triton", R, x, 3, 0.1, 10.0)


@pytest.mark.parametrize("grad_x", [False, True], ids=["x-no-grad", "x-grad"])
def test_first_backward_pass_in_two_launches(grad_x):
    # pass 1 with the whole batch, R's share of dM then x's in two launches, each with one mixing
    # matrix on chip: the tune variant BWD_SINGLE_MAX=128 at full size
    with tunables(BWD_SINGLE_MAX=64, BWD_PAIR_MAX=16):
        plan = Plan(33, 2, 5, 4, torch.float32, 2, (9, 0))
        assert plan.bwd_single and plan.bwd_bb == 64 and plan.bwd_shares == (1, 2)
        R, x = _maps(33, 2, 5, 4, seed=9)
        compare_head_with_reference("triton", R, x, 3, 0.1, 10.0, x_grad=grad_x)


def test_second_backward_pass_keeps_a_larger_batch_whole():
    # pass 1 over image row blocks, pass 2 (dR) with the whole batch per program: the tune
    # variant BWD_DR_SINGLE_MAX=128 at full size
    with tunables(BWD_SINGLE_MAX=16, BWD_IMAGE_BLOCK=16, BWD_DR_SINGLE_MAX=64):
        plan = Plan(33, 2, 5, 4, torch.float32, 2, (9, 0))
        assert plan.bwd_nbb == 3 and not plan.bwd_single and plan.dr_nbb == 1 and plan.dr_single and plan.dr_bb == 64
        R, x = _maps(33, 2, 5, 4, seed=7)
        compare_head_with_reference("triton", R, x, 3, 0.1, 10.0)


@pytest.mark.skipif(HAS_GPU, reason="checks the interpreter's emulated tensor-core rounding")
def test_plain_tf32_fails_the_tolerance():
    # the control of _tensor_core_rounding: every dot in plain tf32 puts the head outside the
    # tolerance, so the emulated rounding is strong enough to tell 3xTF32 from tf32
    R, x = _maps(5, 3, 24, 20, seed=5)
    with tunables(DOT_PRECISION="tf32"), pytest.raises(AssertionError, match="relative error"):
        compare_head_with_reference("triton", R, x, 9, 0.1, 10.0)


def test_tunables_restore_and_refuse_unknown_names():
    before = tunable_values()
    with tunables(SELECT_CHUNK=64, VBOX_BLOCK=(8, 8)) as inside:
        assert inside["SELECT_CHUNK"] == 64 and tunable_values()["VBOX_BLOCK"] == (8, 8)
        assert Plan(3, 1, 4, 5, torch.float32, 2, (9, 0)).select_chunk == 64
    assert tunable_values() == before == dict(DEFAULT_TUNABLES)
    with pytest.raises(ValueError, match="SELECT_CHUNKS"):
        with tunables(SELECT_CHUNK=64, SELECT_CHUNKS=64):
            pass
    assert tunable_values() == before


def test_planned_for_overrides_the_device_description():
    own = planned_device(DEVICE)
    with planned_for(multiprocessors=108, capability=(8, 0)):
        assert planned_device(DEVICE) == (108, (8, 0))
        assert not make_plan(torch.empty(3, 1, 4, 5), torch.float32).bwd_presplit  # sm_80's plan
    assert planned_device(DEVICE) == own


def test_recorded_launches_run_only_when_asked():
    # every launch in order; with execute=False none runs (stats, zeroed by the launcher, stays
    # zero), with execute=True the same launches run
    R, _ = _maps(2, 1, 5, 4)
    with record_launches() as dry:
        _, stats, _, _ = tb.mask_forward(R, 3, 0.1, 10.0)
    names = [call.kernel.fn.__name__ for call in dry]
    assert names == ["_channel_mean_kernel", "_select_kernel", "_hbox_kernel", "_vbox_kernel", "_select_kernel",
                     "_mask_kernel"]
    assert not stats.any()
    with record_launches(execute=True) as run:
        mask, stats, _, _ = tb.mask_forward(R, 3, 0.1, 10.0)
    assert [call.kernel.fn.__name__ for call in run] == names and run[-1].args[3] is mask
    assert stats[:, :4].all()


def test_spatial_mask_and_its_gradient():
    import sib_fast
    from sib_fast.backends import reference

    R, _ = _maps(3, 2, 12, 10, seed=5)
    R = R.requires_grad_()
    R_ref = R.detach().double().requires_grad_()
    mask = sib_fast.spatial_mask(R, window_size=3, backend="triton")
    mask_ref = reference.spatial_mask(R_ref, 3, 0.1, 10.0)
    assert mask.dtype == torch.float32
    assert_matches_reference(mask, mask_ref, RELATIVE_TOLERANCE[torch.float32], "triton mask")
    w = torch.randn(mask.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(DEVICE)
    (dR,) = torch.autograd.grad((mask * w.float()).sum(), R)
    (dR_ref,) = torch.autograd.grad((mask_ref * w).sum(), R_ref)
    assert_matches_reference(dR, dR_ref, GRADIENT_TOLERANCE[torch.float32], "triton mask dR")


def test_ties_follow_a_stable_sort():
    # Many exactly equal values (zeros and repeated levels): the selected ranks, and so the
    # gradient, must go to the elements a stable sort puts there (ties by flat index).
    R, x = _maps(3, 2, 8, 8, seed=6)
    levels = torch.tensor([0.0, 1e-3, 2e-3], dtype=R.dtype, device=R.device)
    R = levels[torch.randint(0, 3, R.shape, generator=torch.Generator().manual_seed(1)).to(R.device)]
    R[:, 0] = -R[:, 0]
    # window 1: d = h, so the ties of the mask's quantile are exact in both computations
    compare_head_with_reference("triton", R, x, 1, 0.1, 10.0)


def _select(plane, quantiles, chunk, digit):
    """Runs the rank select on (B, N) planes; returns stats, sel_idx and the candidate lists."""
    B, N = plane.shape
    ct = plane.dtype
    wide = ct == torch.float64
    stats = torch.zeros(B, STATS, dtype=ct, device=plane.device)
    sel_idx = torch.empty(B, N_WINDOWS, SLOTS, dtype=torch.int32, device=plane.device)
    sel_w = torch.empty(B, N_WINDOWS, SLOTS, dtype=ct, device=plane.device)
    scratch = torch.empty_like(sel_w)
    lists = torch.full((B, N), -7, dtype=torch.int32, device=plane.device)  # -7: never written
    win = rank_windows(N)
    first = 0 if quantiles == "a" else 3
    chosen = win[0:3] if quantiles == "a" else (win[3], (0, 1, 0.0), (0, 1, 0.0))
    _select_kernel[(B,)](plane, lists, N, rank_table(N, 0.1, 10.0, 3, ct, plane.device), stats, sel_idx, sel_w,
                         scratch, N, *[v for r0, length, _ in chosen for v in (r0, length)],
                         WIN0=first, NQ=3 if quantiles == "a" else 1, CT=tl.float64 if wide else tl.float32,
                         KT=tl.int64 if wide else tl.int32, CHUNK=chunk, DIGIT=digit, NSLOT=SLOTS, N_WIN=N_WINDOWS,
                         N_STATS=STATS, num_warps=4)
    return stats, sel_idx, lists


def _plane(kind, B, N, dtype):
    g = torch.Generator().manual_seed(N)
    if kind == "normal":  # a few binades: the list starts after the second digit
        v = torch.randn(B, N, generator=g, dtype=torch.float64)
    elif kind == "wide":  # many binades: the list starts after the first digit
        v = torch.exp(torch.empty(B, N, dtype=torch.float64).uniform_(-40, 40, generator=g))
    elif kind == "equal":
        v = torch.full((B, N), -0.25, dtype=torch.float64)
    else:  # three levels, a third of the pixels each: never fewer than half in range, no list
        v = torch.tensor([0.0, -1e-3, 2e-3], dtype=torch.float64)[torch.randint(0, 3, (B, N), generator=g)]
    return v.to(dtype).to(DEVICE)


@pytest.mark.parametrize("kind, N, dtype, chunk, digit, lists_expected", [
    # the benchmark's planes, defaults
    ("normal", 224 * 224, torch.float32, 2048, DEFAULT_TUNABLES["SELECT_DIGIT_BITS"], True),
    ("normal", 899, torch.float32, 128, 8, True),
    ("normal", 899, torch.float32, 128, 4, True),
    ("normal", 899, torch.float32, 128, 3, True),  # digits that do not divide the key
    ("wide", 640, torch.float32, 32, 8, True),
    ("wide", 300, torch.float64, 64, 8, True),
    ("wide", 300, torch.float64, 64, 4, True),
    ("levels", 500, torch.float32, 64, 8, False),
    ("levels", 500, torch.float32, 64, 4, False),
    ("equal", 300, torch.float32, 64, 8, False),  # one value: no bit varies, no pass
    ("levels", 1, torch.float32, 32, 8, False),
])
@pytest.mark.parametrize("quantiles", ["a", "d"])
def test_select_matches_a_stable_sort(kind, N, dtype, chunk, digit, lists_expected, quantiles):
    # The select alone against torch.sort(stable=True) of |plane|: each window's flat indices in
    # rank order and its soft quantile; and whether the pixels in range were listed (the passes
    # over the list) or not (every pass over the whole plane).
    plane = _plane(kind, 3, N, dtype)
    stats, sel_idx, lists = _select(plane, quantiles, chunk, digit)
    order = torch.sort(plane.abs().cpu(), dim=1, stable=True).indices
    table = rank_table_values(N, 0.1, 10.0, 3, dtype)
    windows = range(3) if quantiles == "a" else [3]
    for q in windows:
        r0, length, _ = rank_windows(N)[q]
        got = sel_idx[:, q].cpu()
        assert torch.equal(got[:, :length], order[:, r0:r0 + length].to(torch.int32)), f"window {q}"
        assert (got[:, length:] == -1).all(), f"window {q}: slots past the window"
        weights = torch.tensor(table[q * SLOTS:q * SLOTS + length], dtype=torch.float64)
        expected = (plane.abs().cpu().double().gather(1, order[:, r0:r0 + length]) * weights).sum(1)
        torch.testing.assert_close(stats[:, q].cpu().double(), expected, rtol=1e-6, atol=0, msg=f"window {q}")
    listed = (lists != -7).any(dim=1).cpu()
    assert listed.all() if lists_expected else not listed.any(), f"candidate lists written: {listed.tolist()}"


def test_piecewise_constant_maps_tie_windows_exactly():
    # small, for the interpreter: 12x10 images of 2x2 blocks, window 3
    compare_piecewise_constant_with_reference("triton", (2, 12, 10, 3), seeds=(2,), device=DEVICE)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on NaN
def test_nan_input_gives_nan_not_a_crash():
    import sib_fast

    R, x = _maps(2, 1, 5, 4, seed=7)
    R[0, 0, 2, 1] = float("nan")
    out = sib_fast.sib_terms(R, x, window_size=3, backend="triton")
    assert torch.isnan(out.hsic)
    x2 = x.clone()
    x2[1, 0, 0, 0] = float("inf")
    R2, _ = _maps(2, 1, 5, 4, seed=7)
    assert torch.isnan(sib_fast.sib_terms(R2, x2, window_size=3, backend="triton").hsic)


def test_opcheck():
    # the custom ops' schemas, fake kernels and autograd registration, as torch.compile sees them
    R, x = _maps(2, 3, 7, 6, torch.float64, seed=11)
    torch.library.opcheck(tb.head_forward, (R.requires_grad_(), x.requires_grad_(), 3, 0.1, 10.0))
    torch.library.opcheck(tb.mask_forward, (R.detach().contiguous(memory_format=torch.channels_last), 3, 0.2, 8.0))


def test_runs_inside_torch_compile_fullgraph():
    import sib_fast

    R, x = _maps(2, 1, 5, 4, seed=8)
    R = R.requires_grad_()

    def head(R, x):
        hsic, bg, mask = sib_fast.sib_terms(R, x, window_size=3, backend="triton")
        return 0.01 * torch.exp(-hsic) + 1e3 * torch.exp(bg) + mask.mean()

    compiled = torch.compile(head, fullgraph=True, backend="inductor" if HAS_GPU else "aot_eager")
    value = compiled(R, x)
    (dR,) = torch.autograd.grad(value, R)
    R_eager = R.detach().requires_grad_()
    value_eager = head(R_eager, x)
    (dR_eager,) = torch.autograd.grad(value_eager, R_eager)
    assert torch.allclose(value, value_eager, rtol=1e-6, atol=0)
    assert torch.allclose(dR, dR_eager, rtol=1e-5, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("B,dtype", [(128, torch.float32), (32, torch.bfloat16), (160, torch.float32)],
                         ids=["128-float32", "32-bfloat16", "160-float32"])
def test_gpu_realistic_shapes(B, dtype):
    H = W = 224 if B != 160 else 48  # 160 > 128 images: two Gram image blocks
    R, x = _maps(B, 3, H, W, dtype, seed=9, scale=1e-3)
    compare_head_with_reference("triton", R, x, 31, 0.1, 10.0)


@pytest.mark.gpu
def test_gpu_repeated_runs_are_bitwise_equal():
    import sib_fast

    R, x = _maps(32, 3, 224, 224, seed=10, scale=1e-3)
    results = []
    for _ in range(2):
        Rg, xg = R.clone().requires_grad_(), x.clone().requires_grad_()
        hsic, bg, mask = sib_fast.sib_terms(Rg, xg, backend="triton")
        (hsic + 1e3 * bg + mask.mean()).backward()
        results.append((hsic, bg, mask, Rg.grad, xg.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@property_settings(examples_ci=8, examples_wide=100)
@given(case=cases(max_side=6, dtypes=(torch.float64, torch.float32, torch.bfloat16)))
def test_odd_inputs(case):
    """tests/odd_inputs.py: the docs/loss.md section 8 rule, and the float64 reference where well-conditioned."""
    check_backend("triton", case, DEVICE)


@pytest.mark.parametrize("name", REGRESSION_CASES)
def test_bad_inputs_of_the_review(name):
    check_backend("triton", REGRESSION_CASES[name], DEVICE)


def test_refuses_a_second_derivative():
    check_no_second_derivative("triton", DEVICE)
