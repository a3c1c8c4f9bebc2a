"""What the example experiments share: running sib-train commands a few at a time, reading a run's
last epoch, and means with 95% t-intervals over seeds."""
from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

from sib_fast.evaluation.localization import mean_t_interval
from sib_fast.training.history import METRICS, read_metrics


def interval(values: list) -> str:
    """``mean [low, high]``, the 95% t-interval over the finite values ("n/a" if none)."""
    m, lo, hi = mean_t_interval(values)
    if math.isnan(m):
        return "n/a"
    return f"{m:.4g}" if lo == hi else f"{m:.4g} [{lo:.4g}, {hi:.4g}]"


def history(out: Path) -> list[dict]:
    """The run's metrics.jsonl records ([] before its first epoch; damaged lines left out, with a warning)."""
    return read_metrics(out / METRICS, warn=lambda line: print(f"warning: {line}", file=sys.stderr))


def last_record(out: Path, epochs: int) -> dict | None:
    """The run's last metrics.jsonl line if it finished ``epochs`` epochs, else None."""
    lines = history(out)
    return lines[-1] if lines and lines[-1].get("epoch") == epochs else None


def run_all(commands: list[list[str]], jobs: int) -> None:
    """Each command as a subprocess, ``jobs`` at a time; exits on the first that fails."""
    running = []
    commands = list(commands)
    while commands or running:
        while commands and len(running) < jobs:
            cmd = commands.pop(0)
            print("+", " ".join(cmd[1:]), flush=True)
            running.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL))
        time.sleep(1)
        for proc in list(running):
            if proc.poll() is not None:
                running.remove(proc)
                if proc.returncode:
                    sys.exit(f"a run failed with status {proc.returncode}: {' '.join(proc.args[1:])}")
