"""Localization and faithfulness metrics on hand-built maps whose scores are known."""
import math

import pytest
import torch
from torch import nn

from sib_fast.evaluation import localization as L


def _mask_top_left(B=1, H=4, W=4, h=2, w=2):
    m = torch.zeros(B, H, W, dtype=torch.bool)
    m[:, :h, :w] = True
    return m


# ----------------------------------------------------------------------------- energy pointing game

def test_energy_pointing_game_known_values():
    mask = _mask_top_left(B=5)
    maps = torch.zeros(5, 4, 4)
    maps[0, 0, 0] = 3.0
    maps[0, 3, 3] = 1.0                  # 3 of 4 units inside
    maps[1] = 1.0                        # uniform: the area fraction 4/16
    maps[2, :2, :2] = 2.0
    maps[2, 3, :] = -5.0                 # negatives are clamped: all positive energy inside
    maps[3] = -1.0                       # no positive energy: 0
    maps[4, 2:, 2:] = 1.0                # all outside
    got = L.energy_pointing_game(maps, mask)
    assert got.dtype == torch.float32 and got.shape == (5,)
    torch.testing.assert_close(got, torch.tensor([0.75, 0.25, 1.0, 0.0, 0.0]))


def test_energy_pointing_game_scale_invariant_float_mask_and_channel_dim():
    mask = _mask_top_left(B=2).float().unsqueeze(1)       # (B, 1, H, W) float masks
    maps = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    a = L.energy_pointing_game(maps, mask)
    b = L.energy_pointing_game(maps * 1e-9, mask)          # no rescaling, but scale drops out
    assert a.dtype == torch.float64
    torch.testing.assert_close(a, b)
    expected = (maps[:, 0] * mask[:, 0]).sum((1, 2)) / maps.sum((1, 2, 3))
    torch.testing.assert_close(a, expected)


def test_boxes_to_masks_and_energy_on_boxes():
    m = L.boxes_to_masks(torch.tensor([[1, 0, 3, 2]]), 4, 5)  # x in [1, 3), y in [0, 2)
    expected = torch.zeros(1, 4, 5, dtype=torch.bool)
    expected[0, 0:2, 1:3] = True
    assert torch.equal(m, expected)
    maps = torch.ones(1, 4, 5)
    torch.testing.assert_close(L.energy_pointing_game(maps, m), torch.tensor([4 / 20]))


def test_shape_and_device_errors():
    with pytest.raises(ValueError, match="same shape"):
        L.energy_pointing_game(torch.rand(2, 4, 4), torch.ones(2, 4, 5))
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        L.pointing_game(torch.rand(4, 4), torch.ones(4, 4))
    with pytest.raises(TypeError, match="floating point"):
        L.topk_iou(torch.ones(1, 4, 4, dtype=torch.long), torch.ones(1, 4, 4))


# ----------------------------------------------------------------------------- pointing game

def test_pointing_game_hits_misses_and_tolerance():
    mask = torch.zeros(4, 8, 8, dtype=torch.bool)
    mask[:, 0:2, 0:2] = True
    maps = torch.zeros(4, 8, 8)
    maps[0, 1, 1] = 1.0                  # on the object
    maps[1, 1, 4] = 1.0                  # 3 px right of the object's edge column 1
    maps[2, 4, 4] = 1.0                  # distance sqrt(9 + 9) = 4.24 from pixel (1, 1)
    maps[3, 0, 0] = 1.0
    maps[3, 7, 7] = 1.0                  # a tie inside and outside: a miss
    torch.testing.assert_close(L.pointing_game(maps, mask), torch.tensor([1.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(L.pointing_game(maps, mask, tolerance=2.9), torch.tensor([1.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(L.pointing_game(maps, mask, tolerance=3), torch.tensor([1.0, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(L.pointing_game(maps, mask, tolerance=4.3), torch.tensor([1.0, 1.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="tolerance"):
        L.pointing_game(maps, mask, tolerance=-1)


def test_pointing_game_constant_and_negative_maps_miss():
    mask = _mask_top_left(B=3)
    maps = torch.stack([torch.ones(4, 4), -torch.rand(4, 4), torch.zeros(4, 4)])
    assert L.pointing_game(maps, mask).tolist() == [0.0, 0.0, 0.0]
    full = torch.ones(1, 4, 4, dtype=torch.bool)
    assert L.pointing_game(torch.ones(1, 4, 4), full).tolist() == [1.0]  # every maximum is on the object


def test_dilate_is_euclidean_disk():
    m = torch.zeros(1, 7, 7, dtype=torch.bool)
    m[0, 3, 3] = True
    d = L.dilate(m, 2)
    yy, xx = torch.meshgrid(torch.arange(7), torch.arange(7), indexing="ij")
    assert torch.equal(d[0], (yy - 3) ** 2 + (xx - 3) ** 2 <= 4)


# ----------------------------------------------------------------------------- top-k IoU

def test_topk_iou_known_values():
    mask = torch.zeros(1, 10, 10, dtype=torch.bool)
    mask[0, 0, :] = True                                       # 10 pixels = 10% of the image
    ranks = torch.arange(100, 0, -1, dtype=torch.float32).view(1, 10, 10)  # row 0 highest, then row 1 ...
    torch.testing.assert_close(L.topk_iou(ranks, mask, k=0.1), torch.tensor([1.0]))
    torch.testing.assert_close(L.topk_iou(ranks, mask, k=0.2), torch.tensor([0.5]))    # 10 / 20
    torch.testing.assert_close(L.topk_iou(ranks, mask, k=0.05), torch.tensor([0.5]))   # 5 / 10
    torch.testing.assert_close(L.topk_iou(ranks, mask, k="mask"), torch.tensor([1.0]))
    flipped = ranks.flip(1)                                    # the object ranked last
    torch.testing.assert_close(L.topk_iou(flipped, mask, k=0.1), torch.tensor([0.0]))


def test_topk_iou_ties_and_non_positive_pixels():
    mask = torch.zeros(3, 10, 10, dtype=torch.bool)
    mask[:, 0, :] = True
    maps = torch.zeros(3, 10, 10)
    maps[0, 0:2, :] = 1.0            # 20 tied pixels at the threshold of k=10%: all in -> 10/20
    maps[1, 0, :5] = 1.0             # only 5 positive pixels: the region is those 5 -> 5/10
    maps[2] = -1.0                   # nothing positive: empty region -> 0
    torch.testing.assert_close(L.topk_iou(maps, mask, k=0.1), torch.tensor([0.5, 0.5, 0.0]))
    with pytest.raises(ValueError, match="fraction"):
        L.topk_iou(maps, mask, k=0.0)
    with pytest.raises(ValueError, match="fraction"):
        L.topk_iou(maps, mask, k="area")


# ----------------------------------------------------------------------------- deletion / insertion

class ObjectFraction(nn.Module):
    """Softmax probability of class 0 = share of the object's pixels still equal to 1 (exactly)."""

    def __init__(self, mask):
        super().__init__()
        self.register_buffer("mask", mask.float())

    def forward(self, x):
        m = (x[:, 0] * self.mask).sum((1, 2)) / self.mask.sum()
        m = m.clamp(1e-12, 1 - 1e-12)
        return torch.stack([m.log(), (1 - m).log()], dim=1)


def test_deletion_insertion_known_curves():
    obj = torch.zeros(4, 4)
    obj[:2, :2] = 1.0                                          # 4 of 16 pixels: a quarter
    model = ObjectFraction(obj).train()
    x = torch.ones(2, 1, 4, 4)
    good = obj.expand(1, 4, 4) * 2 - 1                         # object first
    bad = -good                                                # object last
    maps = torch.cat([good, bad])
    out = L.deletion_insertion(model, x, maps, torch.zeros(2, dtype=torch.long), steps=4, baseline="zero",
                               return_curves=True)
    assert model.training                                      # mode restored
    torch.testing.assert_close(out["fractions"], torch.tensor([0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
    torch.testing.assert_close(out["deletion_curve"], torch.tensor([[1.0, 0, 0, 0, 0], [1.0, 1, 1, 1, 0]]),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(out["insertion_curve"], torch.tensor([[0.0, 1, 1, 1, 1], [0.0, 0, 0, 0, 1]]),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(out["deletion"], torch.tensor([0.125, 0.875]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out["insertion"], torch.tensor([0.875, 0.125]), atol=1e-6, rtol=0)
    # chunking the forward passes changes nothing
    small = L.deletion_insertion(model, x, maps, torch.zeros(2, dtype=torch.long), steps=4, baseline="zero",
                                 batch_size=1)
    torch.testing.assert_close(small["deletion"], out["deletion"])


def test_deletion_linear_model_gives_half():
    """p = mean of the image: removing pixels at a constant rate gives AUC 1/2 whatever the order."""
    class Mean(nn.Module):
        def forward(self, x):
            m = x.mean((1, 2, 3)).clamp(1e-12, 1 - 1e-12)
            return torch.stack([m.log(), (1 - m).log()], 1)

    x = torch.ones(3, 2, 6, 6)
    out = L.deletion_insertion(Mean(), x, torch.randn(3, 6, 6), torch.zeros(3, dtype=torch.long), steps=6,
                               baseline="zero")
    torch.testing.assert_close(out["deletion"], torch.full((3,), 0.5), atol=1e-6, rtol=0)
    torch.testing.assert_close(out["insertion"], torch.full((3,), 0.5), atol=1e-6, rtol=0)


def test_baselines_and_pixel_order():
    x = torch.rand(2, 3, 9, 9)
    torch.testing.assert_close(L.make_baseline(x, "mean"), x.mean((2, 3), keepdim=True).expand_as(x))
    assert torch.equal(L.make_baseline(x, "zero"), torch.zeros_like(x))
    const = torch.full((1, 3, 20, 20), 0.3)
    torch.testing.assert_close(L.make_baseline(const, "blur"), const)  # blur keeps constants (no dark border)
    tiny = torch.rand(1, 3, 3, 3)
    assert L.make_baseline(tiny, "blur").shape == tiny.shape
    with pytest.raises(ValueError, match="baseline"):
        L.make_baseline(x, "noise")
    # decreasing value; ties in a fixed order that is not row-major
    maps = torch.zeros(1, 4, 4)
    maps[0, 3, 3] = 2.0
    maps[0, 0, 1] = 1.0
    order = L.pixel_order(maps)
    assert order[0, :2].tolist() == [15, 1]
    assert torch.equal(order, L.pixel_order(maps))
    assert order[0, 2:].tolist() != [i for i in range(16) if i not in (15, 1)]


def test_mean_ci():
    m, lo, hi = L.mean_ci([0.5] * 10)
    assert (m, lo, hi) == (0.5, 0.5, 0.5)
    v = torch.rand(200, generator=torch.Generator().manual_seed(1))
    m, lo, hi = L.mean_ci(v)
    assert lo < m < hi and hi - lo < 0.2
    assert math.isclose(m, float(v.double().mean()))
    assert all(math.isnan(t) for t in L.mean_ci([]))
