"""``SyntheticObjects``: deterministic, labelled by shape, with the object's mask, and the spurious cue."""
import math

import pytest
import torch
from torch.utils.data import DataLoader

from sib_fast.training.data import CLASSES, SyntheticObjects


def test_items_have_the_documented_types_and_ranges():
    ds = SyntheticObjects("train", length=12, image_size=32)
    assert len(ds) == 12 and ds.classes == list(CLASSES) and ds.num_classes == 6
    for i in range(len(ds)):
        image, label, mask = ds[i]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert mask.shape == (1, 32, 32) and set(mask.unique().tolist()) <= {0.0, 1.0}
        assert 0.01 < mask.mean() < 0.4, "the object is visible and smaller than the image"
        assert label == i % 6
    assert [ds[i][1] for i in range(12)].count(0) == 2, "classes are balanced"
    image, label = SyntheticObjects("val", length=3, image_size=16, return_mask=False)[2]
    assert image.shape == (3, 16, 16) and label == 2


def test_deterministic_by_seed_split_and_index():
    a = SyntheticObjects("train", length=8, image_size=24, seed=3)
    b = SyntheticObjects("train", length=8, image_size=24, seed=3)
    for i in (0, 5, -1):
        assert all(torch.equal(u, v) if torch.is_tensor(u) else u == v for u, v in zip(a[i], b[i]))
    assert not torch.equal(a[0][0], SyntheticObjects("train", length=8, image_size=24, seed=4)[0][0])
    assert not torch.equal(a[0][0], SyntheticObjects("val", length=8, image_size=24, seed=3)[0][0])
    assert not torch.equal(a[0][0], a[6][0]), "same label, different image"
    cached = SyntheticObjects("train", length=8, image_size=24, seed=3, cache=True)
    assert torch.equal(cached[2][0], a[2][0]) and torch.equal(cached[2][0], cached[2][0])


def test_same_batches_with_worker_processes():
    ds = SyntheticObjects("train", length=8, image_size=16)
    inline = next(iter(DataLoader(ds, batch_size=8)))
    workers = next(iter(DataLoader(ds, batch_size=8, num_workers=1)))
    for u, v in zip(inline, workers):
        assert torch.equal(u, v)


def test_object_pixels_differ_from_the_background():
    """The mask marks the object: its pixels are far more uniform than the clutter around it."""
    ds = SyntheticObjects("train", length=24, image_size=64, clutter=1.0)
    spread_in, spread_out = [], []
    for image, _, mask in ds:
        m = mask[0].bool()
        spread_in.append(image[:, m].std(dim=1).mean())
        spread_out.append(image[:, ~m].std(dim=1).mean())
    assert torch.stack(spread_in).mean() < 0.5 * torch.stack(spread_out).mean()


def _grating_angle(image, mask):
    """Orientation in [0, pi) of the strongest fine periodic pattern of the background."""
    g = (image.mean(0) - image.mean()) * (1 - mask[0])
    n = g.shape[0]
    power = torch.fft.fftshift(torch.fft.fft2(g).abs() ** 2)
    f = torch.arange(n) - n // 2
    fy, fx = torch.meshgrid(f, f, indexing="ij")
    radius = torch.sqrt(fx.float() ** 2 + fy.float() ** 2)
    power[(radius < 9) | (radius > 15)] = 0  # the grating has 12 cycles per image; the waves at most 4
    k = int(power.argmax())
    return math.atan2(float(fy.flatten()[k]), float(fx.flatten()[k])) % math.pi


def _angle_error(a, b):
    d = abs(a - b) % math.pi
    return min(d, math.pi - d)


def test_spurious_cue_encodes_the_label_in_train_only():
    k = 6
    train = SyntheticObjects("train", length=24, image_size=64, spurious=1.0)
    val = SyntheticObjects("val", length=24, image_size=64, spurious=1.0)
    train_err = [_angle_error(_grating_angle(img, m), math.pi * y / k) for img, y, m in train]
    val_err = [_angle_error(_grating_angle(img, m), math.pi * y / k) for img, y, m in val]
    assert max(train_err) < 0.15, train_err
    assert sum(e > 0.3 for e in val_err) >= 12, "in val the grating is random, not the label's"


@pytest.mark.parametrize("kwargs, word", [
    (dict(split="test2"), "split"), (dict(num_classes=7), "num_classes"), (dict(num_classes=1), "num_classes"),
    (dict(spurious=1.5), "spurious"), (dict(length=0), "length"), (dict(image_size=4), "image_size"),
    (dict(clutter=-1.0), "clutter"),
])
def test_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        SyntheticObjects(**kwargs)


def test_index_out_of_range():
    with pytest.raises(IndexError):
        SyntheticObjects("val", length=3)[3]


# --------------------------------------------------------------------------- unreadable image files

def test_unreadable_files_are_named_and_skipped_by_the_collate(tmp_path):
    from PIL import Image
    import numpy as np
    from sib_fast.training.data import BadImageError, SkipBadImages, read_image, skip_bad_collate

    good = tmp_path / "good.jpg"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(good)
    truncated = tmp_path / "truncated.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:2000])
    text = tmp_path / "text.jpg"
    text.write_text("hello\n")
    assert read_image(good).size == (8, 8)
    for path in (truncated, text):
        with pytest.raises(BadImageError) as info:
            read_image(path)
        assert info.value.path == str(path) and str(path) in str(info.value) and info.value.reason

    class Files(torch.utils.data.Dataset):
        paths = [good, truncated, good, text]

        def __len__(self):
            return len(self.paths)

        def __getitem__(self, i):
            img = read_image(self.paths[i])
            return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1), i

    batches = list(DataLoader(SkipBadImages(Files()), batch_size=2, num_workers=1, collate_fn=skip_bad_collate))
    assert [b[0].shape[0] for b in batches] == [1, 1] and [b[1].tolist() for b in batches] == [[0], [2]]
    assert [[p for p, _ in b[3]] for b in batches] == [[str(truncated)], [str(text)]]
    assert all(b[2] is None for b in batches)
    x, y, mask, bad = skip_bad_collate([SkipBadImages(Files())[1]])
    assert x is None and y is None and bad[0][0] == str(truncated)
