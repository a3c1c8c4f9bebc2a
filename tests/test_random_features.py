"""The random-feature HSIC (docs/loss.md section 4b, docs/random_features.md): the generator of W,
the reference's HSIC_F, the cpu backend's fused projection against the float64 reference with W
materialised, the arguments' checks and SIBLoss's seeds."""
from __future__ import annotations

import math

import pytest
import torch

import sib_fast
from sib_fast.backends import dispatch, reference
from sib_fast.backends.random_features import MASK32, gaussian_matrix, keys, mix, projected_hsic
from comparison import GRADIENT_TOLERANCE, HSIC_FLOOR, RELATIVE_TOLERANCE, assert_matches_reference
from head_inputs import random_maps, strided_maps

HAS_CPU = "cpu" in sib_fast.available_backends("cpu")
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="sib_fast._C was not built with CPU kernels")


# ---------------------------------------------------------------- the generator


def scalar_entry(seed: int, d: int, f: int) -> float:
    """W[d, f] from the definition in random_features' docstring, one entry in Python ints and math."""
    def lowbias32(z):
        z ^= z >> 16
        z = (z * 0x7FEB352D) & MASK32
        z ^= z >> 15
        z = (z * 0x846CA68B) & MASK32
        return z ^ (z >> 16)

    lo, hi = seed & MASK32, seed >> 32
    row_key = lowbias32(lo ^ lowbias32(hi ^ 0x243F6A88))
    col_key = lowbias32(hi ^ lowbias32(lo ^ 0x85A308D3))
    pair = f - f % 2
    h1 = lowbias32((lowbias32(d ^ row_key) + lowbias32(pair ^ col_key)) & MASK32)
    h2 = lowbias32((lowbias32(d ^ row_key) + lowbias32((pair + 1) ^ col_key)) & MASK32)
    u1, u2 = ((h1 >> 8) + 1) / 2**24, (h2 >> 8) / 2**24
    trig = math.cos if f % 2 == 0 else math.sin
    return math.sqrt(-2.0 * math.log(u1)) * trig(2.0 * math.pi * u2)


def test_hash_and_keys_are_lowbias32():
    # known values: a change of the generator's definition must fail here
    assert [mix(0), mix(1), mix(0xDEADBEEF)] == [0, 1753845952, 3861431939]
    assert keys(0) == (3852066208, 3650021563)
    assert keys(2**63 - 1) == (1352560520, 3901263453)


def test_pinned_entries():
    W = gaussian_matrix(0, 20000, 9)
    pinned = {(0, 0): -2.706979092718104, (0, 1): 0.5380205902002935, (1, 0): 0.07079959149285261,
              (5, 2): -0.35446832134708267, (12345, 7): -0.47219719188148407, (19999, 8): -0.6012805653553073}
    for (d, f), value in pinned.items():
        assert W[d, f].item() == pytest.approx(value, rel=1e-14), (d, f)
    assert gaussian_matrix(2**63 - 1, 3, 4)[2, 3].item() == pytest.approx(-0.5608101168971069, rel=1e-14)


@pytest.mark.parametrize("seed", [0, 1, 2**32 + 1, 2**63 - 1])
def test_entries_follow_the_documented_definition(seed):
    W = gaussian_matrix(seed, 5000, 13)
    for d, f in [(0, 0), (0, 1), (7, 12), (4095, 3), (4096, 4), (4999, 11), (1234, 6)]:
        assert W[d, f].item() == pytest.approx(scalar_entry(seed, d, f), rel=1e-12, abs=1e-13), (d, f)


def test_entries_depend_only_on_seed_row_and_column():
    # W[:, :7] of every F is the same: F changes the columns there are, not their values; chunks too
    wide = gaussian_matrix(3, 9000, 64)
    assert torch.equal(gaussian_matrix(3, 9000, 7), wide[:, :7])
    assert torch.equal(gaussian_matrix(3, 10, 64), wide[:10])
    assert torch.equal(gaussian_matrix(3, 100, 8, dtype=torch.float32), wide[:100, :8].float())


def test_statistics_of_the_entries():
    # 2**21 entries; each bound is at least 7 standard deviations of its statistic, so a sound
    # generator cannot fail it (and the seeds are fixed anyway)
    W = gaussian_matrix(11, 8192, 256)
    n = W.numel()
    w = W.flatten()
    sd = 1.0 / math.sqrt(n)
    assert abs(w.mean().item()) < 7 * sd
    assert abs(w.var().item() - 1.0) < 7 * math.sqrt(2.0) * sd            # var of w^2 is 2
    assert abs((w**4).mean().item() - 3.0) < 7 * math.sqrt(96.0) * sd      # E w^8 - 9 = 96
    assert abs((w**3).mean().item()) < 7 * math.sqrt(15.0) * sd            # E w^6 = 15
    assert w.abs().max().item() <= math.sqrt(-2.0 * math.log(2.0**-24)) + 1e-12
    # the normal CDF at a few points: the fraction below t has sd sqrt(p (1 - p) / n) < 0.5 sd
    for t in (-2.0, -1.0, 0.0, 0.5, 1.5):
        p = 0.5 * (1.0 + math.erf(t / math.sqrt(2.0)))
        assert abs((w < t).double().mean().item() - p) < 4 * sd


def test_independence_of_neighbouring_entries():
    W = gaussian_matrix(5, 8192, 256)

    def corr(a, b):
        a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
        return ((a * b).sum() / (a.norm() * b.norm())).item()

    sd = 1.0 / math.sqrt(W[:, 1:].numel())
    assert abs(corr(W[:, 0::2], W[:, 1::2])) < 7 * sd          # a Box-Muller pair's cosine and sine
    assert abs(corr(W[:, 0::2] ** 2, W[:, 1::2] ** 2)) < 7 * 2 * sd   # and their magnitudes (var <= 4)
    assert abs(corr(W[:, :-1], W[:, 1:])) < 7 * sd             # neighbouring columns
    assert abs(corr(W[:-1], W[1:])) < 7 * sd                   # neighbouring rows
    assert abs(corr(W[:-1, :-1], W[1:, 1:])) < 7 * sd          # diagonal neighbours
    # other seeds: one apart, and apart only in the high 32 bits
    for other in (6, 5 + 2**32):
        assert abs(corr(W, gaussian_matrix(other, 8192, 256))) < 7 * sd
    # the sample Gram of the columns is near n I: the columns are uncorrelated as a whole
    gram = W.T @ W / W.shape[0]
    off = gram - torch.diag(torch.diag(gram))
    assert off.abs().max().item() < 7 / math.sqrt(W.shape[0])


# ---------------------------------------------------------------- the reference's HSIC_F


def test_reference_hsic_f_is_the_hsic_of_the_projected_unit_rows():
    R, x = random_maps(5, 2, 6, 7, torch.float64)
    mask = reference.spatial_mask(R, 3)
    W = gaussian_matrix(9, 2 * 6 * 7, 33)
    m = mask.unsqueeze(1)
    U = (R * m).flatten(1)
    V = (x * m).flatten(1)
    U, V = U / U.norm(dim=1, keepdim=True), V / V.norm(dim=1, keepdim=True)
    U, V = U @ W, V @ W
    U, V = U / U.norm(dim=1, keepdim=True), V / V.norm(dim=1, keepdim=True)
    K, L = U @ U.T, V @ V.T
    n = 5
    H = torch.eye(n, dtype=torch.float64) - 1.0 / n
    expected = torch.trace(K @ H @ L @ H) / (n - 1) ** 2  # tr(K P L P) = sum (PKP)(PLP)
    got = reference.sib_terms(R, x, 3, hsic_features=33, projection_seed=9)[0]
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)


def test_hsic_f_approaches_hsic_as_f_grows():
    # Johnson-Lindenstrauss: U W / ||U W|| keeps the inner products up to O(1/sqrt(F))
    R, x = random_maps(6, 3, 12, 12, torch.float64, seed=3)
    R = R + 2e-3 * x  # a dependence for the HSIC to measure
    exact = reference.sib_terms(R, x, 5)[0].item()
    errors = []
    for F in (16, 4096):
        values = [reference.sib_terms(R, x, 5, hsic_features=F, projection_seed=s)[0].item() for s in range(8)]
        errors.append(max(abs(v - exact) for v in values))
    assert errors[1] < errors[0] / 4
    assert errors[1] < 0.05 * abs(exact) + 0.01


def test_projected_hsic_matches_the_reference_formula():
    # the fused backends' B x F post-processing against the reference's, on the materialised W
    R, x = random_maps(4, 3, 5, 6, torch.float64, seed=2)
    mask = reference.spatial_mask(R, 3)
    proj, sq = reference.masked_projection(R, x, mask, 10, 77)
    W = gaussian_matrix(77, 90, 10)
    expected = reference.random_feature_hsic(R, x, mask, W)
    assert projected_hsic(proj, sq).item() == pytest.approx(expected.item(), rel=1e-12)


def test_reference_gradcheck():
    g = torch.Generator().manual_seed(0)
    R = (torch.randn(3, 2, 4, 5, generator=g, dtype=torch.float64) * 1e-2).requires_grad_()
    x = torch.rand(3, 2, 4, 5, generator=g, dtype=torch.float64).requires_grad_()

    def hsic_f(R, x):
        hsic, bg, _ = reference.sib_terms(R, x, 3, hsic_features=7, projection_seed=4)
        return hsic, bg

    assert torch.autograd.gradcheck(hsic_f, (R, x), eps=1e-7, atol=1e-6)


# ---------------------------------------------------------------- the fused cpu projection


def _projection_inputs(B, C, H, W, dtype, layout="contiguous", seed=0):
    if layout == "contiguous":
        R, x = random_maps(B, C, H, W, dtype, seed=seed)
    else:
        R, x = strided_maps(layout, dtype, H, W)
    mask = reference.spatial_mask(R.double(), 3).to(reference.compute_dtype(R, x))
    return R, x, mask


def _ref_projection(R, x, mask, F, seed):
    return reference.masked_projection(R.double(), x.double(), mask.double(), F, seed)


PROJECTION_SHAPES = [(2, 1, 1, 1), (3, 3, 1, 1), (2, 1, 5, 3), (3, 3, 7, 9), (4, 3, 17, 23), (2, 1, 64, 33)]


@needs_cpu
@pytest.mark.parametrize("F", [1, 7, 64, 512])
@pytest.mark.parametrize("shape", PROJECTION_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_projection_op_matches_reference(shape, F, dtype):
    R, x, mask = _projection_inputs(*shape, dtype, seed=F)
    seed = 1000003 * F + 17
    R_ref, x_ref, mask_ref = (t.detach().double().requires_grad_() for t in (R, x, mask))
    Rg, xg, mg = (t.detach().requires_grad_() for t in (R, x, mask))
    proj, sq = torch.ops.sib_fast.masked_projection_forward(Rg, xg, mg, F, seed)
    proj_ref, sq_ref = reference.masked_projection(R_ref, x_ref, mask_ref, F, seed)
    tol = 1e-12 if dtype == torch.float64 else RELATIVE_TOLERANCE[dtype]
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    assert proj.dtype == sq.dtype == compute and proj.shape == (2, shape[0], F)
    assert_matches_reference(proj, proj_ref, tol, "proj")
    assert_matches_reference(sq, sq_ref, tol, "sq")
    g = torch.Generator().manual_seed(F)
    grad_proj = torch.randn(proj_ref.shape, generator=g, dtype=torch.float64)
    grad_sq = torch.randn(sq_ref.shape, generator=g, dtype=torch.float64) * 100
    grads = torch.autograd.grad((proj * grad_proj.to(proj)).sum() + (sq * grad_sq.to(sq)).sum(), (Rg, xg, mg))
    grads_ref = torch.autograd.grad((proj_ref * grad_proj).sum() + (sq_ref * grad_sq).sum(),
                                    (R_ref, x_ref, mask_ref))
    for name, a, e, t in zip(("dR", "dx", "dmask"), grads, grads_ref, (R, x, mask)):
        assert a.dtype == t.dtype and a.shape == t.shape, name
        assert_matches_reference(a, e, 1e-12 if dtype == torch.float64 else GRADIENT_TOLERANCE[dtype], name)


def _kernel_matrix_forward(C, H, W, F, seed, dtype):
    """W as the cpu forward computes it: image d is the one-hot vector e_d, so proj[0] = W (exact)."""
    D = C * H * W
    eye = torch.eye(D, dtype=dtype).reshape(D, C, H, W)
    return torch.ops.sib_fast.masked_projection_forward(eye, eye, torch.ones(D, H, W, dtype=dtype), F, seed)[0][0]


def _kernel_matrix_backward(C, H, W, F, seed, dtype):
    """W as the cpu backward computes it: image f's grad_proj is e_f, so its grad_R is column f (exact)."""
    R = torch.zeros(F, C, H, W, dtype=dtype)
    grad_proj = torch.zeros(2, F, F, dtype=dtype)
    grad_proj[0] = torch.eye(F, dtype=dtype)
    grad_R = torch.ops.sib_fast.masked_projection_backward(grad_proj, None, R, R, torch.ones(F, H, W, dtype=dtype),
                                                           F, seed, False)[0]
    return grad_R.reshape(F, -1).T


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernels_compute_the_generators_entries(dtype):
    # the forward's tiles (lanes over features) and the backward's (lanes over d) hold the same
    # bits, and both are the generator's W: float32 by polynomials (within 3e-7 of max(|w|, 1)),
    # float64 by libm (within 1e-15)
    tol = 3e-7 if dtype == torch.float32 else 1e-15
    for (C, H, W, F), seed in (((3, 7, 5, 64), 12345), ((1, 9, 11, 7), 2**63 - 1)):
        forward = _kernel_matrix_forward(C, H, W, F, seed, dtype)
        assert torch.equal(forward, _kernel_matrix_backward(C, H, W, F, seed, dtype))
        expected = gaussian_matrix(seed, C * H * W, F)
        assert ((forward.double() - expected).abs() / expected.abs().clamp_min(1.0)).max() < tol
    # 400 thousand entries of a larger W through the backward
    backward = _kernel_matrix_backward(3, 32, 32, 131, 99, dtype).double()
    expected = gaussian_matrix(99, 3 * 32 * 32, 131)
    assert ((backward - expected).abs() / expected.abs().clamp_min(1.0)).max() < tol


@needs_cpu
@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed", "offset"])
def test_projection_of_strided_maps_equals_the_contiguous_one_bitwise(layout):
    # the kernels walk the logical index d whatever the strides: the same sums in the same order
    R, x, mask = _projection_inputs(4, 3, 20, 18, torch.float32, layout)
    Rc, xc = R.contiguous().requires_grad_(), x.contiguous().requires_grad_()
    R, x = R.detach().requires_grad_(), x.detach().requires_grad_()
    outs = [torch.ops.sib_fast.masked_projection_forward(a, b, mask, 64, 5) for a, b in ((R, x), (Rc, xc))]
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    grads = [torch.autograd.grad(o[0].sum() + o[1].sum(), inputs) for o, inputs in zip(outs, ((R, x), (Rc, xc)))]
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@needs_cpu
def test_projection_gradcheck_and_opcheck():
    R, x, mask = _projection_inputs(3, 2, 4, 5, torch.float64)
    inputs = tuple(t.detach().requires_grad_() for t in (R, x, mask))
    assert torch.autograd.gradcheck(lambda *a: torch.ops.sib_fast.masked_projection_forward(*a, 9, 3), inputs)
    torch.library.opcheck(torch.ops.sib_fast.masked_projection_forward.default, (*inputs, 9, 3))
    torch.library.opcheck(torch.ops.sib_fast.masked_projection_forward.default,
                          (*(t.detach() for t in inputs), 4, 2**63 - 1))


@needs_cpu
def test_projection_is_bitwise_repeatable_across_thread_counts():
    R, x, mask = _projection_inputs(4, 3, 40, 36, torch.float32)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            Rg, xg = R.clone().requires_grad_(), x.clone().requires_grad_()
            proj, sq = torch.ops.sib_fast.masked_projection_forward(Rg, xg, mask, 65, 8)
            grads = torch.autograd.grad((proj * proj).sum() + sq.sum(), (Rg, xg))
            results.append((proj, sq, *grads))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@needs_cpu
def test_fused_path_never_stores_the_matrix():
    # forward + backward at F = 512 on 4 x 3x64x64: W would be 25 MB
    from sib_fast.bench.measure import peak_extra_memory

    R, x = random_maps(4, 3, 64, 64, torch.float32)
    R.requires_grad_()

    def run(**kwargs):
        terms = sib_fast.sib_terms(R, x, window_size=9, backend="cpu", **kwargs)
        return torch.autograd.grad((terms.hsic, terms.bg), (R,))[0]

    run(hsic_features=512, projection_seed=1)  # caches (rank weight tables) are not the step's memory
    head = peak_extra_memory(run, R.device)["bytes"]
    fused = peak_extra_memory(lambda: run(hsic_features=512, projection_seed=2), R.device)["bytes"]
    assert head is not None and fused is not None, "no memory measurement on this machine"
    plane_bytes = R[:, 0].numel() * 4
    tiles = 2**20 + 16 * 8 * 512 * 4  # W's tiles, vectors, and the forward's chunk partials (16 x 2B x F)
    # the head's backward adds into the projection's dR: over the head alone, grad_mask and the
    # plane of R's channel mean (the head alone keeps it in a channel of its dR), no R-sized tensor
    assert fused - head <= 2 * plane_bytes + tiles, (head, fused)
    assert fused < 64 * 3 * 64 * 512 * 4 / 4  # a quarter of W's bytes


@needs_cpu
def test_torch_compile_fullgraph_matches_eager():
    R, x = random_maps(3, 3, 12, 10, torch.float32, seed=7)

    def loss(R, x):
        hsic, bg, mask = sib_fast.sib_terms(R, x, window_size=5, backend="cpu", hsic_features=33,
                                            projection_seed=5)
        return 1000 * torch.exp(bg) + 0.01 * torch.exp(-hsic) + mask.mean()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    Re, Rc = R.clone().requires_grad_(), R.clone().requires_grad_()
    eager, comp = loss(Re, x), compiled(Rc, x)
    (ge,) = torch.autograd.grad(eager, Re)
    (gc,) = torch.autograd.grad(comp, Rc)
    assert torch.equal(eager, comp) and torch.equal(ge, gc)


@needs_cpu
def test_fused_projection_refuses_a_second_derivative():
    R, x, mask = _projection_inputs(3, 2, 4, 5, torch.float64)
    R.requires_grad_()
    proj, _ = torch.ops.sib_fast.masked_projection_forward(R, x, mask, 5, 1)
    (dR,) = torch.autograd.grad((proj**2).sum(), R, create_graph=True)
    with pytest.raises(RuntimeError, match="first derivatives"):
        torch.autograd.grad(dR.sum(), R)


def _head_gradient(R, x, window, grad_hsic, grad_bg, grad_mask, x_grad):
    """dR (and dx) of grad_hsic hsic + grad_bg bg + <grad_mask, mask> in the float64 reference."""
    R_ref = R.detach().double().requires_grad_()
    x_ref = x.detach().double().requires_grad_(x_grad)
    hsic, bg, mask = reference.sib_terms(R_ref, x_ref, window)
    total = grad_hsic * hsic + grad_bg * bg + (grad_mask.double() * mask).sum()
    return torch.autograd.grad(total, (R_ref, x_ref) if x_grad else (R_ref,))


@needs_cpu
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("x_grad", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_head_backward_add_adds_the_heads_gradient(dtype, x_grad, layout):
    # sib_head_backward_add_ (the fused HSIC_F's backward): grad_R and grad_x, holding a gradient
    # already, gain the head's; checked against prior + the float64 reference's VJP
    R, x = random_maps(3, 3, 11, 9, dtype, seed=4)
    if layout == "channels_last":
        R, x = (t.contiguous(memory_format=torch.channels_last) for t in (R, x))
    window, ct = 5, reference.compute_dtype(R, x)
    _, _, mask, gram, stats, ranks = torch.ops.sib_fast.sib_head_forward(R, x, window, 0.1, 10.0)
    g = torch.Generator().manual_seed(9)
    grad_hsic, grad_bg = 0.7, 3e5  # bg is ~1e-6: weighted up so that its share of dR counts
    grad_mask = torch.randn(mask.shape, generator=g, dtype=torch.float64) * 1e-3
    expected = _head_gradient(R, x, window, grad_hsic, grad_bg, grad_mask, x_grad)
    priors = [torch.randn(e.shape, generator=g, dtype=torch.float64) * e.abs().max() for e in expected]
    grads = [torch.empty_like(t).copy_(p) for t, p in zip((R, x), priors)]
    torch.ops.sib_fast.sib_head_backward_add_(grads[0], grads[1] if x_grad else None, grad_mask.to(ct).contiguous(),
                                              torch.tensor(grad_hsic, dtype=ct), torch.tensor(grad_bg, dtype=ct),
                                              R, x, mask, gram, stats, ranks, window, 0.1, 10.0)
    tol = 1e-9 if dtype == torch.float64 else GRADIENT_TOLERANCE[dtype]
    for name, got, prior, e in zip(("dR", "dx"), grads, priors, expected):
        assert got.dtype == dtype and got.stride() == (R if name == "dR" else x).stride(), name
        assert_matches_reference(got, prior.to(dtype).double() + e, tol, f"added {name}", floor=1e-30)


@needs_cpu
def test_head_backward_add_checks_its_buffers_and_passes_opcheck():
    R, x = random_maps(2, 3, 5, 4, torch.float64, seed=2)
    _, _, mask, gram, stats, ranks = torch.ops.sib_fast.sib_head_forward(R, x, 3, 0.1, 10.0)
    one = torch.ones((), dtype=torch.float64)
    saved = (R, x, mask, gram, stats, ranks, 3, 0.1, 10.0)
    op = torch.ops.sib_fast.sib_head_backward_add_
    torch.library.opcheck(op, (torch.zeros_like(R), torch.zeros_like(x), torch.rand_like(mask), one, one, *saved))
    torch.library.opcheck(op, (torch.zeros_like(R), None, torch.rand_like(mask), one, one, *saved))
    with pytest.raises(RuntimeError, match="grad_R must be"):
        op(torch.zeros_like(R).float(), None, torch.zeros_like(mask), one, one, *saved)
    with pytest.raises(RuntimeError, match="grad_x must be"):
        op(torch.zeros_like(R), x[:1].clone(), torch.zeros_like(mask), one, one, *saved)
    with pytest.raises(RuntimeError, match="grad_mask must be"):
        op(torch.zeros_like(R), None, torch.zeros_like(mask).transpose(1, 2), one, one, *saved)


@needs_cpu
def test_fused_hsic_f_refuses_a_second_derivative():
    R, x = random_maps(3, 3, 6, 5, torch.float64, seed=3)
    R.requires_grad_()
    terms = sib_fast.sib_terms(R, x, window_size=3, backend="cpu", hsic_features=8, projection_seed=1)
    (dR,) = torch.autograd.grad(terms.hsic + terms.bg, R, create_graph=True)
    with pytest.raises(RuntimeError, match="first derivatives"):
        torch.autograd.grad(dR.sum(), R)


@needs_cpu
def test_op_checks_its_inputs():
    R, x, mask = _projection_inputs(3, 2, 4, 5, torch.float32)
    op = torch.ops.sib_fast.masked_projection_forward
    with pytest.raises(RuntimeError, match="features"):
        op(R, x, mask, 0, 1)
    with pytest.raises(RuntimeError, match="seed"):
        op(R, x, mask, 4, -1)
    with pytest.raises(RuntimeError, match="compute dtype"):
        op(R, x, mask.double(), 4, 1)
    with pytest.raises(RuntimeError, match="same dtype"):
        op(R, x.double(), mask, 4, 1)


# ---------------------------------------------------------------- sib_terms(hsic_features=F)


def compare_hsic_f_with_reference(backend, R, x, window, F, seed, x_grad=True):
    """hsic, bg, mask, dR (and dx) of ``backend`` with hsic_features=F against the float64 reference,
    under random upstream gradients scaled so that every term's share of dR counts."""
    dtype = R.dtype
    R_ref = R.detach().double().requires_grad_()
    x_ref = x.detach().double().requires_grad_(x_grad)
    R, x = R.detach().requires_grad_(), x.detach().requires_grad_(x_grad)
    out = sib_fast.sib_terms(R, x, window_size=window, backend=backend, hsic_features=F, projection_seed=seed)
    ref = reference.sib_terms(R_ref, x_ref, window, hsic_features=F, projection_seed=seed)
    tol = RELATIVE_TOLERANCE[dtype] if dtype != torch.float64 else 1e-9
    r = (R_ref * (1 - ref[2]).unsqueeze(1)).detach()
    floors = {"bg": (r * r).mean().item(), "hsic": HSIC_FLOOR}
    for name, a, e in zip(("hsic", "bg", "mask"), out, ref):
        assert_matches_reference(a, e, tol, f"{backend} {name}", floors.get(name, 0.0))
    g = torch.Generator().manual_seed(F)
    weights = [torch.randn(shape, generator=g, dtype=torch.float64) for shape in ((), (), ref[2].shape)]
    shares = [torch.autograd.grad((t * w).sum(), R_ref, retain_graph=True)[0].norm().item()
              for t, w in zip(ref, weights)]
    # A term without a gradient in exact arithmetic (HSIC_F at F = 1, U' = sign(u W), piecewise
    # constant; a mask that cannot move) gives rounding noise only, which can exceed the tiny bg
    # term's share of dR: weight 0.
    weights = [w * (max(shares) / s if s > 1e-6 * max(shares) else 0.0) for w, s in zip(weights, shares)]
    inputs, inputs_ref = ((R, x), (R_ref, x_ref)) if x_grad else ((R,), (R_ref,))
    grads = torch.autograd.grad(sum((t * w.to(t)).sum() for t, w in zip(out, weights)), inputs)
    grads_ref = torch.autograd.grad(sum((t * w).sum() for t, w in zip(ref, weights)), inputs_ref)
    for name, a, e, t in zip(("dR", "dx"), grads, grads_ref, inputs):
        assert a.dtype == t.dtype and a.shape == t.shape, name
        # with F = 1, U' = sign(u W): HSIC_F is piecewise constant and dx is 0 (the reference's 1e-80)
        assert_matches_reference(a, e, 1e-9 if dtype == torch.float64 else GRADIENT_TOLERANCE[dtype],
                                 f"{backend} {name}", floor=1e-30)


HEAD_CASES = [(2, 3, 1, 1, 31), (3, 3, 1, 1, 1), (3, 1, 5, 5, 3), (2, 3, 5, 7, 31), (7, 3, 17, 23, 31),
              (4, 3, 23, 17, 3)]


@needs_cpu
@pytest.mark.parametrize("F", [1, 7, 64, 512])
@pytest.mark.parametrize("case", HEAD_CASES, ids=lambda c: "x".join(map(str, c[:4])) + f"-k{c[4]}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cpu_hsic_f_matches_reference(case, F, dtype):
    B, C, H, W, window = case
    R, x = random_maps(B, C, H, W, dtype, seed=F + H)
    compare_hsic_f_with_reference("cpu", R, x, window, F, seed=31 * F + B, x_grad=F != 512)


@needs_cpu
@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_hsic_f_of_strided_maps(layout, dtype):
    R, x = strided_maps(layout, dtype, H=24, W=20)
    compare_hsic_f_with_reference("cpu", R, x, 9, 64, seed=2**40 + 3)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cpu)])
def test_without_features_the_function_is_unchanged(backend):
    R, x = random_maps(4, 3, 9, 11, torch.float32, seed=5)
    Rs = [R.clone().requires_grad_() for _ in range(2)]
    plain = sib_fast.sib_terms(Rs[0], x, window_size=3, backend=backend)
    explicit = sib_fast.sib_terms(Rs[1], x, window_size=3, backend=backend, hsic_features=None, projection_seed=None)
    if backend == "cpu":  # the head op's own outputs
        direct = torch.ops.sib_fast.sib_head_forward(R, x, 3, 0.1, 10.0)[:3]
    else:  # docs/loss.md section 4 written out: P K P with P = I - 1/B
        mask = reference.spatial_mask(R, 3)
        m = mask.unsqueeze(1)
        U, V = (reference._unit_rows((t * m).flatten(1)) for t in (R, x))
        P = torch.eye(4) - 1.0 / 4
        direct = ((P @ (U @ U.T) @ P * (P @ (V @ V.T) @ P)).sum() / 9, reference.background_variance(R, mask), mask)
    for a, b, c in zip(plain, explicit, direct):
        assert torch.equal(a, b) and torch.equal(a, c)
    grads = [torch.autograd.grad(t.hsic + t.bg, r)[0] for t, r in zip((plain, explicit), Rs)]
    assert torch.equal(*grads)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cpu)])
def test_non_finite_inputs_give_nan(backend):
    # docs/numerics.md: NaN/Inf in R or x, or a masked norm past float32's range, gives a NaN HSIC_F
    for where, bad in (("R", float("nan")), ("R", float("inf")), ("x", float("nan")), ("x", 1e30)):
        R, x = random_maps(3, 2, 9, 9, torch.float32)
        (R if where == "R" else x)[1, 0, 4, 4] = bad
        R.requires_grad_()
        hsic, bg, _ = sib_fast.sib_terms(R, x, window_size=3, backend=backend, hsic_features=16, projection_seed=3)
        assert torch.isnan(hsic), (where, bad)
        assert torch.isnan(bg) == (where == "R"), (where, bad)
        (dR,) = torch.autograd.grad(hsic + bg, R)
        assert dR.shape == R.shape


def test_bad_arguments_name_themselves():
    R, x = random_maps(3, 2, 5, 5, torch.float32)

    def call(**kwargs):
        return sib_fast.sib_terms(R, x, window_size=3, backend="reference", **kwargs)

    for bad in (0, -3, 2**31):
        with pytest.raises(ValueError, match="hsic_features"):
            call(hsic_features=bad, projection_seed=1)
    for bad in (2.0, 8.5, "8", True, torch.tensor(8)):
        with pytest.raises(TypeError, match="hsic_features"):
            call(hsic_features=bad, projection_seed=1)
    with pytest.raises(TypeError, match="projection_seed"):
        call(hsic_features=8)
    for bad in (1.0, True, "3", None if False else 2.5):
        with pytest.raises(TypeError, match="projection_seed"):
            call(hsic_features=8, projection_seed=bad)
    for bad in (-1, 2**63):
        with pytest.raises(ValueError, match="projection_seed"):
            call(hsic_features=8, projection_seed=bad)
    with pytest.raises(ValueError, match="projection_seed"):
        call(projection_seed=3)
    with pytest.raises(ValueError, match="hsic_features"):
        sib_fast.SIBLoss(hsic_features=0)
    with pytest.raises(TypeError, match="hsic_features"):
        sib_fast.SIBLoss(hsic_features=512.0)


@needs_cpu
def test_section_8_rules_and_the_temperature_limit_hold_with_features():
    R, x = random_maps(3, 2, 6, 6, torch.float32)
    kwargs = dict(window_size=3, hsic_features=8, projection_seed=1)
    with pytest.raises(ValueError, match="temperature"):
        sib_fast.sib_terms(R, x, backend="cpu", temperature=1.0, **kwargs)
    dispatch._warn_once.cache_clear()  # a one-time warning: another test may have had it
    with pytest.warns(RuntimeWarning, match="reference"):
        auto = sib_fast.sib_terms(R, x, backend="auto", temperature=1.0, **kwargs)
    ref = reference.sib_terms(R, x, 3, 1.0, hsic_features=8, projection_seed=1)
    assert all(torch.equal(a, b) for a, b in zip(auto, ref))
    with pytest.raises(ValueError, match="same shape"):
        sib_fast.sib_terms(R, x[:, :1], backend="cpu", **kwargs)
    with pytest.raises(ValueError, match="window_size"):
        sib_fast.sib_terms(R, x, backend="cpu", **{**kwargs, "window_size": 4})
    with pytest.raises(TypeError, match="dtype"):
        sib_fast.sib_terms(R, x.int(), backend="cpu", **kwargs)


# ---------------------------------------------------------------- SIBLoss


def _loss_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 12, 12, generator=g)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Softplus(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 12 * 12, 5))
    return model, x, torch.tensor([0, 1, 2, 3])


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_cpu)])
def test_sibloss_draws_a_seed_per_call_reproducibly(backend):
    model, x, y = _loss_inputs()
    loss_fn = sib_fast.SIBLoss(hsic_features=32, window_size=3, backend=backend)
    assert "hsic_features=32" in repr(loss_fn)

    def run():
        xg = x.clone().requires_grad_()
        loss = loss_fn(model(xg), y, xg)
        return loss.detach(), loss_fn.projection_seed, loss_fn.hsic

    torch.manual_seed(123)
    first = [run() for _ in range(2)]
    torch.manual_seed(123)
    again = [run() for _ in range(2)]
    assert first[0][1] != first[1][1]  # a new W every call
    for a, b in zip(first, again):
        assert a[1] == b[1] and torch.equal(a[0], b[0])
    # the loss's hsic is sib_terms' HSIC_F at the seed it drew
    xg = x.clone().requires_grad_()
    R = sib_fast.input_vjp(model(xg), xg)
    expected = sib_fast.sib_terms(R, x, window_size=3, backend=backend, hsic_features=32,
                                  projection_seed=first[1][1]).hsic
    assert torch.allclose(first[1][2], expected.detach(), rtol=1e-6, atol=1e-7)


def test_sibloss_without_features_leaves_the_generator_alone():
    model, x, y = _loss_inputs()
    loss_fn = sib_fast.SIBLoss(window_size=3, backend="reference")
    state = torch.random.get_rng_state()
    xg = x.clone().requires_grad_()
    loss_fn(model(xg), y, xg)
    assert torch.equal(state, torch.random.get_rng_state()) and loss_fn.projection_seed is None
