"""``python -m sib_fast.bench.tune``: the Triton backend's launch-plan constants, timed side by side.

The Triton backend plans every launch from a few constants, set for a block with
``sib_fast.backends.triton.plan.tunables`` (those timed here: ``TUNABLE`` below). Their defaults
were chosen without a GPU, from register counts and spills (``tests/test_triton_compile.py``);
this tool times the alternatives on the GPU at hand, in one run. Each variant sets some
constants, runs forward+backward of the head (gradient of HSIC and BG with respect to R, as
``sib-bench`` times it), and is checked against the default's outputs: a variant that changes
the result is reported, not ranked.

    python -m sib_fast.bench.tune --batch 128 --variant BWD_IMAGE_BLOCK=64 --variant MAX_IMAGE_BLOCK=64
    python -m sib_fast.bench.tune --variant "SELECT_CHUNK=1024,VBOX_BLOCK=64x32" --json tune.json

The default runs first and again last, so drift over the run (clocks, other work) shows. The
first call of each variant compiles its kernels and is not timed. On a CPU the kernels run in
Triton's interpreter (set ``TRITON_INTERPRET=1``): that checks a variant, it does not time it.
"""
from __future__ import annotations

import argparse
import sys

import torch

from sib_fast.backends.dispatch import unavailable_reason
from sib_fast.backends.reference import compute_dtype
from sib_fast.bench.lanes import UPSTREAM, lane_function, relative_error, resolve_device
from sib_fast.bench.machine import device_label, machine_info
from sib_fast.bench.measure import make_head_inputs, synchronize, time_calls
from sib_fast.bench.record import error_line, save_json
from sib_fast.cli_errors import OutputError, UsageError, check_output_file

#: constant -> what it sets; values are ints, or HxW for the two block shapes
TUNABLE = {
    "MAX_IMAGE_BLOCK": "images per Gram tile of the forward (power of two, 32..128)",
    "BWD_SINGLE_MAX": "largest batch whose backward keeps the B x B matrix on chip",
    "BWD_DR_SINGLE_MAX": "the same for the backward's second pass (dR) alone",
    "BWD_IMAGE_BLOCK": "images per row block of the backward beyond that (power of two, >= 16)",
    "BWD_PIXEL_BLOCK": "pixels per iteration of the backward passes (power of two, >= 16)",
    "BWD_WARPS": "warps per program of the backward passes (power of two)",
    "SELECT_CHUNK": "elements per iteration of the rank selection (power of two)",
    "SELECT_DIGIT_BITS": "bits per radix pass of the rank selection (1 to 8)",
    "HBOX_BLOCK": "rows x columns per iteration of the row running sums",
    "VBOX_BLOCK": "rows x columns per iteration of the column running sums",
}
# Spills on sm_90 at 224x224, B=128 (ptxas): BWD_WARPS=4 8 bytes in pass 2 under Triton 3.8,
# BWD_IMAGE_BLOCK=64,BWD_WARPS=4 16 bytes in pass 1 under 3.6, the others none. Not listed:
# BWD_PIXEL_BLOCK=32 spills 16-24 bytes under 3.6, SELECT_CHUNK=4096 16 bytes under 3.6 (its
# histograms hold their bins in registers). The whole batch per backward program (wgmma with A in
# shared memory, no spills): BWD_SINGLE_MAX=128 for both passes, pass 1 then in two launches (R's
# share, x's share: A and A' together need 278 KB, over sm_90's 227 KB), 147 KB, or 163 KB with
# 32-pixel blocks (64 spill); BWD_DR_SINGLE_MAX=128 for pass 2 alone. They come first, as the
# question a static count cannot settle: the default's 32-image row blocks load their blocks of A
# again for every pixel block, channel and column block, the whole batch reads A from shared
# memory for every product (RESULTS.md, "GPU, before the first run").
# The select's digit width defaults by Triton version; the variant equal to the default is skipped.
DEFAULT_VARIANTS = ("BWD_SINGLE_MAX=128,BWD_PIXEL_BLOCK=32", "BWD_SINGLE_MAX=128", "BWD_DR_SINGLE_MAX=128",
                    "SELECT_DIGIT_BITS=4", "SELECT_DIGIT_BITS=8", "BWD_IMAGE_BLOCK=64", "BWD_WARPS=4",
                    "BWD_IMAGE_BLOCK=64,BWD_WARPS=4", "MAX_IMAGE_BLOCK=64", "SELECT_CHUNK=1024")


SHAPED = ("HBOX_BLOCK", "VBOX_BLOCK")  # HxW; the others are integers


def parse_variant(text: str) -> dict:
    """``"NAME=V,NAME=HxW"`` -> ``{NAME: V, NAME: (H, W)}``, every name in ``TUNABLE``."""
    settings = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = (s.strip() for s in item.partition("="))
        if not sep or name not in TUNABLE:
            raise UsageError(f"--variant: {item!r} is not NAME=VALUE with NAME one of {', '.join(TUNABLE)}")
        try:
            numbers = tuple(int(v) for v in value.lower().split("x"))
        except ValueError:
            numbers = ()
        if len(numbers) != (2 if name in SHAPED else 1):
            raise UsageError(f"--variant: {name} takes {'HxW' if name in SHAPED else 'an integer'}, got {value!r}")
        if name == "SELECT_DIGIT_BITS" and not 1 <= numbers[0] <= 8:
            raise UsageError(f"--variant: SELECT_DIGIT_BITS must be 1 to 8, got {value!r}")
        batch = name in ("BWD_SINGLE_MAX", "BWD_DR_SINGLE_MAX")
        if any(v < 1 or (v & (v - 1) and not batch and name != "SELECT_DIGIT_BITS") for v in numbers):
            raise UsageError(f"--variant: {name} must be {'positive' if batch else 'a power of two'}, "
                             f"got {value!r}")
        settings[name] = numbers if name in SHAPED else numbers[0]
    if not settings:
        raise UsageError(f"--variant: empty variant {text!r}")
    return settings


def new_record(args, device: torch.device) -> dict:
    return {"tool": "sib_fast.bench.tune", "machine": machine_info(device),
            "shape": [args.batch, args.channels, args.size, args.size], "dtype": args.dtype,
            "window": args.window, "rows": []}


def run(args, device: torch.device, record: dict) -> None:
    # triton is optional: --help and the argument checks run without it
    from sib_fast.backends.triton.plan import tunable_values, tunables

    reason = unavailable_reason("triton", device.type)
    if reason:
        raise UsageError(f"the triton backend cannot run here: {reason}")
    variants = [("default", {})]
    for text in args.variant or DEFAULT_VARIANTS:
        settings = parse_variant(text)
        if all(tunable_values()[name] == value for name, value in settings.items()):
            print(f"  {text}: skipped, the default here")
            continue
        variants.append((text, settings))
    variants.append(("default (again)", {}))
    shape = tuple(record["shape"])
    dtype = getattr(torch, args.dtype)
    inputs = [make_head_inputs(*shape, dtype, device, seed=args.seed + i) for i in range(2)]
    head = lane_function("triton", args.window)
    grads = tuple(torch.tensor(u, dtype=compute_dtype(inputs[0][0]), device=device) for u in UPSTREAM)

    def forward_backward(inp, _state=None):
        R, x = inp
        hsic, bg, _ = head(R, x)
        (dR,) = torch.autograd.grad((hsic, bg), (R,), grads)
        return hsic.detach(), bg.detach(), dR

    print(f"tune: {device_label(record['machine'], device.type)}, B x C x H x W = {shape}, {args.dtype}",
          file=sys.stderr, flush=True)
    expected = None
    for label, settings in variants:
        row = {"variant": label, "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}}
        print(f"  {label} ...", file=sys.stderr, flush=True)
        try:
            with tunables(**settings):
                out = forward_backward(inputs[0])  # compiles this variant's kernels
                synchronize(device)
                if expected is None:
                    expected = out
                row["max_rel_err"] = {name: relative_error(a, b) for name, a, b in zip(("hsic", "bg", "dR"), out, expected)}
                del out
                row["fwd_bwd"] = time_calls(forward_backward, None, inputs, device, min_reps=args.min_reps,
                                            max_reps=args.max_reps, min_time=args.min_time)
        except Exception as exc:  # a variant that fails to compile or run is a result, not the end of the run
            row["error"] = error_line(exc)
        record["rows"].append(row)
        save_json(record, args.json)  # atomic: a failed write leaves the last record intact


def table(record: dict, tolerance: float) -> str:
    base = next((r["fwd_bwd"]["median"] for r in record["rows"] if "fwd_bwd" in r), None)
    lines = ["| variant | fwd+bwd ms (IQR) | vs default | max rel err vs default (hsic / bg / dR) |",
             "|---|---|---|---|"]
    for r in record["rows"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error']} | - | - |")
            continue
        t = r["fwd_bwd"]
        err = r["max_rel_err"]
        flag = "" if max(err.values()) <= tolerance else " **differs**"
        lines.append(f"| {r['variant']} | {t['median'] * 1e3:.3f} ({t['iqr'] * 1e3:.3f}) | {base / t['median']:.2f}x | "
                     f"{err['hsic']:.1e} / {err['bg']:.1e} / {err['dR']:.1e}{flag} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sib_fast.bench.tune", description=__doc__.split("\n\n")[0],
                                epilog="tunable constants:\n" + "\n".join(f"  {k}: {v}" for k, v in TUNABLE.items()),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cuda (default when available), or cpu under TRITON_INTERPRET=1")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "float64"))
    p.add_argument("--window", type=int, default=31)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variant", action="append",
                   help=f"NAME=VALUE[,NAME=VALUE...], repeatable (default: {' '.join(DEFAULT_VARIANTS)})")
    p.add_argument("--min-reps", type=int, default=10)
    p.add_argument("--max-reps", type=int, default=50)
    p.add_argument("--min-time", type=float, default=0.5, help="seconds spent at least per variant")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest relative error that counts as the same result")
    p.add_argument("--json", metavar="PATH", help="write every number (rewritten after each variant)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.batch < 2:
            raise UsageError("--batch: the head needs at least 2 images per batch (HSIC)")
        for text in args.variant or ():
            parse_variant(text)  # every variant is checked before anything runs
        device = resolve_device(args.device)
        if args.json:  # before minutes of measuring, not after
            check_output_file(args.json, "--json")
        record = new_record(args, device)
        try:
            run(args, device, record)
        except OutputError as exc:
            print(table(record, args.tolerance))
            print(f"tune: {exc}; the rows above are complete", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(table(record, args.tolerance))
            print("tune: interrupted; the rows above are complete", file=sys.stderr)
            return 130
    except UsageError as exc:
        print(f"tune: {exc}", file=sys.stderr)
        return 2
    print(table(record, args.tolerance))
    return 0


if __name__ == "__main__":
    sys.exit(main())
