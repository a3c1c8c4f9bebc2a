"""What the example experiments share: running sib-train commands a few at a time, reading a run's
last epoch, and means with 95% t-intervals over seeds."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

# two-sided 95% quantiles of Student's t by degrees of freedom (1 .. 9), beyond: the normal's
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262)


def interval(values: list) -> str:
    """``mean [low, high]``, the 95% t-interval over the finite values ("n/a" if none)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "n/a"
    m = sum(values) / len(values)
    if len(values) < 2:
        return f"{m:.4g}"
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
    t = T95[len(values) - 2] if len(values) - 1 <= len(T95) else 1.96
    half = t * sd / math.sqrt(len(values))
    return f"{m:.4g} [{m - half:.4g}, {m + half:.4g}]"


def history(out: Path) -> list[dict]:
    metrics = out / "metrics.jsonl"
    if not metrics.is_file():
        return []
    return [json.loads(s) for s in metrics.read_text().splitlines() if s.strip()]


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
