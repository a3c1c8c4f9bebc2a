"""How closely the cheaper S-IB steps follow the exact one: ``python -m sib_fast.bench.agreement``.

For several batches of SyntheticObjects the S-IB part of the weight gradient (``sib_backward``'s
gradient minus the cross-entropy gradient) is taken exactly on the whole batch and with each
cheaper step, at the same weights. Printed per mode, the cosine with the exact gradient:

- ``per batch``: mean over batches of the cosine on each batch (sub-batch modes);
- ``averaged``: of the gradients averaged over all batches. A lazy schedule (``--sib-every K``)
  takes the head on every K-th batch at weight K, so its average is the mean over those batches:
  its cosine *is* the sampling noise of using 1/K of the batches, the baseline it is beside.

``--sib-bn batch`` is, by construction, the exact S-IB step of the b images on their own: its row
is the sampling noise of taking the head on b of B images, the baseline of the other two.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from sib_fast import SIBLoss, sib_backward
from sib_fast.bench.record import save_json
from sib_fast.cli_errors import OutputError, UsageError, check_output_file
from sib_fast.training.data import SYNTHETIC_STATS, SyntheticObjects
from sib_fast.training.models import build_model
from sib_fast.training.norms import SUB_BATCH_NORMS, frozen_norm_statistics


def head_gradient(model, x, y, criterion, **mode) -> torch.Tensor:
    """The S-IB part of the weight gradient of one ``sib_backward`` call, running statistics untouched."""
    params = [p for p in model.parameters() if p.requires_grad]

    def flat():
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().double() for p in params])

    with frozen_norm_statistics(model):
        model.zero_grad(set_to_none=True)
        sib_backward(model, x, y, criterion, **mode)
        total = flat()
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        return total - flat()


def _cos(a, b) -> float:
    return F.cosine_similarity(a, b, dim=0).item()


def measure(args) -> dict:
    torch.manual_seed(args.seed)
    model = build_model(args.model, args.num_classes, args.size).train()
    criterion = SIBLoss(window_size=args.window, backend=args.backend)
    data = SyntheticObjects("train", args.batches * args.batch, image_size=args.size, num_classes=args.num_classes,
                            seed=args.seed)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in SYNTHETIC_STATS)
    batches = []
    for i in range(args.batches):
        items = [data[i * args.batch + j] for j in range(args.batch)]
        x = (torch.stack([it[0] for it in items]) - mean) / std
        batches.append((x, torch.tensor([it[1] for it in items])))
    sub_sizes = [args.batch // n for n in (2, 4, 8) if args.batch // n >= 2]
    exact = [head_gradient(model, x, y, criterion) for x, y in batches]
    exact_mean = torch.stack(exact).mean(0)
    rows = []

    def add(name, per_batch_grads):
        rows.append({"mode": name,
                     "per_batch": None if per_batch_grads is None else
                     sum(_cos(g, e) for g, e in zip(per_batch_grads, exact)) / len(exact),
                     "averaged": _cos(torch.stack(per_batch_grads).mean(0), exact_mean)})
        print(f"  {name}: averaged {rows[-1]['averaged']:.3f}", file=sys.stderr, flush=True)

    for b in sub_sizes:
        for bn in SUB_BATCH_NORMS:
            add(f"--sib-batch {b} --sib-bn {bn}", [head_gradient(model, x, y, criterion, sib_batch=b, sib_bn=bn)
                                                   for x, y in batches])
    for k in (2, 4, 8):
        if k > args.batches:
            continue
        lazy = [k * g if i % k == 0 else torch.zeros_like(g) for i, g in enumerate(exact)]
        rows.append({"mode": f"--sib-every {k}", "per_batch": None,
                     "averaged": _cos(torch.stack(lazy).mean(0), exact_mean)})
    return {"tool": "sib_fast.bench.agreement", "model": args.model, "size": args.size, "batch": args.batch,
            "batches": args.batches, "seed": args.seed, "rows": rows}


def table(record: dict) -> str:
    lines = [f"S-IB weight-gradient cosine with the exact whole-batch step: {record['model']} at {record['size']} px, "
             f"batch {record['batch']}, {record['batches']} batches of SyntheticObjects, random init, train mode", "",
             "| mode | per batch | averaged over batches |", "|---|---|---|"]
    for r in record["rows"]:
        per = "-" if r["per_batch"] is None else f"{r['per_batch']:.3f}"
        lines.append(f"| {r['mode']} | {per} | {r['averaged']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sib_fast.bench.agreement", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="sib_cnn")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--num-classes", type=int, default=6)
    p.add_argument("--window", type=int, default=9)
    p.add_argument("--backend", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    try:
        if args.batch < 4 or args.batches < 2:
            raise UsageError("--batch must be >= 4 and --batches >= 2")
        if args.json:
            check_output_file(args.json, "--json")
        if args.threads:
            torch.set_num_threads(args.threads)
        record = measure(args)
        if args.json:
            save_json(record, args.json)
    except (UsageError, OutputError) as exc:
        print(f"agreement: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    print(table(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
