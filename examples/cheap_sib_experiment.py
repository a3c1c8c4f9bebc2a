"""What the cheaper S-IB steps do to training: sib-train on SyntheticObjects, several seeds, per mode.

    python examples/cheap_sib_experiment.py --output runs/cheap_sib
    python examples/cheap_sib_experiment.py --seeds 0 --epochs 1 --train-samples 256   # smoke test
    python examples/cheap_sib_experiment.py --modes exact,every4,every8 --train-samples 8192 \
        --sib-args "--lambda-fg 4.96 --lambda-bg 0"     # a term strong enough to act (RESULTS.md)

Each mode of ``--modes`` (``exact`` every step; ``plain`` cross-entropy, the baseline that says what
S-IB itself changes; ``everyK`` for ``--sib-every K``; ``separateK`` for ``--sib-every K --sib-lazy
separate``, StyleGAN2's form; ``batch`` for ``--sib-batch B/4``; ``both`` for
``--sib-every 4 --sib-batch B/4``) trains the default model
from the same seed on the same data, in subprocesses as a user would run ``sib-train``
(``--jobs`` at a time, one thread each). ``OUTPUT/summary.md`` gives, per mode, the mean over seeds
of the end-of-training val accuracy, val HSIC, val BG, the saliency mass on the object
(``val_fg_fraction``: the share of |R| on the object) and the wall time of the run, each with its
95% t-interval, and the paired per-seed difference from exact every step. Runs whose last epoch is
already in ``metrics.jsonl`` are reused.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from experiment_runs import history, interval, last_record, run_all

METRICS = ("val_acc", "val_hsic", "val_bg", "val_fg_fraction", "wall_s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output", default="runs/cheap_sib")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--train-samples", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--val-samples", type=int, default=256)
    p.add_argument("--modes", default="exact,plain,every4,batch,both")
    p.add_argument("--sib-args", default="", help="sib-train arguments of every run, e.g. the lambdas")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    args = p.parse_args(argv)
    quarter = str(max(2, args.batch_size // 4))
    known = {"exact": ("exact every step", []), "plain": ("plain cross-entropy (--no-sib)", ["--no-sib"]),
             "batch": (f"--sib-batch {quarter}", ["--sib-batch", quarter]),
             "both": (f"--sib-every 4 --sib-batch {quarter}", ["--sib-every", "4", "--sib-batch", quarter])}
    modes = {}
    for key in args.modes.split(","):
        if key.startswith("every") and key[5:].isdigit():
            modes[f"--sib-every {key[5:]}"] = ["--sib-every", key[5:]]
        elif key.startswith("separate") and key[8:].isdigit():
            modes[f"--sib-every {key[8:]} --sib-lazy separate"] = ["--sib-every", key[8:], "--sib-lazy", "separate"]
        elif key in known:
            modes[known[key][0]] = known[key][1]
        else:
            p.error(f"--modes: unknown mode {key!r} (exact, plain, everyK, separateK, batch, both)")
    if "exact every step" not in modes:
        p.error("--modes: the differences are taken from 'exact', which must be one of them")
    seeds = [int(s) for s in args.seeds.split(",")]
    root = Path(args.output)
    todo, results = [], {}
    for name, extra in modes.items():
        for seed in seeds:
            out = root / f"{name.split(' (')[0].replace('--', '').replace(' ', '_')}_seed{seed}"
            results[name, seed] = out
            if last_record(out, args.epochs) is None:
                todo.append([sys.executable, "-m", "sib_fast.train", "--seed", str(seed), "--epochs", str(args.epochs),
                             "--train-samples", str(args.train_samples), "--val-samples", str(args.val_samples),
                             "--batch-size", str(args.batch_size), "--threads", "1", "--output", str(out),
                             *args.sib_args.split(), *extra])
    run_all(todo, args.jobs)
    rows = {}
    for (name, seed), out in results.items():
        rec = last_record(out, args.epochs)
        rec["wall_s"] = sum(r["epoch_time_s"] for r in history(out))
        rows.setdefault(name, {})[seed] = rec
    exact = rows["exact every step"]
    lines = [f"sib-train on SyntheticObjects, default model, {args.epochs} epochs of {args.train_samples} images, "
             f"batch {args.batch_size}, {args.sib_args or 'default weights'}, seeds {args.seeds}, one thread per run and {args.jobs} runs at a time; "
             "mean [95% t-interval] over seeds; wall_s: training time of the run (epochs, no held-out pass)", "",
             "| mode | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for name, per_seed in rows.items():
        lines.append(f"| {name} | " + " | ".join(interval([per_seed[s][m] for s in seeds]) for m in METRICS) + " |")
    lines += ["", "paired difference from exact every step, per seed (mode - exact):", "",
              "| mode | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for name, per_seed in rows.items():
        if per_seed is exact:
            continue
        lines.append(f"| {name} | " + " | ".join(interval([per_seed[s][m] - exact[s][m] for s in seeds])
                                                for m in METRICS) + " |")
    summary = "\n".join(lines) + "\n"
    (root / "summary.md").write_text(summary)
    (root / "results.json").write_text(json.dumps({f"{n}|{s}": r for (n, s), r in
                                                   ((k, rows[k[0]][k[1]]) for k in results)}, indent=1))
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
