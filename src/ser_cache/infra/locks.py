"""One writer at a time: an exclusive lock on a store being extracted or a run being fine-tuned.

The lock is flock(2) on a small file beside the thing locked (`<store>.lock`, `<run>.lock`): the
kernel releases it when its process ends, kill -9 included, so a crashed writer never leaves a
stale lock. The file holds who locked it (pid, host, since when), for the refusal's message.

Why the file is removed on release, and why that is safe: a lock file left beside every store
and run is clutter that looks like a problem. Deleting a lock file is safe only if every holder
deletes it while still holding the lock, and every acquirer, once it holds the lock on the file
it opened, checks that this file is still the one at the path (same inode); if the previous
holder removed it in between, the acquirer starts over with a fresh file. Otherwise two processes
could each hold a lock on a different file of the same name. A file left by a killed process is
unlocked, and the next acquirer takes it over and removes it when done.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from pathlib import Path

RETRY_SECONDS = 0.5  # a reader's probe (`holder`) holds a shared lock for microseconds; a writer waits that out
_BUSY = (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK)


class Held(Exception):
    """Another process holds the lock; `holder` says who (pid, host, since when) as it wrote."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path}: locked by {holder}")
        self.path = path
        self.holder = holder


def lock_path(target: str | Path) -> Path:
    """The lock file of a store or run directory: beside it, `<target>.lock`.

    Beside the real folder: two commands that name it through different paths (a symlink, `..`)
    must meet at one lock."""
    return Path(str(Path(target).resolve()) + ".lock")


class FileLock:
    """An exclusive, non-blocking lock on `target` (a store or run directory, existing or not)."""

    def __init__(self, target: str | Path):
        self.path = lock_path(target)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise Held at once (after waiting out a reader's probe)."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                _flock_waiting(fd, fcntl.LOCK_EX)
            except OSError as exc:
                holder = _read_holder(fd)
                os.close(fd)
                if exc.errno in _BUSY:
                    raise Held(self.path, holder) from None
                raise
            if _still_at_path(fd, self.path):
                break
            os.close(fd)  # its holder removed it between our open and our lock: start over
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        self._fd = fd

    def release(self) -> None:
        """Remove the file while still holding the lock (see the module's docstring), then unlock."""
        if self._fd is None:
            return
        import fcntl

        try:
            if _still_at_path(self._fd, self.path):
                self.path.unlink(missing_ok=True)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def holder(target: str | Path) -> str | None:
    """Who holds the lock on `target` (as they wrote it), or None when nobody does.

    Tries a shared lock without waiting and releases it at once: it is refused exactly while a
    writer holds its exclusive lock.
    """
    import fcntl

    try:
        fd = os.open(lock_path(target), os.O_RDONLY)
    except OSError:
        return None  # no lock file: nobody writes it now
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in _BUSY:
                return _read_holder(fd)
            raise
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _flock_waiting(fd: int, kind: int) -> None:
    import fcntl

    deadline = time.monotonic() + RETRY_SECONDS
    while True:
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in _BUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _still_at_path(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown holder"
    except OSError:
        return "unknown holder"


def acquire_waiting(target: str | Path, timeout_s: float = 600.0, poll_s: float = 0.05) -> FileLock:
    """The lock on `target`, waited for: for the moments shards of one command share a file (creating a
    store, merging journals), where a refusal would be wrong. Raises Held after `timeout_s`."""
    lock = FileLock(target)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            lock.acquire()
            return lock
        except Held:
            if time.monotonic() > deadline:
                raise
            time.sleep(poll_s)
