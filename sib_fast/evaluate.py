"""``sib-eval``: compare the explanations of ``sib-train`` checkpoints against ground-truth masks
(also ``python -m sib_fast.evaluate``).

    sib-eval runs/baseline runs/sib --output report            # synthetic data, as trained
    sib-eval base=runs/baseline sib=runs/sib --data DIR --quick

Each positional argument is a checkpoint (``checkpoint.pt``) or the ``sib-train`` output folder
holding it, optionally ``LABEL=PATH``. The dataset is ``synthetic`` (the embedded
``SyntheticObjects`` validation split at the checkpoints' image size, classes and spurious-cue
setting; it never overlaps a training split) or a folder ``DIR`` with ``DIR/images/CLASS/NAME.EXT``
(class folders as in the ImageFolder the model was trained on) and ``DIR/masks/CLASS/NAME.png``
(non-zero = object). Every model is explained on the same images, in pixel space ([0, 1] values;
the training normalisation is part of the explained model), for the true class by default.

The report folder gets ``report.md`` (one table per metric: method x model, mean and 95%
bootstrap interval over images, accuracy beside it; and, when several checkpoints share a label
or training mode, a table over them), ``results.json`` (every per-image score), one
``grid_<method>.png`` per method (input, mask, each model's map) and ``training_curves.png``
(HSIC and BG of every run from its ``metrics.jsonl``, on one plot).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from sib_fast.evaluation import localization as L
from sib_fast.training.checkpoint import EVAL_KEYS, load_checkpoint
from sib_fast.cli_errors import OutputError, UsageError, atomic_write, atomic_write_text, check_output_dir
from sib_fast.training.data import DEFAULT_MAX_BAD_IMAGES, BadImageError, read_image
from sib_fast.evaluation.explain import CAPTUM_METHODS, METHODS, SIGNED, canonical_method, explain

PROG = "sib-eval"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
METRICS = (  # key, title, better
    ("energy_pg", "Energy pointing game", "higher"),
    ("pointing_game", "Pointing game", "higher"),
    ("topk_iou", "Top-k IoU", "higher"),
    ("deletion", "Deletion AUC", "lower"),
    ("insertion", "Insertion AUC", "higher"),
)
QUICK = dict(num_images=8, ig_steps=8, smoothgrad_samples=4, steps=8, grid_images=4, n_boot=500)
FULL = dict(num_images=128, ig_steps=32, smoothgrad_samples=16, steps=20, grid_images=6, n_boot=2000)


class Normalized(nn.Module):
    """``model((x - mean) / std)``: explains the model on pixel values as ``sib-train`` feeds it."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return self.model((x - self.mean) / self.std)


# ----------------------------------------------------------------------------- inputs

def _stats(synthetic: bool):
    try:
        from sib_fast.train import IMAGENET_STATS, SYNTHETIC_STATS
    except ImportError:  # keep in step with sib_fast/train.py
        SYNTHETIC_STATS = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    return SYNTHETIC_STATS if synthetic else IMAGENET_STATS


def _read_records(path: Path, log) -> list[dict]:
    """metrics.jsonl beside a checkpoint, for the training curves; what cannot be read is said, not hidden."""
    if not path.exists():
        return []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        log(f"{PROG}: warning: cannot read {path} ({exc}); no training curves for this run")
        return []
    records, bad = [], 0
    for line in lines:
        if line.strip():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                r = None
            if isinstance(r, dict):
                records.append(r)
            else:
                bad += 1
    if bad:
        log(f"{PROG}: warning: {path}: {bad} line(s) are not metrics records; the training curves leave them out")
    return records


def load_run(spec: str, device: torch.device, log=print) -> dict:
    """Checkpoint ``spec`` (``[LABEL=]PATH``, a file or a run folder): model, args, metrics."""
    label = None
    if "=" in spec and not Path(spec).exists():  # LABEL=PATH: split at the "=" after which a path exists
        cuts = [i for i, ch in enumerate(spec) if ch == "="]
        i = next((i for i in cuts if Path(spec[i + 1:]).exists()), cuts[0])
        label, spec = spec[:i], spec[i + 1:]
    path = Path(spec)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise UsageError(f"no checkpoint at {path} (pass a sib-train checkpoint.pt or its output folder)")
    ckpt = load_checkpoint(path, EVAL_KEYS)  # the same checks as sib-train --resume
    args = dict(ckpt["args"])
    records = _read_records(path.parent / "metrics.jsonl", log)
    mode = "baseline" if args.get("no_sib") else "S-IB"
    return dict(label=label, group=label or mode, mode=mode, path=path, args=args, state=ckpt["model"],
                epoch=ckpt.get("epoch"), records=records)


def build(run: dict, num_classes: int, device: torch.device) -> nn.Module:
    from sib_fast.training.models import build_model
    a = run["args"]
    try:
        model = build_model(a.get("arch", "sib_cnn"), num_classes, a.get("image_size", 64))
        model.load_state_dict(run["state"])
    except (ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise UsageError(f"{run['path']}: cannot rebuild {a.get('arch')!r} with {num_classes} classes: {first}") from None
    stats = _stats(a.get("data", "synthetic") == "synthetic")
    return Normalized(model, *stats).to(device).eval()


def _load_image(path: Path, size: int, mask: bool):
    """Resize the shorter side to size*256/224, centre-crop ``size`` (sib-train's validation view).
    An undecodable file raises ``BadImageError`` naming it."""
    from PIL import Image
    import numpy as np

    img = read_image(path, "L" if mask else "RGB")
    w, h = img.size
    short = round(size * 256 / 224)
    scale = short / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.NEAREST if mask else Image.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    a = torch.from_numpy(np.asarray(img, dtype=np.float32).copy())
    if mask:
        return (a > 0).float().unsqueeze(0)
    return (a / 255.0).permute(2, 0, 1)


def load_folder(root: Path, size: int, n: int, max_bad: int = DEFAULT_MAX_BAD_IMAGES, log=print):
    """(images (N,3,S,S), labels (N,), masks (N,1,S,S), classes, image paths, skipped) from DIR/images
    and DIR/masks. An image whose file or mask cannot be read is skipped, named once and listed in
    ``skipped`` as (path, reason); more than ``max_bad`` of them is a UsageError."""
    img_root, mask_root = root / "images", root / "masks"
    if not img_root.is_dir() or not mask_root.is_dir():
        raise UsageError(f"--data {root}: expected {img_root}/CLASS/NAME.jpg and {mask_root}/CLASS/NAME.png")
    try:
        classes = sorted(d.name for d in img_root.iterdir() if d.is_dir())
        if not classes:
            raise UsageError(f"--data {root}: {img_root} has no class folders")
        items = []
        for ci, c in enumerate(classes):
            for f in sorted((img_root / c).iterdir()):
                if f.suffix.lower() in IMAGE_EXTS:
                    m = mask_root / c / (f.stem + ".png")
                    if not m.is_file():
                        raise UsageError(f"--data {root}: no mask {m} for image {f}")
                    items.append((f, ci, m))
    except OSError as exc:  # an unreadable folder
        raise UsageError(f"--data {root}: cannot list {exc.filename}: {exc.strerror or exc}") from None
    if not items:
        raise UsageError(f"--data {root}: no images under {img_root}")
    # a fixed, class-mixed subset of n readable images: in a fixed random order, the next one replaces a bad one
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(0)).tolist() if n else range(len(items))
    loaded, skipped = [], []
    for i in order:
        if n and len(loaded) == n:
            break
        f, c, m = items[i]
        try:
            loaded.append((i, _load_image(f, size, False), c, _load_image(m, size, True)))
        except BadImageError as exc:
            skipped.append((exc.path, exc.reason))
            log(f"{PROG}: warning: skipped unreadable {'mask' if exc.path == str(m) else 'image'} {exc.path} "
                f"({exc.reason})")
            if len(skipped) > max_bad:
                names = ", ".join(p for p, _ in skipped[:10]) + (" ..." if len(skipped) > 10 else "")
                raise UsageError(f"--data {root}: more than --max-bad-images {max_bad} unreadable files: {names}; "
                                 "repair or remove them (or raise --max-bad-images)") from None
    if not loaded:
        raise UsageError(f"--data {root}: no readable image under {img_root}")
    loaded.sort(key=lambda t: t[0])
    xs = torch.stack([x for _, x, _, _ in loaded])
    ms = torch.stack([m for _, _, _, m in loaded])
    ys = torch.tensor([c for _, _, c, _ in loaded])
    return xs, ys, ms, classes, [str(items[i][0]) for i, _, _, _ in loaded], skipped


def load_data(args, runs, log=print):
    """The evaluation images, labels, masks, class names, a one-line description, and what was left
    out: {"unreadable": [(path, reason)], "empty_mask": [image]} (an empty ground-truth mask makes
    every localisation score 0, so such an image is left out of every mean, with one warning)."""
    sizes = {r["args"].get("image_size", 64) for r in runs}
    if len(sizes) > 1:
        raise UsageError(f"the checkpoints were trained at different image sizes {sorted(sizes)}")
    size = args.image_size or sizes.pop()
    if args.data == "synthetic":
        from sib_fast.training.data import SyntheticObjects
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
            raise UsageError(f"--data {args.data!r}: no such folder (use 'synthetic' or DIR with images/ and masks/)")
        xs, ys, ms, classes, names, skipped = load_folder(root, size, args.num_images, args.max_bad_images, log)
        desc = f"{root.name}: {len(xs)} images of {size}px, {len(classes)} classes"
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


# ----------------------------------------------------------------------------- evaluation

def evaluate_model(model, xs, ys, ms, args, log) -> tuple[dict, dict, torch.Tensor]:
    """Per-image scores {method: {metric: (N,)}}, maps of the first grid images, predictions."""
    dev = next(model.parameters()).device
    scores = {m: {k: [] for k, _, _ in METRICS} for m in args.methods}
    grid_maps = {m: [] for m in args.methods}
    preds = []
    for start in range(0, len(xs), args.batch_size):
        x = xs[start:start + args.batch_size].to(dev)
        y = ys[start:start + args.batch_size].to(dev)
        mk = ms[start:start + args.batch_size].to(dev)[:, 0]
        with torch.no_grad():
            pred = model(x).argmax(1)
        preds.append(pred.cpu())
        target = y if args.target == "label" else pred
        maps = explain(model, x, target, args.methods, ig_steps=args.ig_steps,
                       smoothgrad_samples=args.smoothgrad_samples, smoothgrad_noise=args.smoothgrad_noise,
                       internal_batch_size=args.batch_size * 4)
        for m, a in maps.items():
            s = scores[m]
            s["energy_pg"].append(L.energy_pointing_game(a, mk).cpu())
            s["pointing_game"].append(L.pointing_game(a, mk, args.tolerance).cpu())
            s["topk_iou"].append(L.topk_iou(a, mk, args.topk).cpu())
            di = L.deletion_insertion(model, x, a, target, steps=args.steps, baseline=args.baseline,
                                      batch_size=max(64, args.batch_size))
            s["deletion"].append(di["deletion"].cpu())
            s["insertion"].append(di["insertion"].cpu())
            have = sum(t.shape[0] for t in grid_maps[m])
            if have < args.grid_images:
                grid_maps[m].append(a[:args.grid_images - have].cpu())
        log(f"  {min(start + args.batch_size, len(xs))}/{len(xs)} images")
    scores = {m: {k: torch.cat(v) for k, v in s.items()} for m, s in scores.items()}
    grid_maps = {m: torch.cat(v) if v else None for m, v in grid_maps.items()}
    return scores, grid_maps, torch.cat(preds)


# ----------------------------------------------------------------------------- outputs

def _cell(mean, lo, hi, digits=3):
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_report(out: Path, runs, results, desc, args, elapsed, left_out=None) -> str:
    labels = [r["name"] for r in runs]
    tol = f"{args.tolerance:g}px"
    k = "mask area" if args.topk == "mask" else f"{float(args.topk) * 100:g}%"
    lines = [f"# {PROG} report", "",
             f"- data: {desc}; target: {'true class' if args.target == 'label' else 'predicted class'}",
             f"- {len(args.methods)} methods x {len(runs)} models; mean and 95% bootstrap interval over images",
             f"- pointing game tolerance {tol}; top-k IoU k = {k}; deletion/insertion: {args.steps} steps, "
             f"{args.baseline} baseline, softmax probability of the target",
             f"- IG {args.ig_steps} steps (baseline 0); SmoothGrad {args.smoothgrad_samples} samples, noise "
             f"{args.smoothgrad_noise:g} x input range",
             f"- {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, commit "
             f"{_git_commit() or 'unknown'}, {elapsed:.0f}s"]
    left_out = left_out or {}
    if left_out.get("empty_mask") or left_out.get("unreadable"):
        lines.append(f"- left out: {len(left_out.get('empty_mask', []))} image(s) with an empty ground-truth mask, "
                     f"{len(left_out.get('unreadable', []))} unreadable file(s) (listed in results.json)")
    lines += ["",
             "## Models", "",
             "| model | checkpoint | arch | training | seed | epochs | spurious | accuracy here [95%] | val acc (log) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        a = r["args"]
        val = r["records"][-1].get("val_acc") if r["records"] else None
        lines.append(f"| {r['name']} | `{r['path'].parent.name}/{r['path'].name}` | {a.get('arch')} | {r['mode']} | "
                     f"{a.get('seed')} | {r['epoch']} | {a.get('spurious', 0):g} | {_cell(*r['acc'])} | "
                     f"{'n/a' if val is None else f'{val:.3f}'} |")
    for key, title, better in METRICS:
        lines += ["", f"## {title} ({better} is better)", "", "| method | " + " | ".join(labels) + " |",
                  "|---|" + "---|" * len(labels),
                  "| *accuracy* | " + " | ".join(_cell(*r["acc"]) for r in runs) + " |"]
        for m in args.methods:
            lines.append(f"| {m} | " + " | ".join(_cell(*results[r["name"]]["summary"][m][key]) for r in runs) + " |")
    groups = {}
    for r in runs:
        groups.setdefault(r["group"], []).append(r)
    if any(len(g) > 1 for g in groups.values()):
        gnames = list(groups)
        lines += ["", "## Over checkpoints of the same group", "",
                  "Mean over checkpoints of each checkpoint's image mean, +- standard deviation over checkpoints "
                  f"(n = {', '.join(f'{g}: {len(v)}' for g, v in groups.items())}).", ""]
        lines += ["| metric | method | " + " | ".join(gnames) + " |", "|---|---|" + "---|" * len(gnames)]

        def agg(vals):
            t = torch.tensor(vals, dtype=torch.float64)
            sd = float(t.std()) if len(vals) > 1 else 0.0
            return f"{float(t.mean()):.3f} +- {sd:.3f}"

        lines.append("| accuracy | | " + " | ".join(agg([r["acc"][0] for r in groups[g]]) for g in gnames) + " |")
        for key, title, _ in METRICS:
            for m in args.methods:
                lines.append(f"| {title} | {m} | " + " | ".join(
                    agg([results[r["name"]]["summary"][m][key][0] for r in groups[g]]) for g in gnames) + " |")
    lines += ["", "## Definitions", "",
              "- Energy pointing game: share of the map's positive energy on the object mask (chance: the "
              "object's area fraction, here %.3f on average)." % args.mask_area,
              f"- Pointing game: the map's maximum is on the object or within {tol} of it.",
              f"- Top-k IoU: IoU of the top {k} of pixels with the mask.",
              "- Deletion / insertion AUC: softmax probability of the target class as the most relevant pixels "
              "are removed (replaced by the baseline) / added, area over the fraction of pixels.",
              "- Maps: positive part only, never rescaled; " + ", ".join(m for m in args.methods if m in SIGNED)
              + " are signed before clamping (see `sib_fast/evaluation/explain.py` and `sib_fast/evaluation/localization.py`).", "",
              "## Pictures", "", "![training curves](training_curves.png)", ""]
    lines += [f"![{m}](grid_{m}.png)" for m in args.methods]
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "report.md", text, what="report")
    return text


def _figure(w, h):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(w, h), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_grid(path: Path, method: str, xs, ms, maps_by_model: dict, ys, classes) -> None:
    n = xs.shape[0]
    names = list(maps_by_model)
    cols = 2 + len(names)
    fig = _figure(1.6 * cols, 1.6 * n + 0.4)
    for i in range(n):
        panels = [("input", xs[i].permute(1, 2, 0).clamp(0, 1).numpy(), None),
                  ("mask", ms[i, 0].numpy(), "gray")]
        for name in names:
            a = maps_by_model[name][i].clamp_min(0)
            a = a / a.max() if a.max() > 0 else a  # display only
            panels.append((name, a.numpy(), "inferno"))
        for j, (title, img, cmap) in enumerate(panels):
            ax = fig.add_subplot(n, cols, i * cols + j + 1)
            ax.imshow(img, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=8)
            if j == 0:
                ax.set_ylabel(classes[int(ys[i])], fontsize=8)
    fig.suptitle(f"{method} (positive part, each map scaled to its maximum)", fontsize=9)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=80), what="image grid")


def plot_curves(path: Path, runs) -> None:
    fig = _figure(11, 4)
    axes = [fig.add_subplot(1, 2, i + 1) for i in range(2)]
    for ci, r in enumerate(runs):
        colour = f"C{ci % 10}"
        ep = [rec.get("epoch") for rec in r["records"]]
        for ax, key in zip(axes, ("hsic", "bg")):
            for split, style in (("train", "-"), ("val", "--")):
                pts = [(e, rec.get(f"{split}_{key}")) for e, rec in zip(ep, r["records"])
                       if rec.get(f"{split}_{key}") is not None and e is not None]
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", color=colour, label=f"{r['name']} ({split})")
    axes[0].set_title("HSIC (higher: R follows the object)", fontsize=10)
    axes[1].set_title("background variance BG", fontsize=10)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    if any(ln.get_ydata().size and (ln.get_ydata() > 0).all() for ln in axes[1].lines):
        axes[1].set_yscale("log")
    if not any(ax.lines for ax in axes):
        axes[0].text(0.5, 0.5, "no metrics.jsonl next to the checkpoints", ha="center", transform=axes[0].transAxes)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90), what="plot")


# ----------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Explain sib-train checkpoints (Captum and CAM methods) and "
                                "score the maps against ground-truth masks: report.md, image grids, training curves.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoints", nargs="+", metavar="[LABEL=]CKPT",
                   help="sib-train checkpoint.pt files or their output folders")
    p.add_argument("--data", default="synthetic", help="'synthetic' or DIR with images/CLASS/* and masks/CLASS/*.png")
    p.add_argument("--output", default=os.path.join("runs", "sib_eval"), help="report folder")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated explanation methods")
    p.add_argument("--num-images", type=int, default=None, help=f"images to evaluate (default {FULL['num_images']}, "
                   f"--quick {QUICK['num_images']}; a folder: 0 = all)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--target", choices=("label", "pred"), default="label", help="explain the true or the predicted class")
    p.add_argument("--tolerance", type=float, default=None,
                   help="pointing game tolerance in pixels (default 15 at 224px, scaled to the image size)")
    p.add_argument("--topk", default="0.1", help="top-k IoU: fraction of pixels, or 'mask' for the object's area")
    p.add_argument("--steps", type=int, default=None, help=f"deletion/insertion steps (default {FULL['steps']})")
    p.add_argument("--baseline", choices=L.BASELINES, default="blur", help="deletion/insertion baseline")
    p.add_argument("--ig-steps", type=int, default=None, help=f"Integrated Gradients steps (default {FULL['ig_steps']})")
    p.add_argument("--smoothgrad-samples", type=int, default=None,
                   help=f"SmoothGrad samples (default {FULL['smoothgrad_samples']})")
    p.add_argument("--smoothgrad-noise", type=float, default=0.15, help="SmoothGrad noise std / input range")
    p.add_argument("--grid-images", type=int, default=None, help=f"rows of each image grid (default {FULL['grid_images']})")
    p.add_argument("--data-seed", type=int, default=0, help="synthetic: seed of the evaluation images")
    p.add_argument("--max-bad-images", type=int, default=DEFAULT_MAX_BAD_IMAGES,
                   help="a folder: skip unreadable images and masks (each named once, listed in results.json); "
                        "more than this many is an error (0: the first one is)")
    p.add_argument("--spurious", type=float, default=None,
                   help="synthetic: background-grating probability (default: the checkpoints'; in the val split the "
                        "grating's orientation is random)")
    p.add_argument("--image-size", type=int, default=None, help="default: the checkpoints' training size")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--quick", action="store_true", help="a small run (about a minute on a 2-core CPU): "
                   + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    return p


def validate(args) -> None:
    preset = QUICK if args.quick else FULL
    for k, v in preset.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.n_boot = preset["n_boot"]
    try:
        args.methods = list(dict.fromkeys(canonical_method(m) for m in args.methods.split(",") if m.strip()))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not args.methods:
        raise UsageError("--methods is empty")
    if any(m in CAPTUM_METHODS for m in args.methods):
        try:
            import captum  # noqa: F401
        except ImportError:
            raise UsageError("the Captum methods need captum: pip install \"captum>=0.9\" (or use "
                             "--methods gradcam,gradcam_pp,layercam)") from None
    if args.topk != "mask":
        try:
            args.topk = float(args.topk)
        except ValueError:
            raise UsageError(f"--topk must be a fraction in (0, 1] or 'mask', got {args.topk!r}") from None
        if not 0 < args.topk <= 1:
            raise UsageError(f"--topk must be a fraction in (0, 1] or 'mask', got {args.topk}")
    for name in ("num_images", "batch_size", "steps", "ig_steps", "smoothgrad_samples", "grid_images"):
        v = getattr(args, name)
        low = 0 if name in ("num_images", "grid_images") else 1
        if v < low:
            raise UsageError(f"--{name.replace('_', '-')} must be >= {low}, got {v}")
    if args.data == "synthetic" and args.num_images < 1:
        raise UsageError("--num-images must be >= 1 for synthetic data")
    if args.tolerance is not None and not args.tolerance >= 0:
        raise UsageError(f"--tolerance must be >= 0 pixels, got {args.tolerance}")
    if args.spurious is not None and not 0 <= args.spurious <= 1:
        raise UsageError(f"--spurious must be in [0, 1], got {args.spurious}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available")
    if args.max_bad_images < 0:
        raise UsageError(f"--max-bad-images must be >= 0, got {args.max_bad_images}")
    if args.image_size is not None and not 8 <= args.image_size <= 4096:
        raise UsageError(f"--image-size must be between 8 and 4096, got {args.image_size}")
    if not math.isfinite(args.smoothgrad_noise) or args.smoothgrad_noise < 0:
        raise UsageError(f"--smoothgrad-noise must be a finite number >= 0, got {args.smoothgrad_noise}")
    # last: the report folder must be writable (checked now, created only when there is something to write)
    check_output_dir(args.output, "--output", ("report.md", "results.json", "training_curves.png")
                     + tuple(f"grid_{m}.png" for m in args.methods))


def run(args, log=print) -> dict:
    t0 = time.time()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    runs = [load_run(s, device, log) for s in args.checkpoints]
    # unique display names: the label, else mode and seed; on a clash + seed, then + the folder name
    for r in runs:
        r["name"] = r["label"] or f"{r['mode']} s{r['args'].get('seed', '?')}"
    for suffix in (lambda r: f" s{r['args'].get('seed', '?')}", lambda r: f" ({r['path'].parent.name})"):
        names = [r["name"] for r in runs]
        for r in runs:
            if names.count(r["name"]) > 1:
                r["name"] += suffix(r)
    if len({r["name"] for r in runs}) < len(runs):
        for i, r in enumerate(runs):
            r["name"] = f"{r['name']} #{i + 1}"
    xs, ys, ms, classes, desc, left_out = load_data(args, runs, log)
    args.mask_area = float(ms.float().mean())
    size = xs.shape[-1]
    if args.tolerance is None:
        args.tolerance = float(round(15 * size / 224))
    out = Path(args.output)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot make the report folder {out}: {exc.strerror or exc}") from None
    log(f"{PROG}: {len(runs)} model(s), {desc}; methods {', '.join(args.methods)}; output {out}")
    results, grids = {}, {}
    for r in runs:
        log(f"{PROG}: {r['name']} ({r['path']})")
        model = build(r, len(classes), device)
        scores, grid_maps, preds = evaluate_model(model, xs, ys, ms, args, log)
        correct = (preds == ys).double()
        r["acc"] = L.mean_ci(correct, n_boot=args.n_boot)
        summary = {m: {k: L.mean_ci(v, n_boot=args.n_boot) for k, v in s.items()} for m, s in scores.items()}
        results[r["name"]] = dict(checkpoint=str(r["path"]), mode=r["mode"], group=r["group"], args=r["args"],
                                  accuracy=r["acc"], summary=summary,
                                  per_image={m: {k: v.tolist() for k, v in s.items()} for m, s in scores.items()})
        grids[r["name"]] = grid_maps
        del r["state"]
    g = min(args.grid_images, len(xs))
    if g:
        for m in args.methods:
            plot_grid(out / f"grid_{m}.png", m, xs[:g], ms[:g], {n: grids[n][m] for n in grids}, ys[:g], classes)
    plot_curves(out / "training_curves.png", runs)
    settings = {k: getattr(args, k) for k in ("data", "methods", "num_images", "target", "tolerance", "topk",
                                               "steps", "baseline", "ig_steps", "smoothgrad_samples",
                                               "smoothgrad_noise", "data_seed", "spurious", "quick")}
    atomic_write_text(out / "results.json", json.dumps(dict(data=desc, settings=settings, left_out=left_out,
                                                           models=results), indent=1) + "\n", what="results")
    write_report(out, runs, results, desc, args, time.time() - t0, left_out)
    log(f"{PROG}: wrote {out / 'report.md'} in {time.time() - t0:.0f}s")
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        try:
            validate(args)
        except (ValueError, TypeError) as exc:  # a check deeper down refused a value
            raise UsageError(str(exc)) from None
        run(args)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except (OutputError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
