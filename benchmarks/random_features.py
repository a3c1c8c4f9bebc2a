"""The random-feature HSIC measured (issue 22, docs/random_features.md): cost and memory, and how
HSIC_F approaches the HSIC as F grows.

    python benchmarks/random_features.py cost [--batch 16 --size 224 --features 512 --threads 1]
    python benchmarks/random_features.py convergence --checkpoint RUN_DIR [--batch 32 --seeds 20]
    python benchmarks/random_features.py generation [--size 224 --features 512]

``cost``: forward+backward of the head with and without the projection, lanes side by side in
one run (each round runs every lane once; medians over rounds), and each lane's peak extra memory:
  cpu               the fused head, no projection (the function of section 4)
  cpu+fused         the fused head and the fused projection, W never stored (ours)
  cpu+materialised  the fused head, W from gaussian_matrix and plain matmuls (reference.masked_projection)
  cpu+randn         the fused head, W = torch.randn and plain matmuls (the authors' projection)
  reference         backend='reference' with hsic_features: everything in plain PyTorch, W materialised
  authors           the reference head with W = torch.randn (the authors' code, as far as it goes)
``generation``: the fused projection's forward at several B on one shape; its cost is
a + b B, and the intercept a is what generating the D x F entries costs per pass.
``convergence``: on VJP maps R of a trained model (a sib-train run folder), the HSIC of section 4
and HSIC_F over seeds for F = 16 .. 4096.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import sib_fast
from sib_fast.backends import reference
from sib_fast.backends.random_features import projected_hsic
from sib_fast.bench.measure import make_head_inputs, peak_extra_memory


def _fused_head(R, x, window):
    return sib_fast.sib_terms(R, x, window_size=window, backend="cpu")


def _projection_lane(project):
    """The fused head's bg and mask, HSIC_F from ``project(R, x, mask) -> (proj, sq)``."""
    def run(R, x, window, features, seed):
        _, bg, mask = _fused_head(R, x, window)
        proj, sq = project(R, x, mask, features, seed)
        return projected_hsic(proj, sq), bg

    return run


def _randn_projection(R, x, mask, features, seed):
    m = mask.unsqueeze(1)
    u, v = (R * m).flatten(1), (x * m).flatten(1)
    W = torch.randn(u.shape[1], features, generator=torch.Generator().manual_seed(seed), dtype=u.dtype)
    return torch.stack((u @ W, v @ W)), torch.stack(((u * u).sum(1), (v * v).sum(1)))


def _authors(R, x, window, features, seed):
    mask = reference.spatial_mask(R, window)
    W = torch.randn(R[0].numel(), features, generator=torch.Generator().manual_seed(seed), dtype=R.dtype)
    return reference.random_feature_hsic(R, x, mask, W), reference.background_variance(R, mask)


LANES = {
    "cpu": lambda R, x, window, features, seed: _fused_head(R, x, window)[:2],
    "cpu+fused": lambda R, x, window, features, seed: sib_fast.sib_terms(
        R, x, window_size=window, backend="cpu", hsic_features=features, projection_seed=seed)[:2],
    "cpu+materialised": _projection_lane(reference.masked_projection),
    "cpu+randn": _projection_lane(_randn_projection),
    "reference": lambda R, x, window, features, seed: sib_fast.sib_terms(
        R, x, window_size=window, backend="reference", hsic_features=features, projection_seed=seed)[:2],
    "authors": _authors,
}


def _forward_backward(lane, R, x, window, features, seed):
    hsic, bg = LANES[lane](R, x, window, features, seed)
    return torch.autograd.grad((hsic, bg), (R,), (torch.ones_like(hsic), torch.ones_like(bg)))[0]


def cost(args) -> dict:
    torch.set_num_threads(args.threads)
    R, x = make_head_inputs(args.batch, 3, args.size, args.size, torch.float32, torch.device("cpu"))
    lanes = args.lanes.split(",")
    times = {lane: [] for lane in lanes}
    for lane in lanes:  # warm-up
        _forward_backward(lane, R, x, args.window, args.features, 0)
    for rnd in range(args.rounds):
        for lane in lanes:
            start = time.perf_counter()
            _forward_backward(lane, R, x, args.window, args.features, rnd + 1)
            times[lane].append(time.perf_counter() - start)
    rows = {}
    for lane in lanes:
        mem = peak_extra_memory(lambda: _forward_backward(lane, R, x, args.window, args.features, 99), R.device)
        rows[lane] = dict(median_s=statistics.median(times[lane]), times_s=times[lane], peak_extra_bytes=mem["bytes"],
                          memory_method=mem["method"])
    r_bytes = R.numel() * R.element_size()
    print(f"B={args.batch} 3x{args.size}x{args.size} float32, F={args.features}, {args.threads} thread(s), "
          f"{args.rounds} rounds; R = {r_bytes / 1e6:.2f} MB")
    print(f"{'lane':18s} {'fwd+bwd ms':>11s} {'vs cpu+fused':>13s} {'peak extra MB':>14s} {'x R':>6s}")
    ours = rows.get("cpu+fused", {}).get("median_s")
    for lane, row in rows.items():
        ratio = f"{row['median_s'] / ours:.2f}x" if ours else ""
        mb = row["peak_extra_bytes"] / 1e6 if row["peak_extra_bytes"] is not None else float("nan")
        print(f"{lane:18s} {row['median_s'] * 1e3:11.1f} {ratio:>13s} {mb:14.1f} {mb * 1e6 / r_bytes:6.2f}")
    return dict(rows=rows, r_bytes=r_bytes, args=vars(args))


def generation(args) -> dict:
    """Times of the fused projection's forward op alone at several B: t(B) = a + b B."""
    torch.set_num_threads(args.threads)
    op = torch.ops.sib_fast.masked_projection_forward
    points = []
    for B in (2, 4, 8, 16):
        R, x = make_head_inputs(B, 3, args.size, args.size, torch.float32, torch.device("cpu"))
        mask = torch.rand(B, args.size, args.size)
        R = R.detach()
        op(R, x, mask, args.features, 0)
        ts = []
        for i in range(args.rounds):
            start = time.perf_counter()
            op(R, x, mask, args.features, i)
            ts.append(time.perf_counter() - start)
        points.append((B, statistics.median(ts)))
    n = len(points)
    mb, mt = sum(b for b, _ in points) / n, sum(t for _, t in points) / n
    slope = sum((b - mb) * (t - mt) for b, t in points) / sum((b - mb) ** 2 for b, _ in points)
    intercept = mt - slope * mb
    entries = 3 * args.size * args.size * args.features
    for B, t in points:
        print(f"B={B:3d}: forward {t * 1e3:8.1f} ms")
    print(f"fit: {intercept * 1e3:.1f} ms + {slope * 1e3:.2f} ms per image; {entries / 1e6:.1f} M entries per "
          f"pass, so about {intercept / entries * 1e9:.2f} ns per entry generated")
    return dict(points=points, intercept_s=intercept, per_image_s=slope, entries=entries, args=vars(args))


def convergence(args) -> dict:
    from sib_fast.evaluation.inputs import build, load_run
    from sib_fast.training.data import SyntheticObjects

    torch.set_num_threads(args.threads)
    run = load_run(args.checkpoint)
    a = run["args"]
    model = build(run, a.get("num_classes", 6), torch.device("cpu"))
    data = SyntheticObjects("val", length=args.batch * args.batches, image_size=a.get("image_size", 64),
                            num_classes=a.get("num_classes", 6), seed=1, spurious=a.get("spurious", 0.0))
    window = a.get("window_size", 31)
    features = [int(f) for f in args.features_list.split(",")]
    results = {f: [] for f in features}
    exact = []
    for batch in range(args.batches):
        xs = torch.stack([data[batch * args.batch + i][0] for i in range(args.batch)]).requires_grad_()
        R = sib_fast.input_vjp(model(xs), xs, create_graph=False).detach()
        xs = xs.detach()
        h = sib_fast.sib_terms(R, xs, window_size=window, backend="cpu").hsic.item()
        exact.append(h)
        for f in features:
            values = [sib_fast.sib_terms(R, xs, window_size=window, backend="cpu", hsic_features=f,
                                         projection_seed=1000 * batch + s).hsic.item() for s in range(args.seeds)]
            results[f].append(values)
    print(f"{run['path']}: {args.batches} batches of {args.batch} VJP maps "
          f"({a.get('image_size', 64)}px, window {window}), {args.seeds} seeds per F")
    print("HSIC (section 4) per batch: " + ", ".join(f"{h:.4f}" for h in exact))
    print(f"{'F':>6s} {'mean HSIC_F - HSIC':>19s} {'sd over seeds':>14s} {'sd / HSIC':>10s} {'min':>8s} {'max':>8s}")
    table = {}
    for f in features:
        diffs = [v - h for vals, h in zip(results[f], exact) for v in vals]
        sds = [statistics.stdev(vals) for vals in results[f]]
        row = dict(mean_diff=statistics.mean(diffs), se_diff=statistics.stdev(diffs) / len(diffs) ** 0.5,
                   sd=statistics.mean(sds), rel_sd=statistics.mean(s / h for s, h in zip(sds, exact)),
                   low=min(min(v) for v in results[f]), high=max(max(v) for v in results[f]))
        table[f] = row
        print(f"{f:6d} {row['mean_diff']:+10.1e} +- {row['se_diff']:.0e} {row['sd']:14.2e} {row['rel_sd']:10.3f} "
              f"{row['low']:8.4f} {row['high']:8.4f}")
    return dict(exact=exact, values=results, table=table, args=vars(args))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    for name in ("cost", "generation", "convergence"):
        p = sub.add_parser(name)
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--json", help="also write the figures to this file")
        if name == "cost":
            p.add_argument("--batch", type=int, default=16)
            p.add_argument("--size", type=int, default=224)
            p.add_argument("--features", type=int, default=512)
            p.add_argument("--window", type=int, default=31)
            p.add_argument("--rounds", type=int, default=5)
            p.add_argument("--lanes", default=",".join(LANES))
        elif name == "generation":
            p.add_argument("--size", type=int, default=224)
            p.add_argument("--features", type=int, default=512)
            p.add_argument("--rounds", type=int, default=5)
        else:
            p.add_argument("--checkpoint", required=True, help="a sib-train output folder or checkpoint.pt")
            p.add_argument("--batch", type=int, default=32)
            p.add_argument("--batches", type=int, default=4)
            p.add_argument("--seeds", type=int, default=20)
            p.add_argument("--features-list", default="16,32,64,128,256,512,1024,2048,4096")
    args = parser.parse_args(argv)
    result = {"cost": cost, "generation": generation, "convergence": convergence}[args.mode](args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
