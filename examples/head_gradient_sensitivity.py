"""How much does the S-IB head's gradient move when R carries rounding noise? (docs/vjp_modes.md, "Precision")

    python examples/head_gradient_sensitivity.py            # about 10 s on a CPU

At temperature 0.1 the soft quantiles of docs/loss.md section 2 are nearly order statistics: their
gradient falls on one or two pixels per quantile and image, and noise that reorders neighbouring
values of R moves it to other pixels. This script measures that on the float64 reference: the
share of |dR|^2 in each image's largest pixels, and the cosine between dR at R and at
R * (1 + rel * N(0, 1)) for noise levels from float32's rounding (1e-7) to bfloat16's (4e-3).
"""
import argparse

import torch

from sib_fast.backends import reference


def blob_maps(batch: int, channels: int, size: int, seed: int) -> torch.Tensor:
    """R-like maps: one Gaussian blob per image (the object) over faint noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    R = 1e-5 * torch.randn(batch, channels, size, size, generator=g, dtype=torch.float64)
    centres = torch.randint(size // 6, size - size // 6, (batch, 2), generator=g)
    for b, (cy, cx) in enumerate(centres.tolist()):
        R[b] += 1e-3 * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (size * size / 20.0))
    return R


def head_gradient(R: torch.Tensor, x: torch.Tensor, window: int) -> torch.Tensor:
    """dR of lambda_bg exp(BG) + lambda_fg exp(-HSIC) with the default weights of docs/loss.md section 6."""
    R = R.detach().requires_grad_()
    hsic, bg, _ = reference.sib_terms(R, x, window)
    (dR,) = torch.autograd.grad(1000.0 * torch.exp(bg) + 0.01 * torch.exp(-hsic), R)
    return dR


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.flatten() @ b.flatten() / (a.norm() * b.norm())).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--window", type=int, default=31)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    R = blob_maps(args.batch, 3, args.size, args.seed)
    x = torch.rand(R.shape, generator=torch.Generator().manual_seed(args.seed + 1), dtype=torch.float64)
    dR = head_gradient(R, x, args.window)
    per_pixel = dR.pow(2).sum(1).flatten(1)
    share = per_pixel.topk(8, dim=1).values.sum(1) / per_pixel.sum(1)
    print(f"share of |dR|^2 in each image's 8 largest pixels: min {share.min():.2f}, max {share.max():.2f}")
    noise = torch.Generator().manual_seed(args.seed + 2)
    for rel in (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 4e-3):
        noisy = R * (1 + rel * torch.randn(R.shape, generator=noise, dtype=R.dtype))
        print(f"relative noise {rel:7.0e} on R: cosine(dR, noise-free dR) = {cosine(head_gradient(noisy, x, args.window), dR):.4f}")


if __name__ == "__main__":
    main()
