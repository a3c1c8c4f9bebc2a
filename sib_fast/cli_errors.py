"""What ``sib-train``, ``sib-eval`` and ``sib-bench`` share about faults (docs/faults.md).

``UsageError``: a bad argument or input file, found before any work: one line, exit status 2.
``OutputError``: writing a result failed during the work (disk full, file replaced by a folder...):
one line saying what and where, exit status 1; what was written before stays intact.
The helpers check output paths up front and write files so that a crash, a full disk or a
``kill -9`` never leaves a half-written result under the final name; ``run_command`` turns each
kind of fault into its line and exit status.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Callable


class UsageError(Exception):
    """A bad argument or input: reported as one line, exit status 2."""


class OutputError(Exception):
    """A result could not be written: reported as one line, exit status 1."""


def run_command(prog: str, validate: Callable[[], object], work: Callable[[], object], *,
                stopped: tuple[type[Exception], ...] = (), interrupted: str = "interrupted") -> int:
    """``validate()`` then ``work()``; returns the exit status, with one ``PROG: error: ...`` line on
    stderr for a fault: 2 for a ``UsageError`` (or a ValueError / TypeError from ``validate``: a check
    deeper down refused a value), 1 for an ``OutputError``, any other OSError (what and where) or one
    of ``stopped``, 130 with ``PROG: interrupted`` on Ctrl-C."""
    try:
        try:
            validate()
        except (ValueError, TypeError) as exc:
            raise UsageError(str(exc)) from None
        work()
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except (OutputError, OSError, *stopped) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
    return 0


def os_reason(exc: OSError) -> str:
    """``strerror`` without the path (the caller names it), else the message."""
    return exc.strerror or str(exc) or type(exc).__name__


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _probe_writable(folder: Path, option: str, target: Path) -> None:
    """Create and delete a file in ``folder``: the only test that sees read-only mounts, ACLs, quotas."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".sib-write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        where = "" if folder == target else f" (in {folder})"
        raise UsageError(f"{option} {target}: cannot write there{where}: {os_reason(exc)}") from None


def check_output_dir(path: str | os.PathLike, option: str = "--output", files: tuple[str, ...] = ()) -> None:
    """``path`` is, or can become, a writable folder; none of ``files`` in it is a folder.
    Creates nothing (a bad argument must not leave an empty folder behind)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path} is a file, not a folder")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise UsageError(f"{option} {path}: {base} is a file, so no folder can be made under it")
    _probe_writable(base, option, path)
    for name in files:
        f = path / name
        if f.exists() and (f.is_dir() or not os.access(f, os.W_OK)):
            kind = "a folder" if f.is_dir() else "not writable"
            raise UsageError(f"{option} {path}: {f} is {kind}; it must be a file this run can replace")


def check_output_file(path: str | os.PathLike, option: str) -> None:
    """``path`` is, or can become, a writable file (its folder may still have to be made)."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{option} {path} is a folder, not a file")
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"{option} {path}: the file is not writable")
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise UsageError(f"{option} {path}: {base} is a file, so {path.parent} cannot be a folder")
    _probe_writable(base, option, path)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


_TMP = re.compile(r"^(?P<name>.+)\.tmp(?P<pid>\d+)$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours from an earlier call cannot still be in use: writes are synchronous
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except (OverflowError, ValueError):
        return False
    return True


def remove_stale_temporaries(folder: str | os.PathLike, names: tuple[str, ...]) -> list[Path]:
    """Delete ``NAME.tmpPID`` files (NAME one of ``names``: only ours) of processes that no longer
    run, left by a kill during a write; a live process's are kept: it may be writing one now.
    Returns the removed paths."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for f in folder.iterdir():
        m = _TMP.match(f.name)
        if not m or m["name"] not in names or not f.is_file():
            continue
        if not _alive(int(m["pid"])):
            try:
                f.unlink()
                removed.append(f)
            except OSError:
                pass
    return removed


def atomic_write(path: str | os.PathLike, write, what: str = "file") -> None:
    """``write(file_object)`` into ``NAME.tmpPID`` beside ``path``, flush to disk, rename over ``path``.
    On any failure the temporary file is removed and ``path`` keeps its old content; an OSError
    becomes an ``OutputError`` naming ``what`` and ``path``."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        kept = " (the previous one is intact)" if path.is_file() else ""
        raise OutputError(f"cannot write the {what} {path}: {os_reason(exc)}{kept}") from exc
    finally:
        if tmp.exists():
            try:
                tmp.unlink()
            except OSError:
                pass


def atomic_write_text(path: str | os.PathLike, text: str, what: str = "file") -> None:
    atomic_write(path, lambda f: f.write(text.encode()), what)
