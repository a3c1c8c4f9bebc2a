"""What ``sib-eval`` explains: the checkpoints (each rebuilt with its training normalisation in
front, so that it is explained on pixel values) and the images with their ground-truth masks,
synthetic or from a folder in one of the layouts of ``sib_fast.datasets`` (mask files, or boxes
made masks in the evaluation view)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sib_fast.cli_errors import UsageError
from sib_fast.datasets import evaluation_set, folder
from sib_fast.datasets.boxes import boxes_mask, view
from sib_fast.datasets.common import EvalItem, EvalSet
from sib_fast.evaluation import PROG
from sib_fast.training.checkpoint import CHECKPOINT, EVAL_KEYS, load_checkpoint
from sib_fast.training.data import (DEFAULT_MAX_BAD_IMAGES, IMAGENET_STATS, SYNTHETIC_STATS, BadImageError,
                                    SyntheticObjects, read_image)
from sib_fast.training.history import METRICS, read_metrics
from sib_fast.training.models import build_model


class Normalized(nn.Module):
    """``model((x - mean) / std)``: explains the model on pixel values as ``sib-train`` feeds it."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return self.model((x - self.mean) / self.std)


def load_run(spec: str, log=print) -> dict:
    """Checkpoint ``spec`` (``[LABEL=]PATH``, a file or a run folder): model, args, metrics."""
    label = None
    if "=" in spec and not Path(spec).exists():  # LABEL=PATH: split at the "=" after which a path exists
        cuts = [i for i, ch in enumerate(spec) if ch == "="]
        i = next((i for i in cuts if Path(spec[i + 1:]).exists()), cuts[0])
        label, spec = spec[:i], spec[i + 1:]
    path = Path(spec)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise UsageError(f"no checkpoint at {path} (pass a sib-train checkpoint.pt or its output folder)")
    ckpt = load_checkpoint(path, EVAL_KEYS)  # the same checks as sib-train --resume
    args = dict(ckpt["args"])
    records = read_metrics(path.parent / METRICS, warn=lambda line: log(f"{PROG}: warning: {line}"))
    mode = "baseline" if args.get("no_sib") else "S-IB"
    return dict(label=label, group=label or mode, mode=mode, path=path, args=args, state=ckpt["model"],
                epoch=ckpt.get("epoch"), records=records)


def build(run: dict, num_classes: int, device: torch.device) -> nn.Module:
    """The model of ``load_run``'s checkpoint with its training normalisation in front, in eval mode."""
    a = run["args"]
    try:
        model = build_model(a.get("arch", "sib_cnn"), num_classes, a.get("image_size", 64))
        model.load_state_dict(run["state"])
    except (ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise UsageError(f"{run['path']}: cannot rebuild {a.get('arch')!r} with {num_classes} classes: {first}") from None
    stats = SYNTHETIC_STATS if a.get("data", "synthetic") == "synthetic" else IMAGENET_STATS
    return Normalized(model, *stats).to(device).eval()


def _tensor(img, mask_threshold: int | None = None) -> torch.Tensor:
    """(3, S, S) in [0, 1] of an RGB view, or (1, S, S) 0/1 of a mask view (``> mask_threshold``)."""
    import numpy as np

    a = torch.from_numpy(np.asarray(img, dtype=np.float32).copy())
    if mask_threshold is not None:
        return (a > mask_threshold).float().unsqueeze(0)
    return (a / 255.0).permute(2, 0, 1)


def load_item(item: EvalItem, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, mask) of one evaluation item in the evaluation view (``sib_fast.datasets.boxes.view``:
    sib-train's validation view); boxes become the mask of their union in that view. An undecodable
    file raises ``BadImageError`` naming it, a box outside the image a UsageError naming its line."""
    img = read_image(item.image, "RGB")
    x = _tensor(view(img, size))
    if item.mask is not None:
        return x, _tensor(view(read_image(item.mask, "L"), size, mask=True), item.threshold)
    return x, boxes_mask(item.boxes(), img.width, img.height, size)


def load_items(eval_set: EvalSet, size: int, n: int, max_bad: int = DEFAULT_MAX_BAD_IMAGES, log=print,
               where: str = ""):
    """(images (N,3,S,S), labels (N,), masks (N,1,S,S), image paths, skipped) of ``n`` items of
    ``eval_set`` (0: all). An image whose file or mask cannot be read is skipped, named once and listed
    in ``skipped`` as (path, reason); more than ``max_bad`` of them is a UsageError."""
    items = eval_set.items
    # a fixed, class-mixed subset of n readable images: in a fixed random order, the next one replaces a bad one
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(0)).tolist() if n else range(len(items))
    loaded, skipped = [], []
    for i in order:
        if n and len(loaded) == n:
            break
        item = items[i]
        try:
            loaded.append((i, *load_item(item, size), item.label))
        except BadImageError as exc:
            skipped.append((exc.path, exc.reason))
            log(f"{PROG}: warning: skipped unreadable {'mask' if exc.path == str(item.mask) else 'image'} {exc.path} "
                f"({exc.reason})")
            if len(skipped) > max_bad:
                names = ", ".join(p for p, _ in skipped[:10]) + (" ..." if len(skipped) > 10 else "")
                raise UsageError(f"--data {where}: more than --max-bad-images {max_bad} unreadable files: {names}; "
                                 "repair or remove them (or raise --max-bad-images)") from None
    if not loaded:
        raise UsageError(f"--data {where}: no readable image")
    loaded.sort(key=lambda t: t[0])
    xs = torch.stack([x for _, x, _, _ in loaded])
    ms = torch.stack([m for _, _, m, _ in loaded])
    ys = torch.tensor([c for _, _, _, c in loaded])
    return xs, ys, ms, [str(items[i].image) for i, _, _, _ in loaded], skipped


def load_folder(root: Path, size: int, n: int, max_bad: int = DEFAULT_MAX_BAD_IMAGES, log=print):
    """(images (N,3,S,S), labels (N,), masks (N,1,S,S), classes, image paths, skipped) from DIR/images
    and DIR/masks (``load_items`` of the generic layout)."""
    img_root, mask_root = root / "images", root / "masks"
    if not img_root.is_dir() or not mask_root.is_dir():
        raise UsageError(f"--data {root}: expected {img_root}/CLASS/NAME.jpg and {mask_root}/CLASS/NAME.png")
    eval_set = folder.evaluation_set(root)
    xs, ys, ms, names, skipped = load_items(eval_set, size, n, max_bad, log, str(root))
    return xs, ys, ms, eval_set.classes, names, skipped


def load_data(args, runs, log=print):
    """The evaluation images, labels, masks, class names, a one-line description, and what was left
    out: {"unreadable": [(path, reason)], "empty_mask": [image]} (an empty ground-truth mask makes
    every localisation score 0, so such an image is left out of every mean, with one warning)."""
    sizes = {r["args"].get("image_size", 64) for r in runs}
    if len(sizes) > 1:
        raise UsageError(f"the checkpoints were trained at different image sizes {sorted(sizes)}")
    size = args.image_size or sizes.pop()
    if args.data == "synthetic":
        ncls = {r["args"].get("num_classes", 6) for r in runs}
        if len(ncls) > 1:
            raise UsageError(f"the checkpoints have different numbers of classes {sorted(ncls)}")
        spur = args.spurious if args.spurious is not None else max(r["args"].get("spurious", 0.0) for r in runs)
        ds = SyntheticObjects("val", length=args.num_images, image_size=size, num_classes=ncls.pop(),
                              seed=args.data_seed, spurious=spur)
        items = [ds[i] for i in range(len(ds))]
        xs = torch.stack([it[0] for it in items])
        ys = torch.tensor([it[1] for it in items])
        ms = torch.stack([it[2] for it in items])
        desc = (f"SyntheticObjects val split, seed {args.data_seed}, {len(ds)} images of {size}px, "
                f"{ds.num_classes} classes, background grating {'at random orientation' if spur else 'absent'}")
        names, skipped, classes = [f"synthetic val #{i}" for i in range(len(ds))], [], ds.classes
    else:
        root = Path(args.data)
        if not root.is_dir():
            raise UsageError(f"--data {args.data!r}: no such folder (use 'synthetic' or a folder in one of the "
                             "layouts of docs/reproducing.md)")
        eval_set = evaluation_set(args)
        xs, ys, ms, names, skipped = load_items(eval_set, size, args.num_images, args.max_bad_images, log, str(root))
        classes = eval_set.classes
        desc = (f"{eval_set.name}: {len(xs)} images of {size}px, {len(classes)} classes; "
                f"ground truth: {eval_set.truth}")
    empty = ms.flatten(1).amax(1) <= 0
    left_out = dict(unreadable=[list(t) for t in skipped], empty_mask=[n for n, e in zip(names, empty.tolist()) if e])
    if left_out["empty_mask"]:
        k = len(left_out["empty_mask"])
        if k == len(names):
            raise UsageError(f"--data {args.data}: every ground-truth mask is empty (first: {names[0]})")
        log(f"{PROG}: warning: {k} image(s) have an empty ground-truth mask (first: {left_out['empty_mask'][0]}); "
            "left out of the evaluation (listed in results.json)")
        keep = ~empty
        xs, ys, ms = xs[keep], ys[keep], ms[keep]
        desc = desc.replace(f"{len(names)} images", f"{len(xs)} images")
    return xs, ys, ms, classes, desc, left_out
