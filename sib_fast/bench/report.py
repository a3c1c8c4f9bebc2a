"""The text of a ``sib-bench`` record: the report printed after a run, and its section of RESULTS.md."""
from __future__ import annotations

from pathlib import Path

from sib_fast.bench.head import head_table
from sib_fast.bench.profile import profile_table
from sib_fast.bench.record import header_lines
from sib_fast.bench.step import step_table


def render(record: dict) -> str:
    """The header lines, then the mode's table (and the kernel lists of a --profile run)."""
    text = "\n".join(header_lines(record)) + "\n\n"
    if record["mode"] == "head":
        s = record.get("head_settings", {})
        method = next((r.get("memory_method") for r in record["rows"] if r.get("memory_method")), None)
        text += (f"head: window {s.get('window')}; times in ms, median (IQR); floor = R and x read once, dR "
                 f"written once (docs/loss.md section 7); peak extra memory by {method or '-'}; error vs the eager reference "
                 f"(max of hsic, bg, dR)\n\n")
        text += head_table(record)
        if any(r.get("profile") for r in record["rows"]):
            text += "\n\nkernels of one forward+backward (--profile):\n" + profile_table(record["rows"])
    else:
        text += step_table(record)
    return text + "\n"


def append_markdown(record: dict, path: str) -> None:
    """Append the report to ``path`` as a section, its header lines as Markdown line breaks."""
    title = "Head" if record["mode"] == "head" else "Training step"
    body = render(record)
    first, rest = body.split("\n", 1)
    section = f"\n### {title}: {first}\n\n" + "\n".join(f"{line}  " if line and not line.startswith("|") else line
                                                      for line in rest.splitlines()) + "\n"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(section)
