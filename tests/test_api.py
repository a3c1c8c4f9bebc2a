"""The public API: argument checks, dispatch, input_vjp and SIBLoss against a hand-written loss."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import sib_fast
from sib_fast import functional
from sib_fast.backends import dispatch

GOOD = dict(window_size=3, temperature=0.1, slope=10.0)


def _maps(shape=(3, 2, 6, 6), dtype=torch.float32):
    return torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)


BAD_INPUTS = [
    # (description, R/x/kwargs builder, error type, words the message must hold)
    ("mismatched shapes", lambda: (torch.randn(3, 2, 6, 6), torch.randn(3, 2, 6, 5), GOOD), ValueError, ["same shape"]),
    ("batch of one", lambda: (torch.randn(1, 2, 6, 6), torch.randn(1, 2, 6, 6), GOOD), ValueError, ["R", "B >= 2"]),
    ("3-D map", lambda: (torch.randn(3, 6, 6), torch.randn(3, 6, 6), GOOD), ValueError, ["R", "(B, C, H, W)"]),
    ("one value per image", lambda: (torch.randn(3, 1, 1, 1), torch.randn(3, 1, 1, 1), GOOD), ValueError, ["C*H*W"]),
    ("integer R", lambda: (torch.ones(3, 2, 6, 6, dtype=torch.int64), torch.randn(3, 2, 6, 6), GOOD), TypeError, ["R", "floating"]),
    ("integer x", lambda: (torch.randn(3, 2, 6, 6), torch.ones(3, 2, 6, 6, dtype=torch.int32), GOOD), TypeError, ["x", "floating"]),
    ("not a tensor", lambda: (torch.randn(3, 2, 6, 6).tolist(), torch.randn(3, 2, 6, 6), GOOD), TypeError, ["R", "Tensor"]),
    ("even window", lambda: (*_maps(), dict(GOOD, window_size=4)), ValueError, ["window_size", "odd"]),
    ("zero window", lambda: (*_maps(), dict(GOOD, window_size=0)), ValueError, ["window_size", "positive"]),
    ("float window", lambda: (*_maps(), dict(GOOD, window_size=3.0)), TypeError, ["window_size", "int"]),
    ("zero temperature", lambda: (*_maps(), dict(GOOD, temperature=0.0)), ValueError, ["temperature", "> 0"]),
    ("negative slope", lambda: (*_maps(), dict(GOOD, slope=-1.0)), ValueError, ["slope", "> 0"]),
    ("nan slope", lambda: (*_maps(), dict(GOOD, slope=float("nan"))), ValueError, ["slope"]),
    ("devices differ", lambda: (torch.randn(3, 2, 6, 6), torch.randn(3, 2, 6, 6, device="meta"), GOOD), ValueError, ["same device", "meta"]),
    ("unknown backend", lambda: (*_maps(), dict(GOOD, backend="fast")), ValueError, ["backend", "'fast'"]),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_before_any_work(case, monkeypatch):
    _, build, error, words = case

    def no_work(name):
        raise AssertionError(f"backend {name!r} was reached before the inputs were checked")

    monkeypatch.setattr(functional, "backend_module", no_work)
    R, x, kwargs = build()
    with pytest.raises(error) as info:
        sib_fast.sib_terms(R, x, **kwargs)
    for word in words:
        assert word in str(info.value), f"message {info.value!s} does not mention {word!r}"


def test_spatial_mask_checks_its_arguments():
    with pytest.raises(ValueError, match="window_size"):
        sib_fast.spatial_mask(torch.randn(2, 1, 4, 4), window_size=2)
    with pytest.raises(TypeError, match="R"):
        sib_fast.spatial_mask(torch.ones(2, 1, 4, 4, dtype=torch.int64))


def test_siblos_checks_its_arguments():
    with pytest.raises(ValueError, match="lambda_bg"):
        sib_fast.SIBLoss(lambda_bg=-1.0)
    with pytest.raises(ValueError, match="window_size"):
        sib_fast.SIBLoss(window_size=30)
    with pytest.raises(ValueError, match="backend"):
        sib_fast.SIBLoss(backend="gpu")


def test_reference_backend_is_always_available():
    assert "reference" in sib_fast.available_backends()
    assert sib_fast.resolve_backend("cpu", "reference") == "reference"
    assert set(sib_fast.available_backends()) <= set(dispatch.BACKEND_NAMES)


def test_named_backend_that_cannot_run_says_why():
    with pytest.raises(sib_fast.BackendUnavailableError, match="cuda"):
        sib_fast.resolve_backend("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(sib_fast.BackendUnavailableError, match="no CUDA GPU"):
            sib_fast.resolve_backend("cuda", "cuda")


def test_auto_falls_back_to_reference_only_with_one_warning(monkeypatch):
    monkeypatch.setitem(dispatch._AUTO_ORDER, "cpu", ("cuda",))  # a preference that cannot run on CPU
    dispatch._warn_once.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert sib_fast.resolve_backend("cpu") == "reference"
        assert sib_fast.resolve_backend("cpu") == "reference"
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "reference" in messages[0] and "cuda" in messages[0]
    dispatch._warn_once.cache_clear()


@pytest.mark.parametrize("dtype, bits", [(torch.float32, 24), (torch.bfloat16, 24), (torch.float64, 53)])
def test_temperature_limit_is_where_the_rank_window_stops_being_exact(dtype, bits):
    # docs/loss.md section 2's weights over all ranks: the largest one the fused backends' window
    # floor(t) - 8 .. floor(t) + 9 leaves out, relative to the largest one it keeps, is within
    # the dtype's rounding up to the limit, and beyond it just above (t = 80 exactly: rank 71
    # lies 9 ranks off)
    def dropped_weight(n, q, temperature):
        t = q * (n - 1)
        ranks = torch.arange(n, dtype=torch.float64)
        w = torch.softmax(-(ranks - t).abs() / temperature, dim=0)
        kept = (ranks >= math.floor(t) - 8) & (ranks <= math.floor(t) + 9)
        return (w[~kept].max() / w[kept].max()).item() if (~kept).any() else 0.0

    limit = dispatch.fused_temperature_limit(dtype)
    planes = [(n, q) for n in (30, 101, 224 * 224, 1001) for q in (0.05, 0.8, 0.95)]
    assert max(dropped_weight(n, q, limit) for n, q in planes) <= 2.0 ** -bits * (1 + 1e-9)
    assert dropped_weight(101, 0.8, 1.05 * limit) > 2.0 ** -bits


def test_fused_backends_refuse_an_inexact_temperature_and_auto_falls_back(monkeypatch):
    if "cpu" not in sib_fast.available_backends("cpu"):
        pytest.skip("the cpu backend is not built")
    assert sib_fast.resolve_backend("cpu", "cpu", 0.5, torch.float32) == "cpu"
    for temperature, dtype in ((1.0, torch.float32), (0.3, torch.float64)):
        with pytest.raises(ValueError, match=f"temperature={temperature:g} is above .*use backend='reference'"):
            sib_fast.resolve_backend("cpu", "cpu", temperature, dtype)
        assert sib_fast.resolve_backend("cpu", "reference", temperature, dtype) == "reference"
    R, x = _maps()
    with pytest.raises(ValueError, match="temperature=1 is above"):
        sib_fast.sib_terms(R, x, window_size=3, temperature=1.0, backend="cpu")
    # auto: the reference, with one warning that says why; SIBLoss records it
    dispatch._warn_once.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = sib_fast.SIBLoss(window_size=3, temperature=1.0)
        for _ in range(2):
            x = torch.rand(3, 2, 6, 6, requires_grad=True)
            logits = x.flatten(1) @ torch.randn(72, 4)
            loss(logits, torch.tensor([0, 1, 2]), x)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "'reference'" in messages[0] and "temperature=1 is above" in messages[0]
    assert loss.backend_used == "reference"
    dispatch._warn_once.cache_clear()


def test_input_vjp_errors_name_the_problem():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="requires_grad"):
        sib_fast.input_vjp(torch.randn(2, 4, requires_grad=True) * 2, x)
    x.requires_grad_()
    with pytest.raises(ValueError, match="graph"):
        sib_fast.input_vjp(torch.randn(2, 4), x)
    other = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="graph of logits"):
        sib_fast.input_vjp(other @ torch.randn(3, 4), x)


def test_input_vjp_matches_the_analytic_gradient():
    # logits = x W: phi = 0.5 sum p^2, dphi/dz = p * (p - sum p^2), R = dphi/dz W^T
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(5, 4, dtype=torch.float64, generator=g)
    R = sib_fast.input_vjp(x @ W, x)
    p = torch.softmax(x.detach() @ W, dim=1)
    dz = p * (p - (p * p).sum(1, keepdim=True))
    assert torch.allclose(R, dz @ W.T, rtol=1e-12)
    assert R.requires_grad  # create_graph=True keeps the graph


def _hand_written_sib_loss(logits, target, x, window, temperature, slope, lambda_fg, lambda_bg):
    """The loss written out from docs/loss.md sections 1-6 with no sib_fast code."""
    p = torch.softmax(logits, dim=1)
    (R,) = torch.autograd.grad(0.5 * (p ** 2).sum(), x, create_graph=True)
    B, C, H, W = R.shape

    def quantile(v, q):
        n = v.shape[1]
        idx = torch.arange(n, dtype=v.dtype)
        w = torch.exp(-(idx - q * (n - 1)).abs() / temperature)
        return (v.sort(dim=1, stable=True).values * (w / w.sum())).sum(1, keepdim=True)

    a = R.mean(1).abs().reshape(B, -1)
    lo, hi = quantile(a, 0.05), quantile(a, 0.95)
    u = (a - lo) / (hi - lo + 1e-8)
    h = torch.sigmoid(slope * (u - quantile(u, 0.8))).reshape(B, 1, H, W)
    d = F.avg_pool2d(h, window, 1, window // 2).reshape(B, -1)
    M = torch.sigmoid(slope * (d - quantile(d, 0.8))).reshape(B, 1, H, W)
    U = F.normalize((R * M).reshape(B, -1), dim=1)
    V = F.normalize((x.detach() * M).reshape(B, -1), dim=1)
    P = torch.eye(B, dtype=R.dtype) - 1.0 / B
    hsic = ((P @ U @ U.T @ P) * (P @ V @ V.T @ P)).sum() / (B - 1) ** 2
    bg = (R * (1 - M)).reshape(B, -1).var(dim=1).mean()
    return F.cross_entropy(logits, target) + lambda_bg * torch.exp(bg) + lambda_fg * torch.exp(-hsic)


@pytest.mark.slow
def test_sibloss_on_resnet18_matches_the_hand_written_loss():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).double()
    x = torch.rand(4, 3, 64, 64, dtype=torch.float64)
    target = torch.tensor([1, 2, 3, 4])
    params = [p for p in model.parameters()]
    # lambda_bg is scaled up so the background term is not lost in rounding at this tiny R
    kwargs = dict(window=31, temperature=0.1, slope=10.0, lambda_fg=0.01, lambda_bg=1e6)

    def grads(loss_fn):
        xi = x.clone().requires_grad_()
        logits = model(xi)
        loss = loss_fn(logits, xi)
        return loss.detach(), torch.autograd.grad(loss, params)

    criterion = sib_fast.SIBLoss(lambda_fg=0.01, lambda_bg=1e6, backend="reference")
    loss, g_lib = grads(lambda z, xi: criterion(z, target, xi))
    loss_hand, g_hand = grads(lambda z, xi: _hand_written_sib_loss(z, target, xi, **kwargs))
    _, g_ce = grads(lambda z, xi: F.cross_entropy(z, target))

    assert torch.isfinite(loss) and torch.allclose(loss, loss_hand, rtol=1e-12)
    assert criterion.backend_used == "reference"
    assert torch.allclose(criterion.loss, loss) and criterion.ce < loss
    total_lib, total_hand = torch.cat([g.flatten() for g in g_lib]), torch.cat([g.flatten() for g in g_hand])
    ce = torch.cat([g.flatten() for g in g_ce])
    assert torch.allclose(total_lib, total_hand, rtol=1e-9, atol=1e-12)
    sib_lib, sib_hand = total_lib - ce, total_hand - ce
    assert sib_hand.norm() > 1e-6 * ce.norm(), "the S-IB part of the gradient is lost in rounding"
    assert ((sib_lib - sib_hand).norm() / sib_hand.norm()).item() < 1e-7


def test_package_works_without_the_compiled_extension():
    # A fresh process where sib_fast._C cannot be imported: the reference runs, the fused
    # backends report why they are missing.
    import subprocess
    import sys
    code = (
        "import sys, warnings; sys.modules['sib_fast._C'] = None\n"
        "import torch, sib_fast\n"
        "assert sib_fast.available_backends('cpu') == ['reference'], sib_fast.available_backends('cpu')\n"
        "try:\n"
        "    sib_fast.resolve_backend('cpu', 'cpu')\n"
        "    raise SystemExit('cpu backend resolved without the extension')\n"
        "except sib_fast.BackendUnavailableError as e:\n"
        "    assert 'not built' in str(e), e\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    R, x = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)\n"
        "    terms = sib_fast.sib_terms(R, x, window_size=3)\n"
        "assert torch.isfinite(terms.hsic) and any('not built' in str(m.message) for m in w)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_reference_on_meta_tensors():
    """Shapes and dtypes without data (meta tensors), forward and backward: no .item() anywhere
    (a review found 'Tensor.item() cannot be called on meta tensors'; not reproducible at the
    time of the fix, kept as a guard)."""
    R = torch.randn(4, 3, 6, 6, device="meta", requires_grad=True)
    x = torch.randn(4, 3, 6, 6, device="meta")
    for window in (3, 31, 2 ** 64 + 1):
        hsic, bg, mask = sib_fast.sib_terms(R, x, window_size=window, backend="reference")
        assert hsic.shape == () and bg.shape == () and mask.shape == (4, 6, 6) and mask.device.type == "meta"
        (dR,) = torch.autograd.grad(hsic + bg + mask.sum(), R)
        assert dR.shape == R.shape and dR.device.type == "meta"
    assert sib_fast.spatial_mask(R, window_size=3, backend="reference").shape == (4, 6, 6)
