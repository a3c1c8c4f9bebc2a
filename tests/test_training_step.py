"""``sib_backward``: the finite-difference VJP mode against the exact (double-backward) one.

The head's part of the weight gradient (total minus the cross-entropy gradient) is compared:
with the default lambdas it is about 1e-3 of the cross-entropy part, so comparing totals
would not notice a head gradient that is wrong or missing.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sib_fast
from sib_fast import SIBLoss, sib_backward
from sib_fast.training.models import SmallCNN, TinyViT
from sib_fast.training.norms import frozen_norm_statistics
from sib_fast.training.step import DoubleBackwardUnsupportedError

# the head on the reference backend: these tests are about the training step, not the kernels
HEAD = dict(window_size=5, backend="reference")


@pytest.fixture(autouse=True)
def _quiet_and_single_threaded():
    """One thread: these tensors are tiny, and on a busy 2-core CI machine a second intra-op
    thread makes them up to 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield
    torch.set_num_threads(threads)


def _flat_grad(model):
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                      for p in model.parameters()])


def _ce_grad(model, x, y):
    model.zero_grad()
    F.cross_entropy(model(x).to(torch.promote_types(x.dtype, torch.float32)), y).backward()
    return _flat_grad(model)


def _head_grad(model, x, y, criterion, seed=0, **kw):
    """The head's part of the weight gradient: sib_backward's gradient minus the CE gradient."""
    torch.manual_seed(seed)
    model.zero_grad()
    sib_backward(model, x, y, criterion, **kw)
    total = _flat_grad(model)
    torch.manual_seed(seed)
    return total - _ce_grad(model, x, y)


def _cos(a, b):
    return F.cosine_similarity(a.double(), b.double(), dim=0).item()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _problem(dtype, act="softplus", eval_mode=True, seed=0, size=16):
    torch.manual_seed(seed)
    model = SmallCNN(num_classes=4, width=8, act=act, pool="mean").to(dtype)
    model.train(not eval_mode)
    x = torch.rand(4, 3, size, size, dtype=dtype)
    y = torch.randint(0, 4, (4,))
    return model, x, y


def test_exact_mode_is_siblos_backward():
    """vjp='exact' gives the gradient of the README's `criterion(model(x), y, x).backward()`."""
    model, x, y = _problem(torch.float64)
    crit = SIBLoss(**HEAD)
    model.zero_grad()
    stats = sib_backward(model, x, y, crit, vjp="exact")
    mine = _flat_grad(model)
    model.zero_grad()
    xr = x.clone().requires_grad_()
    loss = crit(model(xr), y, xr)
    loss.backward()
    torch.testing.assert_close(mine, _flat_grad(model), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(stats.loss, loss.detach())
    assert stats.vjp == "exact" and stats.backend == "reference" and stats.fd_eps is None
    assert set(stats.as_floats()) == {"loss", "ce", "hsic", "bg"}


def test_finite_difference_float64_matches_and_converges():
    """float64: cosine >= 0.999, and the error of the central difference falls ~quadratically."""
    model, x, y = _problem(torch.float64)
    crit = SIBLoss(**HEAD)
    exact = _head_grad(model, x, y, crit, vjp="exact")
    assert exact.norm() > 0
    errors = {}
    for c in (1e-1, 1e-2, 1e-3):
        fd = _head_grad(model, x, y, crit, vjp="finite_difference", fd_eps=c)
        assert _cos(fd, exact) >= 0.999, (c, _cos(fd, exact))
        errors[c] = _rel(fd, exact)
    assert errors[1e-2] < 0.05 * errors[1e-1], errors    # quadratic: a factor ~100 per decade
    assert errors[1e-3] < 0.05 * errors[1e-2], errors
    assert errors[1e-3] < 1e-5, errors
    # the one-sided form: first order, a factor ~10 per decade
    fwd = {c: _rel(_head_grad(model, x, y, crit, vjp="finite_difference", fd_eps=c, fd_scheme="forward"), exact)
           for c in (1e-2, 1e-3)}
    assert fwd[1e-3] < 0.2 * fwd[1e-2], fwd
    assert fwd[1e-3] > errors[1e-3]


@pytest.mark.parametrize("scheme", ["central", "forward"])
def test_finite_difference_on_a_batch_of_zeros(scheme):
    """x = 0 made the step eps = c ||x|| / ||g|| zero and every weight gradient 0 / 0 = NaN; the
    step now takes the scale of unit values, and matches the exact gradient as on any batch."""
    model, x, y = _problem(torch.float64)
    x = torch.zeros_like(x)
    crit = SIBLoss(**HEAD)
    exact = _head_grad(model, x, y, crit, vjp="exact")
    fd = _head_grad(model, x, y, crit, vjp="finite_difference", fd_eps=1e-3, fd_scheme=scheme)
    assert torch.isfinite(fd).all() and exact.norm() > 0
    assert _rel(fd, exact) < (1e-5 if scheme == "central" else 1e-2), _rel(fd, exact)


def test_finite_difference_with_a_zero_head_gradient_adds_exactly_nothing():
    """g = dL_head/dR = 0 (both S-IB weights 0): the head's weight gradient is exactly 0, not 0 / 0."""
    model, x, y = _problem(torch.float64)
    crit = SIBLoss(**{**HEAD, "lambda_fg": 0.0, "lambda_bg": 0.0})
    fd = _head_grad(model, x, y, crit, vjp="finite_difference", fd_eps=1e-3)
    assert torch.equal(fd, torch.zeros_like(fd))


def test_finite_difference_float32_default_eps():
    model, x, y = _problem(torch.float32)
    crit = SIBLoss(**HEAD)
    exact = _head_grad(model, x, y, crit, vjp="exact")
    fd = _head_grad(model, x, y, crit, vjp="finite_difference")
    assert _cos(fd, exact) >= 0.99, _cos(fd, exact)


def _synthetic_batch(dtype, n=4, size=32):
    from sib_fast.training.data import SyntheticObjects
    data = SyntheticObjects(length=n, image_size=size, seed=0)
    x, y = zip(*[data[i][:2] for i in range(n)])
    return torch.stack(x).to(dtype), torch.tensor(y)


@pytest.mark.parametrize("dtype,minimum", [(torch.float64, 0.9999), (torch.float32, 0.999)])
def test_default_builtin_cnn_is_smooth_enough_for_finite_differences(dtype, minimum):
    """sib-train's default model (GELU, log-sum-exp pooling, BatchNorm in train mode) on its own
    data: the two VJP modes agree at the default step."""
    torch.manual_seed(0)
    model = SmallCNN(num_classes=6, width=8).to(dtype).train()
    x, y = _synthetic_batch(dtype)
    cos = sib_fast.vjp_agreement(model, x, y, SIBLoss(**HEAD))
    assert cos >= minimum, cos


def test_vjp_agreement_flags_a_network_with_kinks():
    """Max pooling (like ReLUs) makes grad_theta phi jump where an argmax switches between
    x - eps*g and x + eps*g; each such jump enters the difference divided by eps, so their share
    does not vanish as eps shrinks (only a small network may, by luck, see none), while the double
    backward does not see them. The same network with log-sum-exp pooling agrees."""
    x, y = _synthetic_batch(torch.float64, n=8)
    crit = SIBLoss(**HEAD)
    cosines = {}
    for pool in ("max", "lse"):
        torch.manual_seed(0)
        model = SmallCNN(num_classes=6, width=16, pool=pool).double().train()
        cosines[pool] = sib_fast.vjp_agreement(model, x, y, crit, fd_eps=1e-3)
    assert cosines["max"] < 0.9 and cosines["lse"] > 0.9999, cosines


def test_vjp_agreement_leaves_grads_statistics_and_rng_alone():
    torch.manual_seed(0)
    model = nn.Sequential(SmallCNN(num_classes=4, width=8).features, nn.Flatten(1), nn.Dropout(0.2),
                          nn.LazyLinear(4))
    x, y = _synthetic_batch(torch.float32, size=16)
    model(x)
    model.train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    bn = model[0][1]
    stats = bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)
    rng = torch.get_rng_state()
    cos = sib_fast.vjp_agreement(model, x, y, SIBLoss(**HEAD))
    assert 0.99 <= cos <= 1.0 + 1e-6, cos
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert int(bn.num_batches_tracked) == stats[2]
    assert torch.equal(torch.get_rng_state(), rng)


def test_finite_difference_in_train_mode_with_batchnorm_and_dropout():
    """BatchNorm in train mode couples the images (one batch-wide eps); dropout masks are replayed
    in the perturbed passes; the running statistics move once per step, as in a plain step."""
    torch.manual_seed(0)
    model = nn.Sequential(SmallCNN(num_classes=4, width=8, act="gelu", pool="mean").features, nn.Flatten(1),
                          nn.Dropout(0.3), nn.LazyLinear(4)).double()
    x = torch.rand(4, 3, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 4, (4,))
    model(x)  # materialise the lazy layer
    model.train()
    crit = SIBLoss(**HEAD)
    bn = model[0][1]
    before = bn.running_mean.clone(), int(bn.num_batches_tracked)
    exact = _head_grad(model, x, y, crit, seed=1, vjp="exact")
    fd = _head_grad(model, x, y, crit, seed=1, vjp="finite_difference", fd_eps=1e-3)
    assert _cos(fd, exact) >= 0.999, _cos(fd, exact)
    # one plain forward from the same state moves the statistics exactly like one FD step
    bn.running_mean.copy_(before[0])
    bn.num_batches_tracked.fill_(before[1])
    torch.manual_seed(1)
    model.zero_grad()
    sib_backward(model, x, y, crit, vjp="finite_difference")
    after_fd = bn.running_mean.clone(), int(bn.num_batches_tracked)
    bn.running_mean.copy_(before[0])
    bn.num_batches_tracked.fill_(before[1])
    model(x)
    torch.testing.assert_close(after_fd[0], bn.running_mean, rtol=0, atol=0)
    assert after_fd[1] == int(bn.num_batches_tracked) == before[1] + 1


def test_frozen_norm_statistics_restores_buffers():
    bn = nn.BatchNorm2d(3)
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    with frozen_norm_statistics(bn):
        bn(torch.randn(4, 3, 5, 5) + 3)
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    assert int(bn.num_batches_tracked) == 0


def test_stats_are_detached_and_consistent():
    model, x, y = _problem(torch.float32)
    crit = SIBLoss(**HEAD)
    for vjp in ("exact", "finite_difference"):
        stats = sib_backward(model, x, y, crit, vjp=vjp)
        for t in (stats.loss, stats.ce, stats.hsic, stats.bg, stats.logits):
            assert not t.requires_grad
        f = stats.as_floats()
        expected = f["ce"] + crit.lambda_bg * torch.exp(stats.bg).item() + crit.lambda_fg * torch.exp(-stats.hsic).item()
        assert f["loss"] == pytest.approx(expected, rel=1e-6)
        assert stats.logits.shape == (4, 4)
    assert stats.fd_eps is not None and stats.fd_eps > 0


def test_zero_lambdas_give_the_cross_entropy_gradient():
    model, x, y = _problem(torch.float64)
    crit = SIBLoss(lambda_fg=0.0, lambda_bg=0.0, **HEAD)
    for vjp in ("exact", "finite_difference"):
        head = _head_grad(model, x, y, crit, vjp=vjp)
        assert head.abs().max() < 1e-12, vjp


def test_nonfinite_input_gives_nonfinite_loss_not_a_crash():
    model, x, y = _problem(torch.float32)
    x[0, 0, 0, 0] = float("nan")
    for vjp in ("exact", "finite_difference"):
        stats = sib_backward(model, x, y, SIBLoss(**HEAD), vjp=vjp)
        assert not torch.isfinite(stats.loss)


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(vjp="fd"), ValueError, ["vjp", "finite_difference"]),
    (dict(fd_eps=-1.0), ValueError, ["fd_eps"]),
    (dict(fd_eps=float("nan")), ValueError, ["fd_eps"]),
    (dict(fd_scheme="backward"), ValueError, ["fd_scheme"]),
    (dict(autocast_dtype=torch.float64), ValueError, ["autocast_dtype"]),
])
def test_bad_arguments(kwargs, error, words):
    model, x, y = _problem(torch.float32)
    with pytest.raises(error) as info:
        sib_backward(model, x, y, SIBLoss(**HEAD), **kwargs)
    assert all(w in str(info.value) for w in words), str(info.value)


def test_bad_inputs():
    model, x, y = _problem(torch.float32)
    with pytest.raises(TypeError, match="SIBLoss"):
        sib_backward(model, x, y, nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="B >= 2"):
        sib_backward(model, x[:1], y[:1], SIBLoss(**HEAD))
    with pytest.raises(ValueError, match="target"):
        sib_backward(model, x, y[:3], SIBLoss(**HEAD))


def test_exported_from_package():
    assert sib_fast.sib_backward is sib_backward


# --------------------------------------------------------------------------- models without double backward

def _vit_problem():
    torch.manual_seed(0)
    model = TinyViT(num_classes=4, image_size=16, patch=4, dim=32, depth=1, heads=2)
    x = torch.rand(4, 3, 16, 16)
    y = torch.randint(0, 4, (4,))
    return model, x, y


def test_vit_with_fused_attention_exact_fails_clearly_and_fd_matches_math_attention():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    model, x, y = _vit_problem()
    crit = SIBLoss(window_size=3, backend="reference")
    with pytest.raises(DoubleBackwardUnsupportedError) as info:
        sib_backward(model, x, y, crit, vjp="exact")
    msg = str(info.value)
    assert "vjp='finite_difference'" in msg and "scaled_dot_product_attention" in msg and "SDPBackend.MATH" in msg
    assert isinstance(info.value, RuntimeError)
    # finite differences run with the fused kernels; the exact reference uses the math kernel
    fd = _head_grad(model, x, y, crit, vjp="finite_difference")
    assert torch.isfinite(fd).all() and fd.norm() > 0
    with sdpa_kernel(SDPBackend.MATH):
        exact = _head_grad(model, x, y, crit, vjp="exact")
    assert _cos(fd, exact) >= 0.99, _cos(fd, exact)


def test_vit_trains_with_finite_differences():
    model, x, y = _vit_problem()
    crit = SIBLoss(window_size=3, backend="reference")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        stats = sib_backward(model, x, y, crit, vjp="finite_difference")
        opt.step()
        losses.append(stats.ce.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_compiled_model_exact_fails_clearly_and_fd_trains():
    model, x, y = _problem(torch.float32)
    crit = SIBLoss(**HEAD)
    eager_fd = _head_grad(model, x, y, crit, vjp="finite_difference")
    compiled = torch.compile(model, backend="aot_eager")
    with pytest.raises(DoubleBackwardUnsupportedError, match="finite_difference"):
        sib_backward(compiled, x, y, crit, vjp="exact")
    compiled_fd = _head_grad(compiled, x, y, crit, vjp="finite_difference")
    assert _cos(compiled_fd, eager_fd) >= 0.999
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ce = []
    for _ in range(5):
        opt.zero_grad()
        ce.append(sib_backward(compiled, x, y, crit, vjp="finite_difference").ce.item())
        opt.step()
    assert ce[-1] < ce[0]


# --------------------------------------------------------------------------- mixed precision

def _autocast_ce_grad(model, x, y, dtype):
    model.zero_grad()
    with torch.autocast("cpu", dtype=dtype):
        z = model(x)
    F.cross_entropy(z.float(), y).backward()
    return _flat_grad(model)


def _autocast_head_grad(model, x, y, crit, dtype, **kw):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, enabled=dtype == torch.float16)
    model.zero_grad()
    stats = sib_backward(model, x, y, crit, autocast_dtype=dtype, grad_scaler=scaler, **kw)
    assert stats.loss.dtype == torch.float32 and torch.isfinite(stats.loss)
    total = _flat_grad(model) / scaler.get_scale() if scaler.is_enabled() else _flat_grad(model)
    assert torch.isfinite(total).all()
    return total - _autocast_ce_grad(model, x, y, dtype)


def test_fp16_autocast_with_grad_scaler_fd_matches_exact():
    """Under float16 autocast (R's backward scaled by the GradScaler) the finite-difference head
    gradient follows the exact one computed at the same precision."""
    model, x, y = _problem(torch.float32, act="gelu")
    crit = SIBLoss(**HEAD)
    exact = _autocast_head_grad(model, x, y, crit, torch.float16, vjp="exact")
    fd = _autocast_head_grad(model, x, y, crit, torch.float16, vjp="finite_difference")
    assert _cos(fd, exact) >= 0.95, _cos(fd, exact)


def test_bf16_autocast_runs_in_both_modes():
    """bfloat16 keeps ~3 significant digits in R's backward, so the head gradient itself is noisy
    at this precision (in either mode); both modes run, stay finite and agree in direction."""
    model, x, y = _problem(torch.float32, act="gelu")
    crit = SIBLoss(**HEAD)
    exact = _autocast_head_grad(model, x, y, crit, torch.bfloat16, vjp="exact")
    fd = _autocast_head_grad(model, x, y, crit, torch.bfloat16, vjp="finite_difference")
    assert _cos(fd, exact) > 0.3, _cos(fd, exact)
