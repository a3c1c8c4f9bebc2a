"""Lazy (``sib_every``) and sub-batch (``sib_batch``, ``sib_bn``) S-IB steps of ``sib_backward``,
against gradients assembled by hand from plain cross-entropy and full S-IB steps in float64."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sib_fast import SIBLoss, separate_step_compensation, sib_backward

HEAD = dict(window_size=5, backend="reference")


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _grad_of(model, step) -> torch.Tensor:
    model.zero_grad()
    step()
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()])


def _ce(model, x, y):
    F.cross_entropy(model(x), y).backward()


def _smooth_model(bn=False, seed=0):
    torch.manual_seed(seed)
    layers = [nn.BatchNorm2d(3)] if bn else []
    layers += [nn.Conv2d(3, 6, 3, padding=1), nn.Softplus(), nn.Conv2d(6, 8, 3, padding=1, stride=2), nn.Softplus(),
               nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)]
    return nn.Sequential(*layers).double().train()


def _batch(B=6, size=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, size, size, dtype=torch.float64, generator=g), torch.randint(0, 4, (B,), generator=g)


def _close(a, b, tol=1e-10):
    assert ((a - b).norm() / b.norm()).item() < tol


@pytest.mark.parametrize("vjp", ["exact", "finite_difference"])
def test_lazy_steps_are_plain_cross_entropy_between_weighted_sib_steps(vjp):
    model, (x, y) = _smooth_model(), _batch()
    crit = SIBLoss(**HEAD)
    ce = _grad_of(model, lambda: _ce(model, x, y))
    full = _grad_of(model, lambda: sib_backward(model, x, y, crit, vjp=vjp))
    for step in (1, 2, 3, 5):
        stats = []
        got = _grad_of(model, lambda: stats.append(sib_backward(model, x, y, crit, vjp=vjp, sib_every=4, step=step)))
        assert torch.equal(got, ce)
        assert not stats[0].sib_step and math.isnan(stats[0].hsic) and math.isnan(stats[0].bg)
        assert stats[0].ce == stats[0].loss
    for step in (0, 4, 8):
        stats = []
        got = _grad_of(model, lambda: stats.append(sib_backward(model, x, y, crit, vjp=vjp, sib_every=4, step=step)))
        _close(got - ce, 4 * (full - ce))  # the S-IB terms weighted by the interval
        assert stats[0].sib_step and math.isfinite(stats[0].hsic)
        assert torch.allclose(stats[0].loss, stats[0].ce + crit.lambda_bg * stats[0].bg.exp()
                              + crit.lambda_fg * (-stats[0].hsic).exp())  # the loss logged is unweighted


@pytest.mark.parametrize("vjp", ["exact", "finite_difference"])
def test_sub_batch_takes_cross_entropy_on_all_images_and_the_head_on_the_first(vjp):
    model, (x, y) = _smooth_model(), _batch()
    crit = SIBLoss(**HEAD)
    b = 3
    expected = (_grad_of(model, lambda: _ce(model, x, y))
                + _grad_of(model, lambda: sib_backward(model, x[:b], y[:b], crit, vjp=vjp))
                - _grad_of(model, lambda: _ce(model, x[:b], y[:b])))
    head_only = sib_backward(model, x[:b], y[:b], crit, vjp=vjp)
    stats = []
    got = _grad_of(model, lambda: stats.append(sib_backward(model, x, y, crit, vjp=vjp, sib_batch=b)))
    _close(got, expected, 1e-10 if vjp == "exact" else 1e-6)
    assert torch.equal(stats[0].hsic, head_only.hsic) and torch.equal(stats[0].bg, head_only.bg)
    assert stats[0].logits.shape[0] == x.shape[0]
    # a sub-batch as large as the batch is the whole batch
    whole = _grad_of(model, lambda: sib_backward(model, x, y, crit, vjp=vjp))
    assert torch.equal(_grad_of(model, lambda: sib_backward(model, x, y, crit, vjp=vjp, sib_batch=len(x))), whole)


def _eval_bn_head_grad(model, x, y, crit, mean, var):
    """The head's weight gradient on x with the input BatchNorm in eval mode on (mean, var)."""
    bn = model[0]
    saved = bn.running_mean.clone(), bn.running_var.clone()
    bn.running_mean.copy_(mean)
    bn.running_var.copy_(var)
    bn.eval()
    try:
        head = (_grad_of(model, lambda: sib_backward(model, x, y, crit))
                - _grad_of(model, lambda: _ce(model, x, y)))
    finally:
        bn.train()
        bn.running_mean.copy_(saved[0])
        bn.running_var.copy_(saved[1])
    return head


@pytest.mark.parametrize("sib_bn", ["frozen", "running", "batch"])
def test_sub_batch_normalises_as_asked_and_updates_no_statistics(sib_bn):
    model, (x, y) = _smooth_model(bn=True), _batch(B=8)
    bn = model[0]
    bn.running_mean.uniform_(0.3, 0.6)
    bn.running_var.uniform_(0.05, 0.1)
    crit = SIBLoss(**HEAD)
    b = 4
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # the statistics after one train-mode forward of the full batch: what the step must leave
    probe = _smooth_model(bn=True)
    probe.load_state_dict(before)
    probe(x)
    updated = probe.state_dict()
    got = _grad_of(model, lambda: sib_backward(model, x, y, crit, sib_batch=b, sib_bn=sib_bn))
    for k, v in updated.items():
        assert torch.equal(model.state_dict()[k], v), k

    def restore(state):
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            getattr(bn, key).copy_(state[f"0.{key}"])

    restore(before)
    ce = _grad_of(model, lambda: _ce(model, x, y))  # the full pass, as in the step
    if sib_bn == "batch":  # the sub-batch's own statistics, differentiated through
        expected = (_grad_of(model, lambda: sib_backward(model, x[:b], y[:b], crit))
                    - _grad_of(model, lambda: _ce(model, x[:b], y[:b])))
    elif sib_bn == "frozen":  # the full batch's statistics of this step, as constants
        expected = _eval_bn_head_grad(model, x[:b], y[:b], crit, x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False))
    else:  # the running statistics, as the full pass left them
        expected = _eval_bn_head_grad(model, x[:b], y[:b], crit, updated["0.running_mean"], updated["0.running_var"])
    _close(got - ce, expected, 1e-9)


@pytest.mark.parametrize("vjp", ["exact", "finite_difference"])
@pytest.mark.parametrize("sub", [None, 3])
def test_sib_only_steps_take_the_weighted_terms_alone_and_leave_the_statistics(vjp, sub):
    # StyleGAN2's separate form: K x the S-IB terms, no cross-entropy, whatever the step, and no
    # BatchNorm update (the cross-entropy step of the batch made it)
    model, (x, y) = _smooth_model(bn=True), _batch()
    crit = SIBLoss(**HEAD)
    ce = _grad_of(model, lambda: _ce(model, x, y))
    full = _grad_of(model, lambda: sib_backward(model, x, y, crit, vjp=vjp, sib_batch=sub))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for step in (0, 3):
        stats = []
        got = _grad_of(model, lambda: stats.append(sib_backward(model, x, y, crit, vjp=vjp, sib_batch=sub,
                                                                sib_every=4, step=step, sib_only=True)))
        _close(got, 4 * (full - ce), 1e-9)
        assert stats[0].sib_step and math.isfinite(stats[0].hsic)
        assert torch.allclose(stats[0].loss, stats[0].ce + crit.lambda_bg * stats[0].bg.exp()
                              + crit.lambda_fg * (-stats[0].hsic).exp())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_separate_step_compensation_is_stylegan2s():
    assert separate_step_compensation(1) == 0.5 and separate_step_compensation(4) == 0.8
    assert separate_step_compensation(16) == 16 / 17
    with pytest.raises(ValueError, match="sib_every"):
        separate_step_compensation(0)


@pytest.mark.parametrize("kwargs,words", [
    (dict(sib_every=0), "sib_every"), (dict(sib_every=2.0), "sib_every"), (dict(step=-1), "step"),
    (dict(sib_batch=1), "sib_batch"), (dict(sib_batch=True), "sib_batch"), (dict(sib_bn="mean"), "sib_bn"),
    (dict(sib_only=1), "sib_only"),
])
def test_bad_arguments_are_named(kwargs, words):
    model, (x, y) = _smooth_model(), _batch()
    with pytest.raises(ValueError, match=words):
        sib_backward(model, x, y, SIBLoss(**HEAD), **kwargs)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-4)])
@pytest.mark.parametrize("kwargs", [dict(), dict(momentum=None), dict(track_running_stats=False)],
                         ids=["momentum", "cumulative", "no-running-stats"])
def test_recorded_batch_statistics_are_the_batchs(kwargs, dtype, tol):
    from sib_fast.training.norms import recorded_batch_statistics

    bn = nn.BatchNorm2d(5, **kwargs).to(dtype).train()
    if bn.track_running_stats:
        bn.running_mean.uniform_(-3.0, 3.0)
        bn.running_var.uniform_(0.5, 4.0)
    for step in range(3):  # the cumulative average's factor changes with every batch
        x = torch.randn(6, 5, 7, 9, dtype=dtype) * 2 + 0.5
        with recorded_batch_statistics(bn) as stats:
            bn(x)
        mean, var = stats[bn]
        assert torch.allclose(mean, x.mean((0, 2, 3)), rtol=tol, atol=tol), step
        assert torch.allclose(var, x.var((0, 2, 3), unbiased=False), rtol=tol, atol=tol), step
