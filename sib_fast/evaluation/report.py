"""The work of ``sib-eval``: every model explained by every method on the same images, the maps
scored against the masks (``evaluate_model``), and the report folder written (``run``):
report.md, results.json, one image grid per method and the training curves of the runs."""
from __future__ import annotations

import datetime
import json
import math
import subprocess
import time
from pathlib import Path

import torch

from sib_fast.cli_errors import OutputError, atomic_write, atomic_write_text, os_reason
from sib_fast.evaluation import PROG
from sib_fast.evaluation import localization as L
from sib_fast.evaluation.explain import SIGNED, explain
from sib_fast.evaluation.inputs import build, load_data, load_run

METRICS = (  # key, title, better
    ("energy_pg", "Energy pointing game", "higher"),
    ("pointing_game", "Pointing game", "higher"),
    ("topk_iou", "Top-k IoU", "higher"),
    ("deletion", "Deletion AUC", "lower"),
    ("insertion", "Insertion AUC", "higher"),
)
REPORT_FILES = ("report.md", "results.json", "training_curves.png")  # and grid_<method>.png per method


def _name_runs(runs: list[dict]) -> None:
    """Unique display names: the label, else mode and seed; on a clash + seed, then + the folder name."""
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


def run(args, log=print) -> dict:
    """Explain and score every checkpoint of ``args`` (checked by ``sib_fast.evaluate.validate``) and
    write the report folder; returns results.json's ``models``."""
    t0 = time.time()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    runs = [load_run(s, log) for s in args.checkpoints]
    _name_runs(runs)
    xs, ys, ms, classes, desc, left_out = load_data(args, runs, log)
    args.mask_area = float(ms.float().mean())
    size = xs.shape[-1]
    if args.tolerance is None:
        args.tolerance = float(round(15 * size / 224))
    out = Path(args.output)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot make the report folder {out}: {os_reason(exc)}") from None
    log(f"{PROG}: {len(runs)} model(s), {desc}; methods {', '.join(args.methods)}; output {out}")
    results, grids = {}, {}
    for r in runs:
        log(f"{PROG}: {r['name']} ({r['path']})")
        model = build(r, len(classes), device)
        if "guided_backprop" in args.methods and not any(isinstance(m, torch.nn.ReLU) for m in model.modules()):
            log(f"{PROG}: note: {r['name']} has no nn.ReLU module, so its guided backprop equals its saliency "
                f"(Captum's GuidedBackprop changes the backward of ReLU modules only)")
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
        # with seeds of one arm grouped, one column per group (its first checkpoint) keeps a grid readable
        shown = [members[0]["name"] for members in _groups(runs).values()]
        for m in args.methods:
            plot_grid(out / f"grid_{m}.png", m, xs[:g], ms[:g], {n: grids[n][m] for n in shown}, ys[:g], classes)
    plot_curves(out / "training_curves.png", runs)
    settings = {k: getattr(args, k) for k in ("data", "methods", "num_images", "target", "tolerance", "topk",
                                               "steps", "baseline", "ig_steps", "smoothgrad_samples",
                                               "smoothgrad_noise", "data_seed", "spurious", "quick")}
    atomic_write_text(out / "results.json", json.dumps(dict(data=desc, settings=settings, left_out=left_out,
                                                           models=results), indent=1) + "\n", what="results")
    write_report(out, runs, results, desc, args, time.time() - t0, left_out)
    log(f"{PROG}: wrote {out / 'report.md'} in {time.time() - t0:.0f}s")
    return results


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
             "| model | checkpoint | arch | training | seed | epochs | spurious | accuracy here [95%] | val acc (log) "
             "| S-IB gradient share fg / bg (log) |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def logged(r, key, spec):  # the last epoch's value in metrics.jsonl
        value = r["records"][-1].get(key) if r["records"] else None
        return "n/a" if value is None else format(value, spec)

    for r in runs:
        a = r["args"]
        lines.append(f"| {r['name']} | `{r['path'].parent.name}/{r['path'].name}` | {a.get('arch')} | {r['mode']} | "
                     f"{a.get('seed')} | {r['epoch']} | {a.get('spurious', 0):g} | {_cell(*r['acc'])} | "
                     f"{logged(r, 'val_acc', '.3f')} | {logged(r, 'grad_ratio_fg', '.1e')} / "
                     f"{logged(r, 'grad_ratio_bg', '.1e')} |")
    lines.append("")
    lines.append("The gradient shares are each S-IB term's weight-gradient norm over cross-entropy's at the end of "
                 "training (`sib_fast.gradient_shares`; docs/training.md, 'Choosing lambda').")
    for key, title, better in METRICS:
        lines += ["", f"## {title} ({better} is better)", "", "| method | " + " | ".join(labels) + " |",
                  "|---|" + "---|" * len(labels),
                  "| *accuracy* | " + " | ".join(_cell(*r["acc"]) for r in runs) + " |"]
        for m in args.methods:
            lines.append(f"| {m} | " + " | ".join(_cell(*results[r["name"]]["summary"][m][key]) for r in runs) + " |")
    lines += _group_sections(runs, results, args.methods)
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


def _groups(runs) -> dict:
    groups = {}
    for r in runs:
        groups.setdefault(r["group"], []).append(r)
    return groups


def _group_sections(runs, results, methods) -> list[str]:
    """With several checkpoints per group (seeds of one arm): each metric's mean over the group's
    checkpoints with its 95% t-interval, and the per-seed paired difference from the first group."""
    groups = _groups(runs)
    if not any(len(g) > 1 for g in groups.values()):
        return []
    names = list(groups)

    def value(r, key, method):
        return r["acc"][0] if key is None else results[r["name"]]["summary"][method][key][0]

    def cell(vals):
        m, lo, hi = L.mean_t_interval(vals)
        return "n/a" if math.isnan(m) else f"{m:.3f} [{lo:.3f}, {hi:.3f}]"

    rows = [("accuracy", "", None, None)] + [(title, m, key, m) for key, title, _ in METRICS for m in methods]
    lines = ["", "## Over the checkpoints of each group", "",
             "Mean over a group's checkpoints of each checkpoint's image mean, [95% t-interval over checkpoints] "
             f"(n = {', '.join(f'{g}: {len(v)}' for g, v in groups.items())}).", "",
             "| metric | method | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for title, method, key, m in rows:
        lines.append(f"| {title} | {method} | " + " | ".join(cell([value(r, key, m) for r in groups[g]])
                                                            for g in names) + " |")
    first = {r["args"].get("seed"): r for r in groups[names[0]]}
    paired = [g for g in names[1:] if any(r["args"].get("seed") in first for r in groups[g])]
    if paired and len(first) == len(groups[names[0]]):
        lines += ["", f"### Paired difference from {names[0]}", "",
                  f"Per seed, the checkpoint's mean minus that of the {names[0]} checkpoint with the same seed; "
                  "mean [95% t-interval] over seeds. An interval that excludes 0 is a difference the seeds agree on.",
                  "", "| metric | method | " + " | ".join(paired) + " |", "|---|---|" + "---|" * len(paired)]
        for title, method, key, m in rows:
            lines.append(f"| {title} | {method} | " + " | ".join(
                cell([value(r, key, m) - value(first[r["args"].get("seed")], key, m)
                      for r in groups[g] if r["args"].get("seed") in first]) for g in paired) + " |")
    return lines


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
    # one colour per group (the seeds of an arm share it, labelled once), so that a report over
    # many checkpoints keeps a readable legend, drawn beside the axes
    from matplotlib import colormaps
    fig = _figure(11, 4)
    axes = [fig.add_subplot(1, 2, i + 1) for i in range(2)]
    groups = list(dict.fromkeys(r["group"] for r in runs))
    grouped = len(groups) < len(runs)
    labelled = set()
    for ci, r in enumerate(runs):
        k = groups.index(r["group"]) if grouped else ci
        colour = f"C{k % 10}" if (len(groups) if grouped else len(runs)) <= 10 else colormaps["tab20"](k % 20)
        name = r["group"] if grouped else r["name"]
        ep = [rec.get("epoch") for rec in r["records"]]
        for ax, key in zip(axes, ("hsic", "bg")):
            for split, style in (("train", "-"), ("val", "--")):
                pts = [(e, rec.get(f"{split}_{key}")) for e, rec in zip(ep, r["records"])
                       if rec.get(f"{split}_{key}") is not None and e is not None]
                if pts:
                    label = f"{name} ({split})"
                    ax.plot(*zip(*pts), style, marker="o", color=colour,
                            label=None if (ax, label) in labelled else label)
                    labelled.add((ax, label))
    axes[0].set_title("HSIC (higher: R follows the object)", fontsize=10)
    axes[1].set_title("background variance BG", fontsize=10)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right upper", fontsize=6 if len(labels) > 14 else 7,
                   ncols=2 if len(labels) > 14 else 1)
    if any(ln.get_ydata().size and (ln.get_ydata() > 0).all() for ln in axes[1].lines):
        axes[1].set_yscale("log")
    if not any(ax.lines for ax in axes):
        axes[0].text(0.5, 0.5, "no metrics.jsonl next to the checkpoints", ha="center", transform=axes[0].transAxes)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90), what="plot")
