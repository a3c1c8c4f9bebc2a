"""Where do R and its mask M sit relative to the object? Per arm of a strength experiment, over seeds.

    python examples/mask_placement.py runs/sib_strength/cue0 --arms baseline,HSIC_term_10pct

S-IB's HSIC term rewards the dependence between R*M and x*M, with M computed from R itself, so it
can be satisfied wherever M is put. For each run folder ``ARM_s<seed>`` under ROOT, on the clean
SyntheticObjects validation images: the share of |R| on the object (saliency), the share of M's mass on the
object, the mean of M on and off the object, the HSIC and BG of section 4 and 5, and the accuracy;
per arm the mean [95% t-interval] over its seeds.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import torch

from sib_fast import sib_terms
from sib_fast.evaluation.inputs import build, load_run
from sib_fast.evaluation.localization import mean_t_interval
from sib_fast.training.data import SyntheticObjects
from sib_fast.vjp import input_vjp

COLUMNS = ("accuracy", "saliency on object", "M mass on object", "mean M on object", "mean M off object", "HSIC", "BG")


def placement(run_dir: Path, images: int) -> dict:
    run = load_run(str(run_dir), log=lambda *a: None)
    a = run["args"]
    data = SyntheticObjects("val", images, image_size=a.get("image_size", 64), num_classes=a.get("num_classes", 6),
                            seed=0)
    items = [data[i] for i in range(len(data))]
    x = torch.stack([it[0] for it in items])
    y = torch.tensor([it[1] for it in items])
    obj = torch.stack([it[2] for it in items])[:, 0].flatten(1)
    wrapped = build(run, data.num_classes, torch.device("cpu"))
    xn = ((x - wrapped.mean) / wrapped.std).requires_grad_(True)  # R and HSIC on the input as sib-train feeds it
    logits = wrapped.model(xn)
    R = input_vjp(logits, xn, create_graph=False).detach()
    terms = sib_terms(R, xn.detach(), window_size=a.get("window_size") or 9, temperature=a.get("temperature", 0.1),
                      slope=a.get("slope", 10.0))
    m = terms.mask.flatten(1)
    sal = R.abs().sum(1).flatten(1)
    return {"accuracy": float((logits.argmax(1) == y).double().mean()),
            "saliency on object": float(((sal * obj).sum(1) / sal.sum(1).clamp_min(1e-30)).mean()),
            "M mass on object": float(((m * obj).sum(1) / m.sum(1).clamp_min(1e-30)).mean()),
            "mean M on object": float(((m * obj).sum(1) / obj.sum(1).clamp_min(1)).mean()),
            "mean M off object": float(((m * (1 - obj)).sum(1) / (1 - obj).sum(1).clamp_min(1)).mean()),
            "HSIC": float(terms.hsic), "BG": float(terms.bg), "area": float(obj.mean())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("root", help="a setting's folder of the strength experiment (holding ARM_s<seed>/ runs)")
    p.add_argument("--arms", default=None, help="comma-separated arm folder names (default: every arm found)")
    p.add_argument("--images", type=int, default=128)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    root = Path(args.root)
    runs: dict[str, list[Path]] = {}
    for d in sorted(root.iterdir()):
        match = re.fullmatch(r"(.+)_s(\d+)", d.name)
        if match and (d / "checkpoint.pt").is_file():
            runs.setdefault(match.group(1), []).append(d)
    arms = args.arms.split(",") if args.arms else sorted(runs)
    missing = [a for a in arms if a not in runs]
    if missing:
        sys.exit(f"mask_placement: no runs of {', '.join(missing)} under {root}")
    rows, area = [], []
    for arm in arms:
        per_seed = [placement(d, args.images) for d in runs[arm]]
        area += [r["area"] for r in per_seed]

        def cell(key):
            m, lo, hi = mean_t_interval([r[key] for r in per_seed])
            digits = ".2e" if key == "BG" else ".3f"
            return "n/a" if math.isnan(m) else f"{m:{digits}} [{lo:{digits}}, {hi:{digits}}]"

        rows.append(f"| {arm} ({len(per_seed)}) | " + " | ".join(cell(k) for k in COLUMNS) + " |")
    print(f"{root}: {args.images} clean validation images per run; object area {sum(area) / len(area):.3f}; "
          "mean [95% t-interval] over seeds\n")
    print("| arm (seeds) | " + " | ".join(COLUMNS) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
