"""``sib-bench --plot``: time vs batch per backend, and each backend's roofline position.

Left: forward+backward median time against batch (log-log), one line per
backend and dtype, the bars spanning the interquartile range. Right: the
achieved bandwidth over the floor bytes (docs/loss.md section 7) against batch, under
the roof of the copy bandwidth measured in the same run (and the datasheet
bandwidth on GPU): how far each backend is from the memory limit.
"""
from __future__ import annotations

from collections import defaultdict

from sib_fast.bench.record import PART_LABELS, header_lines


def plot_head(record: dict, path: str, part: str = "fwd_bwd") -> None:
    """Draw the head rows of ``record`` into ``path``; ImportError without matplotlib."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = defaultdict(list)
    for row in record["rows"]:
        if row.get("kind") == "head" and "timings" in row:
            series[(row["backend"], row["dtype"])].append(row)
    fig, (ax_time, ax_bw) = plt.subplots(1, 2, figsize=(13, 5.2))
    markers = "osD^v<>ph*"
    backends = sorted({b for b, _ in series})
    dtypes = sorted({d for _, d in series})
    for (backend, dtype), rows in sorted(series.items()):
        rows.sort(key=lambda r: r["batch"])
        batches = [r["batch"] for r in rows]
        med = [r["timings"][part]["median"] * 1e3 for r in rows]
        lo = [m - r["timings"][part]["q1"] * 1e3 for m, r in zip(med, rows)]
        hi = [r["timings"][part]["q3"] * 1e3 - m for m, r in zip(med, rows)]
        style = "-" if dtypes.index(dtype) == 0 else "--"
        label = f"{backend} ({dtype})" if len(dtypes) > 1 else backend
        marker = markers[backends.index(backend) % len(markers)]
        ax_time.errorbar(batches, med, yerr=[lo, hi], fmt=marker + style, capsize=3, label=label)
        gbps = [r["achieved_GBps"][part] for r in rows]
        ax_bw.plot(batches, gbps, marker + style, label=label)
    copy = record["copy_bandwidth"]["GBps"]
    ax_bw.axhline(copy, color="k", lw=1.2, label=f"measured copy {copy:.0f} GB/s")
    sheet = record.get("machine", {}).get("gpu", {}).get("datasheet_bandwidth_GBps")
    if sheet:
        ax_bw.axhline(sheet, color="gray", lw=1, ls=":", label=f"datasheet {sheet:.0f} GB/s")
    all_batches = sorted({r["batch"] for rows in series.values() for r in rows})
    for ax in (ax_time, ax_bw):
        ax.set_xscale("log", base=2)
        if all_batches:
            ax.set_xticks(all_batches, [str(b) for b in all_batches])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    s = record.get("head_settings", {})
    shape = f"{s.get('channels')}x{s.get('height')}x{s.get('width')}"
    ax_time.set_ylabel(f"{PART_LABELS[part]} time, ms (median, IQR bars)")
    ax_time.set_title(f"S-IB head {PART_LABELS[part]}, {shape}")
    ax_bw.set_ylabel("floor bytes / time, GB/s")
    ax_bw.set_title("roofline position: share of the memory bandwidth")
    fig.suptitle(header_lines(record)[0], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
