"""Set-up for the worker processes ser-cache spawns (extract's decoders, fine-tuning's DataLoader).

Two rules, applied in each worker as it starts:

- a worker dies with its parent. A parent killed with SIGKILL (the OOM killer, `kill -9`, a job
  scheduler) runs no clean-up, and a spawned worker would otherwise live on, holding its memory
  (about 240 MB with torch loaded) and the pipe that keeps multiprocessing's resource tracker
  alive. On Linux the kernel sends the worker SIGKILL when its parent dies (PR_SET_PDEATHSIG);
  elsewhere a daemon thread polls for the parent's pid changing.
- a worker ignores SIGINT. Ctrl-C reaches every process of the terminal's foreground group; the
  parent turns it into one line and stops the workers, whose own KeyboardInterrupt tracebacks
  would only bury that line.

Module-level and free of heavy imports: a spawned worker imports it by name.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PARENT_POLL_SECONDS = 1.0


def _set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask Linux to send `sig` to this process when its parent dies; False where that is not possible.

    The kernel ties the signal to the parent *thread* that created the process: pools and loaders
    in ser-cache are created and grown from the main thread, which lives as long as the process.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int, interval: float = PARENT_POLL_SECONDS) -> None:
    """Fallback: a daemon thread that ends the process once it has been re-parented (the parent died)."""

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(interval)

    threading.Thread(target=watch, name="ser-cache-parent-watch", daemon=True).start()


def init_worker(parent_pid: int) -> None:
    """Worker initializer: ignore Ctrl-C, and die with the process `parent_pid` that spawned this one."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not _set_parent_death_signal():
        _watch_parent(parent_pid)
    # The parent may have died between spawning this process and the prctl above, when the
    # signal was not yet armed: then this process has already been re-parented.
    if os.getppid() != parent_pid:
        os._exit(1)


def init_loader_worker(worker_id: int, *, parent_pid: int) -> None:
    """`init_worker` as a DataLoader `worker_init_fn` (bind `parent_pid` with functools.partial)."""
    init_worker(parent_pid)
