"""Output locations checked before any work: a command that would run for an hour and then find it
cannot write its result should say so at once, naming its option."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class OutputError(Exception):
    """An output location cannot be written; the message names the option and the path."""


def _nearest_existing(path: Path) -> Path:
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def check_writable(path: str | Path, option: str, *, folder: bool = False) -> None:
    """Raise OutputError unless `path` can be written: a file (or, with `folder`, a folder to
    create or write into) whose missing parent folders can be made.

    Nothing is left behind: the check creates and removes one empty file in the nearest folder
    that exists, the only test that the file system, not only the permission bits, agrees
    (root passes every permission check, a read-only mount or /proc refuses the file).
    """
    path = Path(path)

    def refuse(reason: str) -> None:
        raise OutputError(f"{option} {path}: cannot write there ({reason})")

    if path.is_dir() and not folder:
        refuse("it is a folder; expected a file name")
    if path.exists() and not path.is_dir() and folder:
        refuse("it is a file; expected a folder")
    target = path if folder else path.parent
    base = _nearest_existing(target.absolute())
    if not base.is_dir():
        refuse(f"{base} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".ser-cache-write-check-", dir=base)
    except OSError as exc:
        refuse(f"cannot create a file in {base}: {exc.strerror or exc}")
    os.close(fd)
    os.unlink(probe)
