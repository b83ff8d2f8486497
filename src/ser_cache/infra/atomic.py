"""Files that a crash cannot leave half-written: write beside the target, then rename over it."""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds, sync it and rename it into place.

    A rename within one folder is atomic, so readers see the old file or the new one, never part
    of one. If the block fails, the temporary file is removed and the target is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with naming_disk_full(path), naming_target(tmp, path):
            yield tmp
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)  # the data reaches the disk before the name points to it
            finally:
                os.close(fd)
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):  # a clean-up that fails must not hide the error that got us here
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def naming_target(tmp: Path, path: Path) -> Iterator[None]:
    """An OSError about the hidden temporary file names the output instead (a read-only folder: the
    user asked for `path` and has never heard of `.path.tmp-PID`)."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None or str(exc.filename) != str(tmp):
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


@contextlib.contextmanager
def naming_disk_full(path: str | Path) -> Iterator[None]:
    """A full disk met in the block becomes OSError(ENOSPC) naming `path`.

    A write() that fails names no file, and safetensors reports the OS's error as its own
    ("... No space left on device (os error 28)"): without this the user learns the disk is
    full but not which output it stopped.
    """
    try:
        yield
    except Exception as exc:
        if not is_disk_full(exc) or (isinstance(exc, OSError) and exc.filename == str(path)):
            raise
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from exc


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC, as an OSError or as a library's own error carrying the OS's message (safetensors, h5py)."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno == errno.ENOSPC
    text = str(exc)
    return f"os error {errno.ENOSPC}" in text or os.strerror(errno.ENOSPC) in text


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | Path, obj) -> Path:
    return write_text_atomic(path, json.dumps(jsonable(obj), indent=2, allow_nan=True) + "\n")


def write_csv_atomic(path: str | Path, header: Sequence[str], rows: Iterator[Sequence] | list) -> Path:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return Path(path)


def jsonable(obj):
    """Paths as strings, numpy scalars as Python numbers, NaN kept (json writes it as NaN)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if type(obj).__module__ == "numpy":  # numpy only when it sent the value: the CLI's start imports this module
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
    return obj
