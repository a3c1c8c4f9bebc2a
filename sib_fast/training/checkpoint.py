"""Reading and writing ``sib-train`` checkpoints, shared by ``sib-train --resume`` and ``sib-eval``.

``load_checkpoint`` says in one line what is wrong with a file that is not a usable checkpoint:
empty, not a PyTorch file, truncated, damaged (the zip archive's CRC-32 of every member is
checked: ``torch.load`` does not, so flipped bytes in a tensor would load as wrong weights), or a
PyTorch file without the entries a checkpoint has.
"""
from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path

import torch

from sib_fast.cli_errors import UsageError, atomic_write

CHECKPOINT = "checkpoint.pt"  # its name in a sib-train output folder
# what sib-train writes; sib-eval needs only the first two
TRAIN_KEYS = ("model", "args", "optimizer", "scaler", "epoch", "step", "rng")
EVAL_KEYS = ("model", "args")


def _damaged(path: Path, detail: str) -> UsageError:
    return UsageError(f"checkpoint {path} is damaged ({detail}); restore it from a copy or train anew")


def load_checkpoint(path: str | os.PathLike, required: tuple[str, ...] = EVAL_KEYS) -> dict:
    """The checkpoint dict at ``path`` (on the CPU, ``weights_only``), or a one-line ``UsageError``."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise UsageError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    if size == 0:
        raise UsageError(f"checkpoint {path} is empty (0 bytes): not a checkpoint, perhaps cut short by a full disk")
    if not zipfile.is_zipfile(path):
        if head == b"PK\x03\x04":  # a zip archive's start without its end record: cut short
            raise _damaged(path, f"truncated: {size} bytes, the zip archive has no end")
        raise UsageError(f"{path} is not a checkpoint: not a PyTorch file (torch.save writes a zip archive)")
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()  # reads every member and compares its CRC-32
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError) as exc:
        raise _damaged(path, f"unreadable zip archive: {exc}") from None
    if bad is not None:
        raise _damaged(path, f"CRC-32 mismatch in {bad}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever torch says, it is one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise _damaged(path, f"torch.load: {first[:300]}") from None
    if not isinstance(ckpt, dict):
        raise UsageError(f"{path} is not a sib-train checkpoint: it holds a {type(ckpt).__name__}, not a dict")
    missing = [k for k in required if k not in ckpt]
    if missing:
        raise UsageError(f"{path} is not a sib-train checkpoint: no {', '.join(repr(k) for k in missing)} "
                         f"entr{'y' if len(missing) == 1 else 'ies'}")
    if "args" in required and not isinstance(ckpt["args"], dict):
        raise UsageError(f"{path} is not a sib-train checkpoint: its 'args' entry is not a dict")
    return ckpt


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` to ``checkpoint.pt.tmpPID`` beside ``path``, flush it to disk, then rename:
    ``path`` is never half-written; a failure (``OutputError``) leaves the previous one intact."""
    atomic_write(path, lambda f: torch.save(state, f), what="checkpoint")
