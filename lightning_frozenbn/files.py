"""Files written whole or not at all: a temporary file beside the target, fsync, one atomic rename."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["write_atomically"]


def write_atomically(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write`` on ``.<name>.tmp-<pid>`` beside ``path``, fsync it, then rename it onto ``path``.

    Why: a process killed mid-write (pre-emption, the OOM killer, a full disk) would otherwise leave a
    truncated file at ``path`` and lose the previous one too. Here, at any instant, ``path`` holds a
    complete file: the old one or the new one. The temporary file is removed if anything fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
