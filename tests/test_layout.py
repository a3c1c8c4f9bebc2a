"""The package's layout rules: no import cycles, short modules that say what they are for,
one home for what the C++ and Python share, docs that link only inside the repository."""
from __future__ import annotations

import ast
import pathlib
import re

import pytest

from sib_fast.backends import constants

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sib_fast"
MAX_MODULE_LINES = 700


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _package_of(path: pathlib.Path) -> str:
    return _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]


def _imported_modules(source: str, package: str) -> set[str]:
    """The sib_fast modules ``source`` (a module of ``package``) imports anywhere, inside functions too."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # `from package import module` imports the module; `from module import name` the module
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        found.update(n for n in names if n in MODULES)
    return found


def test_no_import_cycle_among_the_package_modules():
    graph = {name: _imported_modules(path.read_text(), _package_of(path)) - {name} for name, path in MODULES.items()}
    state: dict[str, str] = {}
    cycles = []

    def visit(name, trail):
        state[name] = "open"
        for dep in sorted(graph[name]):
            if state.get(dep) == "open":
                cycles.append(trail[trail.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, trail + [dep])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_sees_imports_inside_functions():
    source = "def f():\n    from sib_fast.backends import reference\n    import sib_fast.loss\n    from . import vjp\n"
    assert _imported_modules(source, "sib_fast") == {"sib_fast.backends.reference", "sib_fast.loss", "sib_fast.vjp"}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_is_short_and_says_what_it_is_for(name):
    path = MODULES[name]
    source = path.read_text()
    assert len(source.splitlines()) <= MAX_MODULE_LINES, f"{path.relative_to(ROOT)} is over {MAX_MODULE_LINES} lines"
    docstring = ast.get_docstring(ast.parse(source))
    assert docstring and docstring.strip(), f"{path.relative_to(ROOT)} has no module docstring"


def test_one_usage_error_for_every_command():
    defined = [f"{name}:{node.lineno}" for name, path in MODULES.items()
               for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.ClassDef) and node.name == "UsageError"]
    assert len(defined) == 1, f"UsageError is defined {len(defined)} times: {defined}"


def _header_constant(header: str, name: str) -> float:
    match = re.search(rf"\b{name}\s*=\s*([0-9.e+-]+)\s*;", header)
    assert match, f"csrc/sib_head.h defines no {name}"
    return float(match.group(1))


def _enum_size(header: str, enum: str) -> int:
    body = re.search(rf"enum {enum}\s*:\s*int\s*\{{(.*?)\}};", header, re.S)
    assert body, f"csrc/sib_head.h has no enum {enum}"
    entries = [e.split("//")[0].strip() for e in re.sub(r"//[^\n]*", "", body.group(1)).split(",")]
    return len([e for e in entries if e]) - 1  # the last entry is the count


def test_python_constants_match_the_cpp_header():
    header = (ROOT / "csrc" / "sib_head.h").read_text()
    assert _header_constant(header, "kRankWindow") == constants.RANK_WINDOW
    assert _header_constant(header, "kRanksBelow") == constants.RANKS_BELOW
    assert _header_constant(header, "kRangeEps") == constants.RANGE_EPS
    assert _header_constant(header, "kNormEps") == constants.NORM_EPS
    levels = re.search(r"kQuantileLevel\[kQuantiles\]\s*=\s*\{([^}]*)\}", header).group(1)
    assert [float(v) for v in levels.split(",")] == [constants.Q_LOW, constants.Q_MASK, constants.Q_HIGH,
                                                     constants.Q_MASK]
    assert _enum_size(header, "ImageStat") == constants.IMAGE_STATS
    assert _enum_size(header, "Quantile") == constants.QUANTILES


DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_link_only_to_files_in_the_repository(document):
    for target in re.findall(r"\]\(([^)\s]+)\)", document.read_text()):
        path = target.split("#")[0]
        assert "://" not in target and not target.startswith(("/", "mailto:")), \
            f"{document.name} links outside the repository: {target}"
        if path:
            assert (document.parent / path).exists(), f"{document.name} links to a missing file: {target}"


def test_readme_is_a_five_minute_read():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; deep dives belong in docs/"
