"""infra.locks.acquire_waiting: a lock held by another process is waited for, then taken; a timeout refuses."""

from __future__ import annotations

import multiprocessing
import time

import pytest

from ser_cache.infra import locks


def _hold(target, seconds, ready):
    lock = locks.FileLock(target)
    lock.acquire()
    ready.set()
    time.sleep(seconds)
    lock.release()


@pytest.mark.slow
def test_waits_for_the_holder_then_takes_the_lock(tmp_path):
    target = tmp_path / "store.zarr"
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold, args=(target, 1.0, ready))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(locks.Held):
            locks.FileLock(target).acquire()  # the plain lock refuses at once
        t0 = time.monotonic()
        lock = locks.acquire_waiting(target, timeout_s=30)
        assert time.monotonic() - t0 > 0.3  # it waited for the holder
        assert locks.holder(target) is not None
        lock.release()
        assert locks.holder(target) is None
    finally:
        holder.join(30)


def test_gives_up_after_the_timeout(tmp_path):
    target = tmp_path / "store.zarr"
    held = locks.FileLock(target)
    held.acquire()
    try:
        with pytest.raises(locks.Held):
            locks.acquire_waiting(target, timeout_s=0.2)
    finally:
        held.release()
