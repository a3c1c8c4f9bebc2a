"""Does S-IB concentrate the maps on the object, and at what strength? Baseline vs S-IB arms, seeds.

    python examples/sib_strength_experiment.py --output runs/sib_strength
    python examples/sib_strength_experiment.py --seeds 0 --epochs 1 --train-samples 256 --shares 0.1 --no-eval

On SyntheticObjects where the baseline learns the object (8192 training images, 4 epochs: clean val
accuracy 0.965 with one seed), in one setting per ``--spurious`` value (0: no cue; e.g. 0.5: a
background cue the baseline can partly use): plain cross-entropy, S-IB at the paper's weights, and
each term alone and both together at weights that give the ``--shares`` of cross-entropy's
weight-gradient norm at initialisation. The weights come from ``sib_fast.gradient_shares``: a term's
share is linear in its lambda, so lambda = share / (share at the paper's lambda) x the paper's
lambda; each run's metrics.jsonl records the shares it really had, at the start and after every
epoch. S-IB runs use ``--cheap`` (default ``--sib-every 4 --sib-batch 8``) to fit a CPU.

``OUTPUT/strength.png``: val accuracy and saliency on the object against the shares. ``OUTPUT/summary.md``: per setting and arm, the mean [95% t-interval] over seeds of val accuracy,
saliency on the object (share of |R| on it), val HSIC and the shares, and the paired per-seed
difference from the baseline; then, unless ``--no-eval``, one ``sib-eval`` per setting over all
its checkpoints (``OUTPUT/<setting>/eval/report.md``: every method's localisation metrics with
intervals). Finished runs are reused.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

from experiment_runs import interval, last_record, run_all
from sib_fast import SIBLoss, gradient_shares
from sib_fast.training.data import SYNTHETIC_STATS, SyntheticObjects
from sib_fast.training.models import build_model

PAPER = {"fg": 0.01, "bg": 1000.0}
METRICS = ("val_acc", "val_fg_fraction", "val_hsic", "grad_ratio_fg_start", "grad_ratio_bg_start",
           "grad_ratio_fg", "grad_ratio_bg")


def paper_shares(args) -> dict:
    """The two terms' shares at the paper's weights, at initialisation, on a batch of validation images."""
    torch.manual_seed(0)
    model = build_model("sib_cnn", 6, args.image_size).train()
    data = SyntheticObjects("val", args.batch_size, image_size=args.image_size, seed=0)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in SYNTHETIC_STATS)
    x = (torch.stack([data[i][0] for i in range(len(data))]) - mean) / std
    y = torch.tensor([data[i][1] for i in range(len(data))])
    window = max(3, round(31 * args.image_size / 224) | 1)
    s = gradient_shares(model, x, y, SIBLoss(lambda_fg=PAPER["fg"], lambda_bg=PAPER["bg"], window_size=window))
    return {"fg": s.ratio_fg, "bg": s.ratio_bg}


def arms(args) -> dict:
    """Arm name -> its sib-train arguments."""
    at_paper = paper_shares(args)
    result = {"baseline": ["--no-sib"], "S-IB, paper's weights": []}
    for share in (float(s) for s in args.shares.split(",")):
        lam = {t: share / at_paper[t] * PAPER[t] for t in ("fg", "bg")}
        result[f"HSIC term, {share:.0%}"] = ["--lambda-fg", f"{lam['fg']:.4g}", "--lambda-bg", "0"]
        result[f"BG term, {share:.0%}"] = ["--lambda-fg", "0", "--lambda-bg", f"{lam['bg']:.4g}"]
        result[f"both terms, {share:.0%} each"] = ["--lambda-fg", f"{lam['fg']:.4g}", "--lambda-bg", f"{lam['bg']:.4g}"]
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output", default="runs/sib_strength")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--spurious", default="0,0.5", help="one setting per value")
    p.add_argument("--shares", default="0.01,0.03,0.1,0.3")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--train-samples", type=int, default=8192)
    p.add_argument("--val-samples", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--cheap", default="--sib-every 4 --sib-batch 8", help="sib-train arguments of the S-IB runs")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--eval-args", default="--num-images 128 --steps 10 --ig-steps 16 --smoothgrad-samples 8")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    root = Path(args.output)
    plan = arms(args)
    runs, todo = {}, []
    for cue in (float(c) for c in args.spurious.split(",")):
        for name, extra in plan.items():
            for seed in seeds:
                out = root / f"cue{cue:g}" / f"{name.replace(' ', '_').replace(',', '').replace('%', 'pct')}_s{seed}"
                runs[cue, name, seed] = out
                if last_record(out, args.epochs) is None:
                    cheap = args.cheap.split() if name != "baseline" else []
                    todo.append([sys.executable, "-m", "sib_fast.train", "--seed", str(seed), "--epochs",
                                 str(args.epochs), "--train-samples", str(args.train_samples), "--val-samples",
                                 str(args.val_samples), "--batch-size", str(args.batch_size), "--image-size",
                                 str(args.image_size), "--spurious", f"{cue:g}", "--threads", "1",
                                 "--output", str(out), *extra, *cheap])
    run_all(todo, args.jobs)
    lines = [f"sib-train on SyntheticObjects ({args.train_samples} images of {args.image_size} px, {args.epochs} "
             f"epochs, batch {args.batch_size}), seeds {args.seeds}; S-IB runs with {args.cheap}; mean [95% "
             "t-interval] over seeds; shares: a term's weight-gradient norm over cross-entropy's (start and end)"]
    for cue in sorted({c for c, _, _ in runs}):
        rec = {(n, s): last_record(runs[cue, n, s], args.epochs) for (c, n, s) in runs if c == cue}
        first = {(n, s): _first(runs[cue, n, s]) for (c, n, s) in runs if c == cue}
        for key, r in rec.items():
            r.update({k: first[key].get(k) for k in ("grad_ratio_fg_start", "grad_ratio_bg_start")})
        lines += ["", f"## background cue {cue:g}", "", "| arm | " + " | ".join(METRICS) + " |",
                  "|---|" + "---|" * len(METRICS)]
        for name in plan:
            lines.append(f"| {name} | " + " | ".join(interval([rec[name, s].get(m) for s in seeds]) for m in METRICS)
                         + " |")
        lines += ["", "paired difference from the baseline (arm - baseline, per seed):", "",
                  "| arm | val_acc | val_fg_fraction | val_hsic |", "|---|---|---|---|"]
        for name in list(plan)[1:]:
            lines.append(f"| {name} | " + " | ".join(
                interval([rec[name, s][m] - rec["baseline", s][m] for s in seeds])
                for m in ("val_acc", "val_fg_fraction", "val_hsic")) + " |")
        if not args.no_eval:
            ev = root / f"cue{cue:g}" / "eval"
            subprocess.run([sys.executable, "-m", "sib_fast.evaluate",
                            *[f"{n.replace(' ', '_').replace(',', '')}={runs[cue, n, s]}" for n in plan for s in seeds],
                            "--output", str(ev), *args.eval_args.split()], check=True)
            lines += ["", f"sib-eval: {ev / 'report.md'}"]
    summary = "\n".join(lines) + "\n"
    (root / "summary.md").write_text(summary)
    plot_strength(root / "strength.png", runs, seeds, [float(s) for s in args.shares.split(",")], args.epochs)
    print(summary)
    return 0


def plot_strength(path: Path, runs: dict, seeds: list, shares: list, epochs: int) -> None:
    """Val accuracy and saliency on the object against each term's share, one row per setting:
    mean and 95% t-interval over seeds; the baseline and the paper's weights as bands."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sib_fast.evaluation.localization import mean_t_interval

    cues = sorted({c for c, _, _ in runs})
    fig = Figure(figsize=(10, 3.2 * len(cues)), layout="constrained")
    FigureCanvasAgg(fig)
    for row, cue in enumerate(cues):
        for col, (key, title) in enumerate((("val_acc", "clean val accuracy"),
                                            ("val_fg_fraction", "saliency on the object (share of |R|)"))):
            ax = fig.add_subplot(len(cues), 2, 2 * row + col + 1)

            def stats(name):
                return mean_t_interval([(last_record(runs[cue, name, s], epochs) or {}).get(key) for s in seeds])

            for name, colour in (("baseline", "0.4"), ("S-IB, paper's weights", "C3")):
                m, lo, hi = stats(name)
                ax.axhspan(lo, hi, color=colour, alpha=0.2)
                ax.axhline(m, color=colour, lw=1, label=name)
            for term, colour in (("HSIC term", "C0"), ("BG term", "C1"), ("both terms", "C2")):
                names = [f"{term}, {s:.0%}" + (" each" if term == "both terms" else "") for s in shares]
                st = [stats(n) for n in names]
                ax.errorbar(shares, [m for m, _, _ in st], yerr=[[m - lo for m, lo, _ in st], [hi - m for m, _, hi in st]],
                            marker="o", capsize=3, color=colour, label=term)
            ax.set_xscale("log")
            ax.set_xlabel("share of cross-entropy's weight-gradient norm at initialisation")
            ax.set_title(f"{title}, background cue {cue:g}", fontsize=9)
            ax.grid(alpha=0.3)
            if row == 0 and col == 0:
                ax.legend(fontsize=7)
    fig.savefig(path, dpi=80)


def _first(out: Path) -> dict:
    from experiment_runs import history

    lines = history(out)
    return lines[0] if lines else {}


if __name__ == "__main__":
    sys.exit(main())
