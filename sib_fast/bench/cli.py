"""``sib-bench``: how fast is each S-IB backend here, and how far from the memory limit.

Head mode (default) times, for each available backend, the eager reference
and ``torch.compile`` of the reference, the forward, the backward and the
forward+backward of the head (``sib_terms`` and the gradient of HSIC and BG
with respect to R) over batches and dtypes; it reports medians and
interquartile ranges, the peak extra memory, the achieved bandwidth over the
floor bytes of docs/loss.md section 7 and its share of the machine's copy bandwidth
measured in the same run, and the error against the eager reference.

Step mode (``--step``) times a full training step (forward, loss, backward,
AdamW step) of a torchvision ResNet-50 and a small ViT with plain
cross-entropy and with S-IB in its exact and finite-difference modes.

    sib-bench                                   # head, this machine's defaults
    sib-bench --batch 8,32,128 --dtype float32,bfloat16 --json head.json --plot head.png
    sib-bench --step --model resnet50,vit_s_16 --step-batch 64 --json step.json
    sib-bench --from-json head.json --plot head.png --markdown RESULTS.md

Timings are medians over rotating input sets (CUDA events on GPU,
``perf_counter`` after warm-up on CPU); see ``sib_fast.bench.measure``.

This module parses the arguments and dispatches: head mode is ``sib_fast.bench.head``, step
mode ``sib_fast.bench.step``, the JSON record ``record`` and its printed report ``report``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from sib_fast.bench.head import head_config, run_head
from sib_fast.bench.lanes import COMPILE_LANE, resolve_device
from sib_fast.bench.machine import load_average
from sib_fast.bench.plot import plot_head
from sib_fast.bench.record import header_lines, load_record, new_record, save_json
from sib_fast.bench.report import append_markdown, render
from sib_fast.bench.step import run_step, step_config
from sib_fast.cli_errors import OutputError, UsageError, check_output_file, os_reason


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sib-bench", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Head mode by default; --step for the training step; --from-json to re-render a record.")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write every number (rewritten after each row)")
    p.add_argument("--plot", metavar="PATH", help="head mode: time vs batch and roofline position (matplotlib)")
    p.add_argument("--markdown", metavar="PATH", help="append the table(s) with date, machine and commit")
    p.add_argument("--note", default="", help="a line recorded with the results (e.g. 'shared machine, noisy')")
    p.add_argument("--copy-mib", type=int, default=None,
                   help="buffer size of the copy-bandwidth measurement (default: 8x the cache, >= 256 MiB CPU, 1 GiB GPU)")
    p.add_argument("--from-json", metavar="PATH", help="print, plot or append a recorded run instead of running")

    head = p.add_argument_group("head mode")
    head.add_argument("--batch", default=None, help="batch sizes (default: cpu 4,16; cuda 8,32,128)")
    head.add_argument("--size", default="224", help="image size, N or HxW (default 224)")
    head.add_argument("--channels", type=int, default=3)
    head.add_argument("--dtype", default="float32", help="comma-separated: float32,bfloat16,float16,float64")
    head.add_argument("--backends", default="all",
                      help=f"comma-separated: reference, {COMPILE_LANE} (or compile), cpu, cuda, triton, all")
    head.add_argument("--no-compile", action="store_true", help="leave out torch.compile of the reference")
    head.add_argument("--compile-batch", default=None,
                      help="batches at which to run torch.compile (default: all); each shape compiles anew")
    head.add_argument("--window", type=int, default=31)
    head.add_argument("--warmup", type=int, default=2, help="untimed forward+backward calls per backend")
    head.add_argument("--min-reps", type=int, default=5)
    head.add_argument("--max-reps", type=int, default=30)
    head.add_argument("--min-time", type=float, default=1.0, help="seconds spent at least per measurement")
    head.add_argument("--quick", action="store_true", help="1 warm-up, 3 to 5 reps: a smoke test, not a measurement")
    head.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    head.add_argument("--no-check", action="store_true", help="skip the comparison with the eager reference")
    head.add_argument("--profile", action="store_true",
                      help="also list each row's largest GPU kernels (CPU: operators) in one forward+backward")

    step = p.add_argument_group("step mode")
    step.add_argument("--step", action="store_true", help="time full training steps instead of the head")
    step.add_argument("--model", default="resnet50,vit_s_16",
                      help="models as sib-train --arch takes them (torchvision, timm, sib_cnn), vit_s_16 (ViT-S/16: "
                           "12 layers, 6 heads, width 384) or tiny_cnn (smoke test)")
    step.add_argument("--step-batch", type=int, default=None, help="default: cpu 4, cuda 64")
    step.add_argument("--step-size", type=int, default=224)
    step.add_argument("--num-classes", type=int, default=1000)
    step.add_argument("--vjp", default="exact,finite_difference", help="S-IB modes to time")
    step.add_argument("--sib-modes", default=None, metavar="LIST",
                      help="cheaper S-IB steps to time too, e.g. every=4,batch=B/8,every=4+batch=B/4+bn=batch")
    step.add_argument("--step-reps", type=int, default=5, help="timed steps per row (after 2 warm-up steps)")
    step.add_argument("--channels-last", action="store_true")
    return p


def check_outputs(args) -> None:
    """--json, --plot and --markdown must be writable before minutes of measuring, not after."""
    if args.json and not args.from_json:
        check_output_file(args.json, "--json")
    if args.markdown:
        check_output_file(args.markdown, "--markdown")
    if args.plot:
        check_output_file(args.plot, "--plot")
        ext = Path(args.plot).suffix.lstrip(".").lower()
        try:
            from matplotlib.backend_bases import FigureCanvasBase
        except ImportError:
            return  # said when plotting: the measurements are worth having without the plot
        kinds = FigureCanvasBase.get_supported_filetypes()
        if ext not in kinds:
            what = f".{ext} files" if ext else "a file without an extension"
            known = ", ".join("." + k for k in sorted(kinds))
            raise UsageError(f"--plot {args.plot}: matplotlib cannot write {what}; use one of {known}")


def main(argv: list[str] | None = None) -> int:
    """``sib-bench``: the exit status (0, 1 when an output failed, 2 on a bad argument, 130 on Ctrl-C)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    threads = torch.get_num_threads()
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # main() may run inside another program (tests): leave it as found


def _run(args) -> int:
    try:
        check_outputs(args)
        if args.from_json:
            record = load_record(args.from_json)
        else:
            if args.quick:
                args.warmup, args.min_reps, args.max_reps, args.min_time = 1, 3, 5, 0.0
            if args.threads is not None:
                if args.threads < 1:
                    raise UsageError(f"--threads must be >= 1, got {args.threads}")
                torch.set_num_threads(args.threads)
            if args.copy_mib is not None and args.copy_mib < 1:
                raise UsageError(f"--copy-mib must be >= 1, got {args.copy_mib}")
            if args.min_reps < 1 or args.max_reps < args.min_reps or args.warmup < 0 or args.min_time < 0:
                raise UsageError("need --warmup >= 0, 1 <= --min-reps <= --max-reps and --min-time >= 0")
            device = resolve_device(args.device)
            if args.step:
                config = step_config(args, device)
            else:
                config = head_config(args, device)
            record = new_record(args, device, "step" if args.step else "head")
            print("\n".join(header_lines(record)), file=sys.stderr, flush=True)
            try:
                if args.step:
                    run_step(args, device, record, config)
                else:
                    run_head(args, device, record, config)
            except OutputError as exc:  # --json failed mid-run: the rows measured so far go to stdout
                print(render(record))
                print(f"sib-bench: {exc}; the rows above are complete", file=sys.stderr)
                return 1
            except KeyboardInterrupt:
                record["interrupted"] = True
                record["loadavg_1min_at_end"] = load_average()
                save_json(record, args.json)
                print(render(record))
                print("sib-bench: interrupted; the rows above are complete", file=sys.stderr)
                return 130
            record["loadavg_1min_at_end"] = load_average()
            save_json(record, args.json)
    except UsageError as exc:
        print(f"sib-bench: {exc}", file=sys.stderr)
        return 2
    except OutputError as exc:
        print(f"sib-bench: {exc}", file=sys.stderr)
        return 1
    print(render(record))
    status = 0
    if args.plot:
        if record["mode"] != "head":
            print("sib-bench: --plot draws head-mode records; nothing plotted", file=sys.stderr)
        else:
            try:
                plot_head(record, args.plot)
            except ImportError as exc:
                print(f"sib-bench: cannot plot ({exc}); install matplotlib", file=sys.stderr)
            except OSError as exc:
                print(f"sib-bench: cannot write the plot {args.plot}: {os_reason(exc)}", file=sys.stderr)
                status = 1
    if args.markdown:
        try:
            append_markdown(record, args.markdown)
        except OSError as exc:
            print(f"sib-bench: cannot append to {args.markdown}: {os_reason(exc)}", file=sys.stderr)
            status = 1
    return status
