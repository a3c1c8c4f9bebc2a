"""The images of ``sib-train`` and ``sib-eval``: the embedded ``SyntheticObjects`` dataset, the
normalisation statistics of each kind of data, and the skipping of unreadable image files.

``SyntheticObjects`` is an image-classification dataset with ground-truth foreground. Every
image is generated on the fly from ``(seed, split, index)``: nothing is downloaded and the same
index always gives the same image. The class is the shape of one foreground object (disk, square,
triangle, cross, ring, star) of random colour, scale, position and rotation, drawn on a cluttered
background (smooth coloured texture, random strokes, pixel noise). The object's pixel
mask comes with it, so one can measure how much of a saliency map falls on the object.

``spurious=p`` adds a background grating whose orientation tells the label, in the training
split only, with probability ``p`` (a random orientation otherwise, and always in the ``val``
split): a model that learns to read the background is caught out on ``val``.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

CLASSES = ("disk", "square", "triangle", "cross", "ring", "star")
SPLITS = {"train": 0, "val": 1, "test": 1}
DEFAULT_LENGTH = {"train": 2048, "val": 512, "test": 512}
SUPERSAMPLE = 2  # anti-aliasing of the object's edge
# (mean, std) per channel of the input normalisation, which sib-train applies on the device and
# sib-eval makes part of the explained model: synthetic images are in [0, 1]; ImageNet's statistics
SYNTHETIC_STATS = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _shape_inside(kind: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership of local coordinates (object radius 1) in shape ``kind``."""
    r = np.sqrt(u * u + v * v)
    if kind == 0:  # disk
        return r <= 0.95
    if kind == 1:  # square
        return np.maximum(np.abs(u), np.abs(v)) <= 0.75
    if kind == 2:  # equilateral triangle, circumradius 1
        inside = np.ones(u.shape, dtype=bool)
        for k in range(3):
            a = math.pi / 2 + 2 * math.pi * k / 3 + math.pi  # outward normals of the three sides
            inside &= (u * math.cos(a) + v * math.sin(a)) <= 0.5
        return inside
    if kind == 3:  # cross
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.95))
    if kind == 4:  # ring
        return (r <= 0.95) & (r >= 0.55)
    if kind == 5:  # five-pointed star
        theta = np.arctan2(v, u)
        return r <= 0.38 + 0.62 * np.abs(np.cos(2.5 * theta)) ** 3
    raise ValueError(kind)


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    k = (np.array([5.0, 3.0, 1.0]) + h * 6) % 6
    return (v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)).astype(np.float32)


def _downsample(a: np.ndarray) -> np.ndarray:
    """Mean over SUPERSAMPLE x SUPERSAMPLE blocks of the last two axes."""
    *lead, h, w = a.shape
    f = SUPERSAMPLE
    return a.reshape(*lead, h // f, f, w // f, f).mean(axis=(-3, -1))


class SyntheticObjects(Dataset):
    """Images of one shape on clutter; ``(image, label, mask)`` per item.

    Args:
        split: ``"train"`` or ``"val"`` (``"test"`` is an alias of ``"val"``).
        length: number of images (default 2048 for train, 512 for val).
        image_size: side of the square images (default 64).
        num_classes: 2 to 6 shape classes (default all 6).
        seed: the dataset seed; with split and index it fixes every pixel.
        spurious: probability in [0, 1] that a training image carries a background grating whose
            orientation encodes its label (0: no grating at all).
        clutter: strength of the background texture and number of strokes (0: plain, 1: default).
        return_mask: return ``(image, label, mask)`` (default) or ``(image, label)``.
        transform: applied to the image tensor.
        cache: keep rendered images in memory (per process: use with ``num_workers=0``).

    ``image`` is float32 (3, H, W) in [0, 1]; ``mask`` is float32 (1, H, W), 1 on the object.
    """

    def __init__(self, split: str = "train", length: int | None = None, image_size: int = 64,
                 num_classes: int = len(CLASSES), seed: int = 0, spurious: float = 0.0,
                 clutter: float = 1.0, return_mask: bool = True, transform=None, cache: bool = False):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        if not 2 <= int(num_classes) <= len(CLASSES):
            raise ValueError(f"num_classes must be in 2..{len(CLASSES)}, got {num_classes}")
        if not 8 <= int(image_size) <= 1024:
            raise ValueError(f"image_size must be in 8..1024, got {image_size}")
        if not 0.0 <= float(spurious) <= 1.0:
            raise ValueError(f"spurious must be a probability in [0, 1], got {spurious}")
        if not 0.0 <= float(clutter) <= 2.0:
            raise ValueError(f"clutter must be in [0, 2], got {clutter}")
        self.split = split
        self.length = DEFAULT_LENGTH[split] if length is None else int(length)
        if self.length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.image_size = int(image_size)
        self.num_classes = int(num_classes)
        self.classes = list(CLASSES[: self.num_classes])
        self.seed = int(seed)
        self.spurious = float(spurious)
        self.clutter = float(clutter)
        self.return_mask = return_mask
        self.transform = transform
        self._grid = self._make_grid(self.image_size)                   # pixel centres in [-1, 1]
        self._fine = self._make_grid(self.image_size * SUPERSAMPLE)     # for the object's edge
        self._cache: dict = {} if cache else None

    @staticmethod
    def _make_grid(n: int):
        c = ((np.arange(n, dtype=np.float32) + 0.5) / n * 2 - 1).astype(np.float32)
        return np.meshgrid(c, c, indexing="ij")

    def __len__(self) -> int:
        return self.length

    def label(self, index: int) -> int:
        """The label of image ``index`` (classes are balanced: index modulo num_classes)."""
        return int(index) % self.num_classes

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, SPLITS[self.split], index])

    def __getitem__(self, index: int):
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of {self.length} images")
        index = int(index) % self.length
        if self._cache is not None and index in self._cache:
            image, label, mask = self._cache[index]
        else:
            image, label, mask = self.render(index)
            if self._cache is not None:
                self._cache[index] = (image, label, mask)
        if self.transform is not None:
            image = self.transform(image)
        return (image, label, mask) if self.return_mask else (image, label)

    def render(self, index: int):
        """``(image, label, mask)`` of image ``index``, before ``transform`` (NumPy: no torch threads)."""
        rng = self._rng(index)

        def rand(*shape):
            return rng.random(shape, dtype=np.float32) if shape else float(rng.random())

        label = self.label(index)
        yy, xx = self._grid
        # background: base colour and a few smooth coloured waves
        bg = np.broadcast_to(rand(3, 1, 1) * 0.6 + 0.2, (3, *xx.shape)).copy()
        for _ in range(4):
            freq = 1 + 3 * rand()
            ang = 2 * math.pi * rand()
            phase = 2 * math.pi * rand()
            wave = np.sin(math.pi * freq * (xx * math.cos(ang) + yy * math.sin(ang)) + phase)
            bg += (rand(3, 1, 1) - 0.5) * 0.3 * self.clutter * wave
        # spurious cue: a fine grating whose orientation encodes the label (train split only)
        if self.spurious > 0:
            if self.split == "train" and rand() < self.spurious:
                ang = math.pi * label / self.num_classes
            else:
                ang = math.pi * rand()
            bg += 0.12 * np.sin(2 * math.pi * 6 * (xx * math.cos(ang) + yy * math.sin(ang)))
        # clutter: random strokes
        for _ in range(round(5 * self.clutter)):
            p0 = rand(2) * 2 - 1
            d = rand(2) - 0.5
            width = 0.02 + 0.04 * rand()
            t = np.clip(((xx - p0[0]) * d[0] + (yy - p0[1]) * d[1]) / (d @ d + 1e-6), 0, 1)
            dist = np.sqrt((xx - p0[0] - t * d[0]) ** 2 + (yy - p0[1] - t * d[1]) ** 2)
            bg = np.where(dist <= width, rand(3, 1, 1), bg)
        # the object: shape, scale, position, rotation, colour with a little shading
        scale = 0.28 + 0.2 * rand()
        cx, cy = (rand(2) * 2 - 1) * (0.9 - scale)
        rot = 2 * math.pi * rand()
        cos, sin = math.cos(rot), math.sin(rot)

        def local(gy, gx):
            du, dv = (gx - cx) / scale, (gy - cy) / scale
            return du * cos + dv * sin, -du * sin + dv * cos

        inside = _shape_inside(label, *local(*self._fine)).astype(np.float32)
        u, _ = local(yy, xx)
        colour = _hsv_to_rgb(rand(), 0.6 + 0.4 * rand(), 0.55 + 0.45 * rand())
        if np.abs(colour - bg.mean(axis=(1, 2))).max() < 0.3:  # keep the object visible
            colour = 1.0 - colour
        fg = colour[:, None, None] * (0.85 + 0.15 * np.clip(u, -1, 1))
        alpha = _downsample(inside)[None]  # (1, H, W) coverage
        img = bg * (1 - alpha) + fg * alpha
        img = img + 0.03 * rng.standard_normal(img.shape, dtype=np.float32)
        image = torch.from_numpy(np.clip(img, 0, 1).astype(np.float32))
        return image, label, torch.from_numpy((alpha > 0.5).astype(np.float32))

    def __repr__(self) -> str:
        return (f"SyntheticObjects(split={self.split!r}, length={self.length}, image_size={self.image_size}, "
                f"num_classes={self.num_classes}, seed={self.seed}, spurious={self.spurious})")


# ----------------------------------------------------------------------------- unreadable image files

# At ImageNet scale a few damaged files must not end a long run: each unreadable image is skipped
# and named, and the run stops only when there are more than this many distinct ones (0: at the
# first). 100 is 0.008% of ImageNet's 1.28M training images: a handful of bad downloads pass,
# a broken copy or mount (thousands) stops within minutes.
DEFAULT_MAX_BAD_IMAGES = 100


class BadImageError(Exception):
    """An image file that cannot be decoded: ``path`` and ``reason``."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


def read_image(path, mode: str = "RGB"):
    """The PIL image at ``path`` converted to ``mode``, or ``BadImageError`` naming the file.
    Decoding is forced here (``convert`` reads every pixel), so a truncated file fails now, not later."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert(mode)
    except UnidentifiedImageError:
        raise BadImageError(path, "not an image file that PIL recognises") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        # PIL reports bad data as OSError (truncated...), SyntaxError (broken PNG), ...
        raise BadImageError(path, f"{type(exc).__name__}: {exc}") from None


class SkippedImage:
    """What ``SkipBadImages`` returns in place of an unreadable item; ``skip_bad_collate`` drops it."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason


class SkipBadImages(Dataset):
    """``dataset[i]``, or a ``SkippedImage`` when its file raises ``BadImageError``. In the dataset,
    so that it happens inside DataLoader workers, which would otherwise die."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        try:
            return self.dataset[index]
        except BadImageError as exc:
            return SkippedImage(exc.path, exc.reason)

    def __getattr__(self, name):  # .classes, .samples... of the wrapped ImageFolder
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def skip_bad_collate(items):
    """``(images, labels, masks or None, [(path, reason) of skipped files])``: the default collate of
    the readable items; the list travels with the batch from the worker to the main process."""
    from torch.utils.data import default_collate

    bad = [(it.path, it.reason) for it in items if isinstance(it, SkippedImage)]
    good = [it for it in items if not isinstance(it, SkippedImage)]
    if not good:
        return None, None, None, bad
    batch = default_collate(good)
    return batch[0], batch[1], batch[2] if len(batch) > 2 else None, bad
