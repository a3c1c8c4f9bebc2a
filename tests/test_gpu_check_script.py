"""benchmarks/gpu_check.sh is checked here, without a GPU, for what would waste a device session.

The script runs only on a lent GPU machine, a few minutes per session at most, so a typo in it
costs a whole session. This module checks what can be checked anywhere: bash accepts the
script, every ``python -m sib_fast.bench`` / ``sib_fast.bench.tune`` command line it runs
parses with that tool's own argument parser, and its inline Python compiles.
"""
from __future__ import annotations

import pathlib
import re
import shlex
import shutil
import subprocess

import pytest

from sib_fast.bench import cli, tune

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
PARSERS = {"sib_fast.bench": cli.build_parser, "sib_fast.bench.tune": tune.build_parser}


def _logical_lines(text: str) -> list[str]:
    """The script's lines with backslash continuations joined."""
    return text.replace("\\\n", " ").splitlines()


def _tool_commands(text: str) -> list[tuple[str, list[str]]]:
    """(module, its arguments) of every ``"$PY" -m sib_fast.bench[.tune] ...`` in the script."""
    commands = []
    for line in _logical_lines(text):
        m = re.search(r'-m (sib_fast\.bench(?:\.tune)?)\s(.*)$', line)
        if m and not line.lstrip().startswith("#"):
            words = shlex.split(m.group(2).replace('"$OUT', '"/tmp/out'), comments=True)
            commands.append((m.group(1), words))
    return commands


def test_bash_accepts_the_script():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    proc = subprocess.run([bash, "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _rejected_commands(text: str) -> list[str]:
    """The tool command lines of a script text that their tool's parser rejects."""
    rejected = []
    for module, words in _tool_commands(text):
        parser = PARSERS[module]()
        parser.allow_abbrev = False  # the script spells every option in full
        try:
            parser.parse_args(words)
        except SystemExit:  # argparse's way of rejecting an argument
            rejected.append(f"python -m {module} {' '.join(words)}")
    return rejected


def test_every_benchmark_command_parses():
    text = SCRIPT.read_text()
    modules = [module for module, _ in _tool_commands(text)]
    # head float32, step and head bfloat16 with sib-bench, then the Triton plan variants
    assert modules.count("sib_fast.bench") == 3 and modules.count("sib_fast.bench.tune") == 1, modules
    assert not _rejected_commands(text), "gpu_check.sh runs commands their tool rejects"


@pytest.mark.parametrize("typo", [("--step-reps 5", "--step-rep 5"), ("--min-time 0.3", "--min-tim 0.3"),
                                  ("--json", "--jsn")])
def test_the_check_catches_a_misspelled_option(typo):
    # the check above on the script with one option misspelled (an abbreviation included)
    text = SCRIPT.read_text()
    assert typo[0] in text
    assert _rejected_commands(text.replace(typo[0], typo[1], 1))


def test_inline_python_compiles():
    text = SCRIPT.read_text()
    case = re.search(r"SANITIZER_CASE='\n(.*?)\n'", text, re.S)
    assert case, "the compute-sanitizer case was not found"
    compile(case.group(1), "SANITIZER_CASE", "exec")
    for snippet in re.findall(r"-c '([^']*)'", text):
        compile(snippet, "gpu_check.sh -c", "exec")
    timing = re.search(r"PROJECTION_TIMING='\n(.*?)\n'", text, re.S)
    assert timing, "the projection timing was not found"
    compile(timing.group(1), "PROJECTION_TIMING", "exec")
