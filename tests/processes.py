"""Spawned ser-cache processes whose decoding blocks, so that a test can kill or interrupt them
while they certainly still run, and wait for them to end with their threads' stacks on failure."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Stand-ins that block in the worker, so that the run is certainly still going when it is killed.
# Written beside the test's files and found by the spawned workers through sys.path.
SLOW = '''
import os, time
from pathlib import Path

def _mark():
    Path(os.environ["SER_CACHE_TEST_MARKER"]).write_text(str(os.getpid()))
    time.sleep(600)

def load_many(paths, **kwargs):
    _mark()

class Rows:
    def __init__(self, paths, max_seconds):
        self.paths = list(paths)
    def __getitem__(self, i):
        _mark()
    def __len__(self):
        return len(self.paths)
'''


# A Ctrl-C'd extract ends in seconds (9 s seen on a loaded 2-core machine); the stand-in decoder
# blocks for 600 s, so an extract that waits for it still fails the tests, with room for a slow machine.
ENDS_WITHIN = 150


def ended_within(proc: subprocess.Popen, seconds: float) -> str:
    """`proc`'s output once it ends; if it is still running after `seconds`, its threads' stacks
    (faulthandler on SIGUSR1, registered by the tests' scripts) go into the failure, then it is killed."""
    try:
        return proc.communicate(timeout=seconds)[0]
    except subprocess.TimeoutExpired:
        masks = signal_masks(proc.pid)
        os.kill(proc.pid, signal.SIGUSR1)
        time.sleep(2)
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"still running {seconds} s after Ctrl-C; its signal masks:\n{masks}\nits threads:\n"
                    f"{proc.communicate()[0]}")


def signal_masks(pid: int) -> str:
    """Each thread's pending, blocked, ignored and caught signals (Linux's /proc): where a Ctrl-C went."""
    lines = []
    for task in sorted(Path(f"/proc/{pid}/task").glob("*")):
        try:
            status = dict(line.split(":\t", 1) for line in (task / "status").read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        lines.append(f"{task.name} {status.get('Name', '').strip()}: " + " ".join(
            f"{k}={status.get(k, '?').strip()}" for k in ("ShdPnd", "SigPnd", "SigBlk", "SigIgn", "SigCgt")))
    return "\n".join(lines) or "(no /proc)"


def start_blocked(tmp_path: Path, script: str, args: list[str]) -> tuple[subprocess.Popen, Path]:
    (tmp_path / "slow.py").write_text(SLOW)
    (tmp_path / "main.py").write_text(script)
    marker = tmp_path / "decoding"
    proc = subprocess.Popen([sys.executable, str(tmp_path / "main.py"), str(tmp_path), *args], cwd=tmp_path,
                            env={**os.environ, "SER_CACHE_TEST_MARKER": str(marker)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 90
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the worker never started decoding:\n{proc.communicate()[0]}")
        time.sleep(0.1)
    return proc, marker
