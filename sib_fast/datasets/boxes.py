"""Ground truth for the localisation metrics: the evaluation view of an image (the shorter side to
size*256/224, a centre crop of ``size``: ``sib-train``'s validation view), and the mask that a list
of boxes becomes in that view.

A ``Box`` is in continuous pixel coordinates of the original image, 0-based, ``x1``/``y1`` past
the last pixel: the CUB box ``x y w h`` is ``(x, y, x + w, y + h)``, the PASCAL VOC box (Stanford
Dogs, ImageNet) with inclusive 1-based corners ``xmin..xmax`` is ``(xmin - 1, ymin - 1, xmax,
ymax)``. A view pixel is on the object when its centre lies in one of the image's boxes (their
union), after the same resize and crop as the image. A box may overrun the image by one pixel
(the datasets differ on 0- or 1-based corners; such a box is clipped); more is an error naming
the annotation's file and line."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sib_fast.cli_errors import UsageError

OVERRUN = 1.0  # pixels a box may pass the image's edge (0- vs 1-based corners)


@dataclass(frozen=True)
class Box:
    """``(x0, y0, x1, y1)`` as in the module docstring, and ``where`` it was read (``FILE, line N``)."""
    x0: float
    y0: float
    x1: float
    y1: float
    where: str

    def __post_init__(self):
        if not all(map(math.isfinite, (self.x0, self.y0, self.x1, self.y1))):
            raise UsageError(f"{self.where}: a box corner is not a finite number")
        if not (self.x0 < self.x1 and self.y0 < self.y1):
            raise UsageError(f"{self.where}: the box ({self.x0:g}, {self.y0:g}, {self.x1:g}, {self.y1:g}) is empty "
                             "or its corners are swapped")


def checked(box: Box, width: int, height: int) -> Box:
    """``box`` clipped to a ``width`` x ``height`` image; UsageError when it lies outside it."""
    if box.x0 < -OVERRUN or box.y0 < -OVERRUN or box.x1 > width + OVERRUN or box.y1 > height + OVERRUN:
        raise UsageError(f"{box.where}: the box ({box.x0:g}, {box.y0:g}, {box.x1:g}, {box.y1:g}) lies outside the "
                         f"{width}x{height} image")
    clipped = Box(max(box.x0, 0.0), max(box.y0, 0.0), min(box.x1, float(width)), min(box.y1, float(height)), box.where)
    return clipped


def view_geometry(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """(resized width, resized height, left, top) of the evaluation view of a width x height image."""
    short = round(size * 256 / 224)
    scale = short / min(width, height)
    nw, nh = max(size, round(width * scale)), max(size, round(height * scale))
    return nw, nh, (nw - size) // 2, (nh - size) // 2


def view(img, size: int, mask: bool = False):
    """The evaluation view of a PIL image (nearest-neighbour for a mask, bilinear for an image)."""
    from PIL import Image

    nw, nh, left, top = view_geometry(*img.size, size)
    img = img.resize((nw, nh), Image.NEAREST if mask else Image.BILINEAR)
    return img.crop((left, top, left + size, top + size))


def boxes_mask(boxes: list[Box], width: int, height: int, size: int) -> torch.Tensor:
    """(1, size, size) float mask: 1 where a view pixel's centre lies in one of ``boxes`` (checked
    against the width x height image first)."""
    nw, nh, left, top = view_geometry(width, height, size)
    sx, sy = nw / width, nh / height
    centres = torch.arange(size, dtype=torch.float64) + 0.5
    out = torch.zeros(size, size, dtype=torch.bool)
    for b in boxes:
        b = checked(b, width, height)
        xs = (centres >= b.x0 * sx - left) & (centres < b.x1 * sx - left)
        ys = (centres >= b.y0 * sy - top) & (centres < b.y1 * sy - top)
        out |= ys.view(-1, 1) & xs.view(1, -1)
    return out.float().unsqueeze(0)
