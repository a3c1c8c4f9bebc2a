"""The history of a ``sib-train`` run: ``metrics.jsonl`` (one record per epoch, read back by
``--resume``) and its plot ``curves.png``."""
from __future__ import annotations

import json
from pathlib import Path

from sib_fast.cli_errors import UsageError, atomic_write, atomic_write_text

METRICS = "metrics.jsonl"
CURVES = "curves.png"


def read_metrics(path: Path, warn=None) -> list[dict]:
    """The records of metrics.jsonl ([] when there is none). An unreadable file or a damaged line is a
    UsageError (``--resume`` would drop it from the file); with ``warn`` (sib-eval's training curves)
    it is said through ``warn`` and left out."""
    if not path.exists():
        return []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        if warn is None:
            raise UsageError(f"--resume: cannot read {path}: {exc}") from None
        warn(f"cannot read {path} ({exc}); no training curves for this run")
        return []
    records, bad = [], 0
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            r = None
        if isinstance(r, dict) and isinstance(r.get("epoch"), int):
            records.append(r)
        elif warn is None:
            raise UsageError(f"--resume: {path} line {n} is not a metrics record; repair or remove that line")
        else:
            bad += 1
    if bad:
        warn(f"{path}: {bad} line(s) are not metrics records; the training curves leave them out")
    return records


def write_metrics(path: Path, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records), what="metrics")


def plot_curves(records: list[dict], path: Path) -> None:
    """curves.png: one panel per metric, x = epoch (matplotlib without pyplot: no GUI backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels = [("cross-entropy", [("train_ce", "train")]),
              ("accuracy", [("train_acc", "train"), ("val_acc", "val"), ("train_acc5", "train top-5"),
                            ("val_acc5", "val top-5")]),
              ("HSIC (higher: R follows the object)", [("train_hsic", "train"), ("val_hsic", "val")]),
              ("background variance BG", [("train_bg", "train"), ("val_bg", "val")]),
              ("saliency mass on the object", [("val_fg_fraction", "val"), ("val_fg_area", "object area")]),
              ("S-IB weight gradient / cross-entropy's", [("grad_ratio_fg", "lambda_fg exp(-HSIC)"),
                                                           ("grad_ratio_bg", "lambda_bg exp(BG)")]),
              ("throughput (images/s)", [("images_per_s", "train")]),
              ("learning rate (last step of the epoch)", [("lr", "lr")])]
    fig = Figure(figsize=(17, 7))  # no constrained layout: it costs seconds on a busy CPU
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.08, top=0.9, wspace=0.25, hspace=0.4)
    FigureCanvasAgg(fig)
    epochs = [r["epoch"] for r in records]
    for i, (title, series) in enumerate(panels):
        ax = fig.add_subplot(2, 4, i + 1)
        for key, label in series:
            pts = [(e, r[key]) for e, r in zip(epochs, records) if r.get(key) is not None]
            if key.startswith("grad_ratio") and records and records[0].get(f"{key}_start") is not None:
                pts.insert(0, (records[0]["epoch"] - 1, records[0][f"{key}_start"]))  # before the first epoch
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        if title.startswith("background") or title.startswith("S-IB weight"):
            if any(line.get_ydata().size and min(line.get_ydata()) > 0 for line in ax.lines):
                ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(f"sib-train: {records[-1].get('run', '')}" if records else "sib-train")
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90), what="plot")
