"""Attribution maps: shapes, conventions, side effects, and the CAM formulas on hand-built models."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sib_fast.evaluation.explain import CAM_METHODS, METHODS, canonical_method, explain, find_default_layer, gradcam


class SmallCNN(nn.Module):
    """Conv-BatchNorm-activation blocks, global average pool, linear (like sib_fast.training.models.SmallCNN)."""

    def __init__(self, classes, width, act):
        super().__init__()
        acts = {"gelu": nn.GELU, "relu": nn.ReLU, "softplus": nn.Softplus}
        layers, c = [], 3
        for w, s in ((width, 2), (2 * width, 2), (2 * width, 1)):
            layers += [nn.Conv2d(c, w, 3, stride=s, padding=1, bias=False), nn.BatchNorm2d(w), acts[act]()]
            c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def _cnn(act="gelu", seed=0, classes=3):
    torch.manual_seed(seed)
    model = SmallCNN(classes, width=4, act=act).double()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model


def _x(B=2, H=16, W=16, seed=1):
    return torch.rand(B, 3, H, W, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_every_method_shape_dtype_and_no_side_effects():
    model = _cnn()
    model.train()
    model.features[1].eval()                      # a module with its own mode: restored as it was
    x = _x(H=16, W=12)
    x0 = x.clone()
    params = list(model.parameters())
    params[0].grad = torch.full_like(params[0], 7.0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    maps = explain(model, x, torch.tensor([0, 2]), METHODS, ig_steps=4, smoothgrad_samples=2)
    assert list(maps) == list(METHODS)
    for name, m in maps.items():
        assert m.shape == (2, 16, 12), name
        assert m.dtype == torch.float32 and not m.requires_grad, name
        assert torch.isfinite(m).all(), name
        if name not in ("input_x_gradient", "integrated_gradients"):
            assert (m >= 0).all(), name
    assert model.training and not model.features[1].training and model.features[0].training
    assert torch.equal(params[0].grad, torch.full_like(params[0], 7.0))
    assert all(p.grad is None for p in params[1:])
    assert torch.equal(x, x0) and not x.requires_grad
    for k, v in model.state_dict().items():  # BatchNorm running statistics untouched
        assert torch.equal(v, state[k]), k


def test_input_space_methods_match_hand_computation():
    model = _cnn().eval()
    x = _x()
    t = torch.tensor([1, 0])
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(xg).gather(1, t.view(-1, 1)).sum(), xg)
    maps = explain(model, x, t, ["saliency", "input_x_gradient", "guided_backprop"])
    torch.testing.assert_close(maps["saliency"], g.abs().sum(1).float())
    torch.testing.assert_close(maps["input_x_gradient"], (x * g).sum(1).float())
    # GELU model: guided backprop (which rewrites nn.ReLU modules only) is the plain gradient
    torch.testing.assert_close(maps["guided_backprop"], maps["saliency"])


def test_guided_backprop_differs_on_relu_model():
    model = _cnn(act="relu").eval()
    maps = explain(model, _x(), torch.tensor([0, 1]), ["saliency", "guided_backprop"])
    assert not torch.allclose(maps["saliency"], maps["guided_backprop"])


def test_integrated_gradients_completeness():
    model = _cnn(act="softplus").eval()
    x = _x(B=2)
    t = torch.tensor([2, 1])
    ig = explain(model, x, t, ["ig"], ig_steps=64)["integrated_gradients"]
    with torch.no_grad():
        gap = model(x).gather(1, t.view(-1, 1)).squeeze(1) - model(torch.zeros_like(x)).gather(1, t.view(-1, 1)).squeeze(1)
    torch.testing.assert_close(ig.double().sum((1, 2)), gap, rtol=1e-3, atol=1e-5)


def test_smoothgrad_seeded_and_leaves_global_rng_alone():
    model = _cnn().eval()
    x = _x()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = explain(model, x, 0, ["smoothgrad"], smoothgrad_samples=3, seed=5)["smoothgrad"]
    assert torch.equal(torch.get_rng_state(), before)
    b = explain(model, x, 0, ["smoothgrad"], smoothgrad_samples=3, seed=5)["smoothgrad"]
    c = explain(model, x, 0, ["smoothgrad"], smoothgrad_samples=3, seed=6)["smoothgrad"]
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    zero_noise = explain(model, x, 0, ["smoothgrad"], smoothgrad_samples=2, smoothgrad_noise=0.0)["smoothgrad"]
    torch.testing.assert_close(zero_noise, explain(model, x, 0, ["saliency"])["saliency"])


class Linear1x1(nn.Module):
    """feat = x (identity layer), logits = W mean_ij(feat): dS/dA_c = W[t, c] / (h w) everywhere."""

    def __init__(self, w):
        super().__init__()
        self.feat = nn.Identity()
        self.w = nn.Parameter(w)

    def forward(self, x):
        return self.feat(x).mean((2, 3)) @ self.w.t()


def test_cam_formulas_on_hand_built_model():
    w = torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, 1.0]], dtype=torch.float64)
    model = Linear1x1(w)
    x = torch.rand(2, 3, 4, 5, dtype=torch.float64)
    t = torch.tensor([0, 1])
    maps = explain(model, x, t, CAM_METHODS, layer="feat")
    g = w[t].view(2, 3, 1, 1) / 20.0                         # constant gradient per channel
    cam = F.relu((g * x).sum(1))
    torch.testing.assert_close(maps["gradcam"], cam.float())
    torch.testing.assert_close(maps["layercam"], F.relu((F.relu(g) * x).sum(1)).float())
    g2, g3 = g ** 2, g ** 3
    denom = 2 * g2 + x.sum((2, 3), keepdim=True) * g3
    alpha = torch.where(denom != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)), torch.zeros_like(g2))
    wpp = (alpha * F.relu(g)).expand_as(x).sum((2, 3), keepdim=True)
    torch.testing.assert_close(maps["gradcam_pp"], F.relu((wpp * x).sum(1)).float())


def test_cam_upsampled_bilinear_from_last_conv_block():
    model = _cnn().eval()
    x = _x(H=32, W=24)
    assert find_default_layer(model, x) is model.features
    maps = explain(model, x, 1, ["gradcam"])
    assert maps["gradcam"].shape == (2, 32, 24)
    # same as naming the layer explicitly, as a module or a dotted name
    torch.testing.assert_close(maps["gradcam"], explain(model, x, 1, ["gradcam"], layer="features")["gradcam"])
    torch.testing.assert_close(maps["gradcam"], explain(model, x, 1, ["gradcam"], layer=model.features)["gradcam"])
    low = explain(model, x, 1, ["gradcam"], layer="features.5")["gradcam"]   # an earlier block differs
    assert low.shape == (2, 32, 24) and not torch.allclose(low, maps["gradcam"])


def test_default_layer_resnet_is_layer4():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=4)
    assert find_default_layer(model, torch.rand(1, 3, 64, 64)) is model.layer4


def test_cam_is_differentiable_with_create_graph():
    model = _cnn(act="softplus").eval()
    x = _x().requires_grad_(True)
    cam = gradcam(model, x, torch.tensor([0, 1]), create_graph=True)
    assert cam.requires_grad
    cam.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    # default: detached, nothing accumulated
    model.zero_grad(set_to_none=True)
    assert not gradcam(model, x.detach(), 0, method="layercam").requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_predicted_target_and_errors():
    model = _cnn().eval()
    x = _x()
    pred = model(x).argmax(1)
    torch.testing.assert_close(explain(model, x, None, ["saliency"])["saliency"],
                               explain(model, x, pred, ["saliency"])["saliency"])
    assert canonical_method("Grad-CAM++") == "gradcam_pp" and canonical_method("ig") == "integrated_gradients"
    with pytest.raises(ValueError, match="unknown explanation method"):
        explain(model, x, 0, ["occlusion"])
    with pytest.raises(ValueError, match="one class per image"):
        explain(model, x, torch.tensor([0, 1, 2]), ["saliency"])
    with pytest.raises(ValueError, match="no submodule"):
        explain(model, x, 0, ["gradcam"], layer="nope")
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        explain(model, x[0], 0, ["saliency"])
