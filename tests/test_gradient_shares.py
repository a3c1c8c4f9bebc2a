"""``gradient_shares``, the strength meter of the S-IB terms, against gradients taken by hand."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sib_fast import SIBLoss, gradient_shares, sib_terms

HEAD = dict(window_size=5, backend="reference")


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(dtype=torch.float64, seed=0, extra=None):
    torch.manual_seed(seed)
    layers = [nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Softplus(), nn.Dropout(0.2),
              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)]
    model = nn.Sequential(*layers).to(dtype).train()
    if extra is not None:
        model.register_parameter("unused", nn.Parameter(torch.ones(3, dtype=dtype)))  # no term reaches it
    return model


def _batch(dtype=torch.float64, B=6, size=12):
    g = torch.Generator().manual_seed(3)
    return torch.rand(B, 3, size, size, dtype=dtype, generator=g), torch.randint(0, 4, (B,), generator=g)


def _by_hand(model, x, y, crit):
    params = [p for p in model.parameters() if p.requires_grad]
    x = x.clone().requires_grad_()
    torch.manual_seed(11)
    logits = model(x)
    phi = 0.5 * torch.softmax(logits, 1).pow(2).sum()
    (R,) = torch.autograd.grad(phi, x, create_graph=True)
    hsic, bg, _ = sib_terms(R, x.detach(), window_size=crit.window_size, backend="reference")
    terms = [F.cross_entropy(logits, y), crit.lambda_fg * torch.exp(-hsic), crit.lambda_bg * torch.exp(bg)]
    flat = [torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                       for g, p in zip(torch.autograd.grad(t, params, retain_graph=True, allow_unused=True), params)])
            for t in terms]
    return flat


@pytest.mark.parametrize("extra", [None, "unused"])
def test_exact_shares_are_the_terms_gradients(extra):
    model, (x, y) = _model(extra=extra), _batch()
    crit = SIBLoss(lambda_fg=0.3, lambda_bg=50.0, **HEAD)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ce, fg, bg = _by_hand(model, x, y, crit)
    model.load_state_dict(state)
    torch.manual_seed(11)
    got = gradient_shares(model, x, y, crit)
    assert math.isclose(got.ce_norm, ce.norm().item(), rel_tol=1e-10)
    assert math.isclose(got.ratio_fg, (fg.norm() / ce.norm()).item(), rel_tol=1e-10)
    assert math.isclose(got.ratio_bg, (bg.norm() / ce.norm()).item(), rel_tol=1e-10)
    assert math.isclose(got.cos_fg, F.cosine_similarity(fg, ce, dim=0).item(), rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(got.cos_bg, F.cosine_similarity(bg, ce, dim=0).item(), rel_tol=1e-9, abs_tol=1e-12)


def test_the_meter_leaves_no_trace():
    model, (x, y) = _model(), _batch()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(5)
    expected_draw = torch.rand(3)
    torch.manual_seed(5)
    gradient_shares(model, x, y, SIBLoss(**HEAD))
    assert torch.equal(torch.rand(3), expected_draw), "the RNG state moved"
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())


def test_finite_differences_agree_with_the_exact_shares_on_a_smooth_model():
    model, (x, y) = _model(), _batch()
    model[3].p = 0.0  # no dropout: the two modes on the same function
    crit = SIBLoss(lambda_fg=0.3, lambda_bg=50.0, **HEAD)
    exact = gradient_shares(model, x, y, crit)
    fd = gradient_shares(model, x, y, crit, vjp="finite_difference")
    assert fd.ce_norm == exact.ce_norm
    for name in ("ratio_fg", "ratio_bg"):
        assert math.isclose(getattr(fd, name), getattr(exact, name), rel_tol=1e-3), name
    assert fd.cos_fg == pytest.approx(exact.cos_fg, abs=1e-3)


def test_a_nan_batch_gives_nan_shares():
    model, (x, y) = _model(), _batch()
    x[1, 0, 2, 2] = float("nan")
    got = gradient_shares(model, x, y, SIBLoss(**HEAD))
    assert math.isnan(got.ratio_fg) and math.isnan(got.ratio_bg) and math.isnan(got.ce_norm)


def test_under_bf16_autocast_the_shares_are_those_of_float32():
    model, (x, y) = _model(torch.float32), _batch(torch.float32)
    model[3].p = 0.0
    crit = SIBLoss(lambda_fg=0.3, lambda_bg=50.0, **HEAD)
    full = gradient_shares(model, x, y, crit)
    half = gradient_shares(model, x, y, crit, autocast_dtype=torch.bfloat16)
    assert math.isfinite(half.ratio_fg) and math.isfinite(half.ratio_bg)
    assert half.ratio_bg == pytest.approx(full.ratio_bg, rel=0.2)


@pytest.mark.parametrize("call,words", [
    (lambda m, x, y, c: gradient_shares(m, x[:1], y[:1], c), "at least 2"),
    (lambda m, x, y, c: gradient_shares(m, x, y, c, vjp="fd"), "vjp"),
    (lambda m, x, y, c: gradient_shares(m.requires_grad_(False), x, y, c), "no parameter"),
    (lambda m, x, y, c: gradient_shares(m, x, y, nn.CrossEntropyLoss()), "SIBLoss"),
])
def test_bad_arguments_are_named(call, words):
    model, (x, y) = _model(), _batch()
    with pytest.raises((ValueError, TypeError), match=words):
        call(model, x, y, SIBLoss(**HEAD))
