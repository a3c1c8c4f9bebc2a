"""The ``sib-bench/1`` record: made, saved after every row, loaded for ``--from-json``, and the
pieces of text every table and plot of it shares (its header lines, times, failures).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from sib_fast.bench.machine import copy_bandwidth, device_label, git_state, library_versions, machine_info, now_utc
from sib_fast.cli_errors import OutputError, UsageError, atomic_write_text, os_reason

SCHEMA = "sib-bench/1"
# the timed parts of a head row, keys of its "timings", "floor_bytes", "achieved_GBps"...
PARTS = ("fwd", "bwd", "fwd_bwd")
PART_LABELS = {"fwd": "forward", "bwd": "backward", "fwd_bwd": "forward+backward"}


def new_record(args, device: torch.device, mode: str) -> dict:
    """A record without rows: what ran, where, with which code, and the copy bandwidth measured now."""
    record = {
        "schema": SCHEMA, "mode": mode, "created": now_utc(), "argv": sys.argv[1:] if args.argv is None else args.argv,
        "note": args.note, "device": str(device), "machine": machine_info(device),
        "versions": library_versions(), "git": git_state(),
        "settings": {"tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                     "tf32_cudnn": torch.backends.cudnn.allow_tf32},
    }
    record["copy_bandwidth"] = copy_bandwidth(device, None if args.copy_mib is None else args.copy_mib * 1024 ** 2)
    record["rows"] = []
    return record


def save_json(record: dict, path: str | None) -> None:
    """Rewrite the record at ``path`` atomically: a failure (``OutputError``) leaves the last one intact."""
    if not path:
        return
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"--json {path}: cannot make {path.parent}: {os_reason(exc)}") from None
    atomic_write_text(path, json.dumps(record, indent=1, sort_keys=False) + "\n", what="--json record")


def load_record(path: str) -> dict:
    """A record written by --json, for --from-json; one line (UsageError) when it is not one."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = os_reason(exc) if isinstance(exc, OSError) else "not a text file"
        raise UsageError(f"--from-json {path}: cannot read it: {reason}") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--from-json {path} is not JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
                         ) from None
    if not isinstance(record, dict) or record.get("schema") != SCHEMA or not isinstance(record.get("rows"), list):
        raise UsageError(f"--from-json {path} is not a {SCHEMA} record")
    return record


def error_line(exc: BaseException) -> str:
    """A row's ``error``: the exception's type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def short_error(row: dict) -> str:
    """A row's error, short enough for a table cell."""
    text = row.get("error", "not run")
    return text if len(text) <= 140 else text[:137] + "..."


def format_ms(stats: dict | None) -> str:
    """``median (IQR)`` of a timing summary, in milliseconds."""
    if not stats:
        return "-"
    med, iqr = stats["median"] * 1e3, stats["iqr"] * 1e3
    digits = 3 if med < 1 else 2 if med < 100 else 1
    return f"{med:.{digits}f} ({iqr:.{digits}f})"


def _load_text(start, end) -> str:
    if start is None:
        return ""
    return f", load average {start:.1f}" + (f" -> {end:.1f}" if end is not None else "")


def header_lines(record: dict) -> list[str]:
    """When, on what and with which code the record was made, the measured copy bandwidth, the note."""
    git = record.get("git") or {}
    commit = (git.get("commit") or "unknown")[:12] + (" (uncommitted changes)" if git.get("dirty") else "")
    v = record.get("versions", {})
    machine = record.get("machine", {})
    dev_type = torch.device(record["device"]).type
    lines = [f"{record['created']}, {device_label(machine, dev_type)}, commit {commit}",
             f"torch {v.get('torch')}, python {v.get('python')}"
             + (f", triton {v['triton']}" if v.get("triton") else "")
             + (f", driver {machine['gpu'].get('driver')}" if machine.get("gpu") else "")
             + f", {machine.get('torch_threads')} CPU threads of {machine.get('logical_cpus')}"
             + _load_text(machine.get("loadavg_1min_at_start"), record.get("loadavg_1min_at_end")),
             f"copy bandwidth measured in this run: {record['copy_bandwidth']['GBps']:.1f} GB/s"
             + (f" (datasheet {machine['gpu']['datasheet_bandwidth_GBps']:.0f} GB/s)"
                if machine.get("gpu", {}).get("datasheet_bandwidth_GBps") else "")]
    if record.get("note"):
        lines.append(f"note: {record['note']}")
    return lines
