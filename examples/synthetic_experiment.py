"""Baseline vs S-IB on SyntheticObjects with a spurious background cue, several seeds, then sib-eval.

    python examples/synthetic_experiment.py --output runs/synthetic_experiment
    python examples/synthetic_experiment.py --seeds 0 --epochs 1 --train-samples 256 --quick-eval   # smoke test

For each seed it runs ``sib-train --no-sib`` (plain cross-entropy) and ``sib-train`` (S-IB, one
run per ``--lambda-fg`` value) with the same data, model, optimiser and seed, on training images
whose background grating encodes the label (``--spurious``; the evaluation images carry the
grating at a random orientation). Then one ``sib-eval`` over all checkpoints (same evaluation
images for every model) writes ``OUTPUT/eval/report.md``, and this script writes
``OUTPUT/summary.md``: per group (baseline, S-IB per lambda) the mean over seeds of accuracy and
of the energy pointing game of every method, and the paired per-seed difference S-IB - baseline.
Runs whose checkpoint already holds the requested epochs are reused (delete OUTPUT to start over).
Everything runs in subprocesses, as a user would run the two commands.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path


def sh(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def done(out: Path, epochs: int) -> bool:
    cfg, metrics = out / "config.json", out / "metrics.jsonl"
    if not (out / "checkpoint.pt").is_file() or not metrics.is_file() or not cfg.is_file():
        return False
    lines = [json.loads(s) for s in metrics.read_text().splitlines() if s.strip()]
    return bool(lines) and lines[-1].get("epoch") == epochs


def mean_sd(v):
    v = [x for x in v if x is not None and not math.isnan(x)]
    if not v:
        return "n/a"
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return f"{m:.3f} +- {sd:.3f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output", default="runs/synthetic_experiment")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-samples", type=int, default=1024)
    p.add_argument("--val-samples", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=6)
    p.add_argument("--spurious", type=float, default=0.9)
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW lr (higher than the paper's 1e-4: a small CNN from scratch)")
    p.add_argument("--lambda-fg", default="0.01,1", help="comma-separated: one S-IB run per value and seed")
    p.add_argument("--lambda-bg", type=float, default=1000.0)
    p.add_argument("--vjp", default="exact", choices=("exact", "finite_difference"))
    p.add_argument("--eval-images", type=int, default=64)
    p.add_argument("--eval-methods", default=None, help="sib-eval --methods (default: all)")
    p.add_argument("--quick-eval", action="store_true", help="sib-eval --quick")
    p.add_argument("--eval-extra", default="--steps 10 --ig-steps 16 --smoothgrad-samples 8",
                   help="more sib-eval arguments, space-separated")
    p.add_argument("--extra-train", default="", help="more sib-train arguments, space-separated")
    a = p.parse_args(argv)
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    lambdas = [float(s) for s in a.lambda_fg.split(",") if s.strip()]
    common = ["--epochs", str(a.epochs), "--train-samples", str(a.train_samples), "--val-samples", str(a.val_samples),
              "--batch-size", str(a.batch_size), "--image-size", str(a.image_size), "--num-classes", str(a.num_classes),
              "--spurious", str(a.spurious), "--lr", str(a.lr), "--device", "cpu"] + a.extra_train.split()
    py = sys.executable
    t0 = time.time()
    runs = []  # (group, path)
    timings = {}
    for seed in seeds:
        variants = [("baseline", ["--no-sib"])]
        variants += [(f"S-IB lambda_fg {lam:g}", ["--lambda-fg", str(lam), "--lambda-bg", str(a.lambda_bg), "--vjp", a.vjp])
                     for lam in lambdas]
        for group, extra in variants:
            name = group.replace(" ", "_") + f"_s{seed}"
            d = out / name
            if not done(d, a.epochs):
                t = time.time()
                sh([py, "-m", "sib_fast.train", *common, "--seed", str(seed), "--output", str(d), *extra])
                timings[name] = time.time() - t
            runs.append((group, d))
    t_train = time.time() - t0
    ev = out / "eval"
    cmd = [py, "-m", "sib_fast.evaluate", *[f"{g}={d}" for g, d in runs], "--output", str(ev),
           "--num-images", str(a.eval_images)]
    if a.quick_eval:
        cmd.append("--quick")
    if a.eval_methods:
        cmd += ["--methods", a.eval_methods]
    cmd += a.eval_extra.split()
    t = time.time()
    sh(cmd)
    t_eval = time.time() - t

    res = json.loads((ev / "results.json").read_text())
    models = res["models"]
    methods = res["settings"]["methods"]
    groups = list(dict.fromkeys(g for g, _ in runs))
    by_group = {g: [m for m in models.values() if m["group"] == g] for g in groups}
    base = {m["args"]["seed"]: m for m in by_group["baseline"]}
    lines = [f"Settings: {len(seeds)} seeds ({a.seeds}); sib_cnn, {a.image_size}px, {a.num_classes} classes, "
             f"{a.train_samples} training images x {a.epochs} epochs, batch {a.batch_size}, AdamW lr {a.lr:g} "
             f"wd 1e-4, spurious {a.spurious:g}; S-IB vjp {a.vjp}, lambda_bg {a.lambda_bg:g}, lambda_fg "
             f"{', '.join(f'{x:g}' for x in lambdas)}. Evaluation: {res['data']}; "
             f"{'quick ' if a.quick_eval else ''}sib-eval settings {json.dumps({k: res['settings'][k] for k in ('tolerance', 'topk', 'steps', 'baseline', 'ig_steps', 'smoothgrad_samples')})}. "
             f"Training {t_train / 60:.1f} min, evaluation {t_eval / 60:.1f} min.", "",
             "Energy pointing game (share of positive map energy on the object; higher is better), mean +- sd over "
             "seeds of each model's mean over the evaluation images; 'diff' = S-IB - baseline paired by seed "
             "(same seed, same data), with the number of seeds where S-IB is higher.", "",
             "| | " + " | ".join(groups) + " | " + " | ".join(f"diff ({g})" for g in groups[1:]) + " |",
             "|---|" + "---|" * (2 * len(groups) - 1)]

    def row(title, get):
        cells = [mean_sd([get(m) for m in by_group[g]]) for g in groups]
        for g in groups[1:]:
            diffs = [get(m) - get(base[m["args"]["seed"]]) for m in by_group[g] if m["args"]["seed"] in base]
            pos = sum(d > 0 for d in diffs)
            cells.append(f"{mean_sd(diffs)} ({pos}/{len(diffs)} higher)")
        lines.append(f"| {title} | " + " | ".join(cells) + " |")

    row("accuracy (eval images)", lambda m: m["accuracy"][0])
    row("val accuracy (training log)",
        lambda m: json.loads((Path(m["checkpoint"]).parent / "metrics.jsonl").read_text().splitlines()[-1])["val_acc"])
    for meth in methods:
        row(meth, lambda m, meth=meth: m["summary"][meth]["energy_pg"][0])
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    print(text)
    print(f"full report: {ev / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
