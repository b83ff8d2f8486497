"""The locks of a store's writers: one extraction at a time, or any number of its shards, never both.

- A run without --shard holds `<store>.lock` for the whole run: a second concurrent run is refused,
  never interleaved, and so is a run while shards of the store are running.
- A shard (`--shard I/N`) holds `<store>.shard-I-of-N.lock` (infra.shards.lock_target): shards run
  side by side (each writes whole chunks of its own share), a second copy of the same shard is
  refused, and so is a shard while a run without --shard writes the store.
- Creating or opening the store, recording what it was made with, and the final merge of the error
  report and the `complete` attribute are done under `<store>.setup.lock` (`setup`), which every
  writer waits for: two shards starting at the same instant never both create the store, and two
  shards ending together never write the attributes from two views of the flags.

All are locks.FileLock: the kernel releases them when the process dies (kill -9 included), and
their files are removed when the run ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ser_cache.features.errors import StoreError
from ser_cache.infra.shards import Shard

SETUP_WAIT_S = 3600.0  # a writer holds the set-up lock for seconds (creating ids, merging a report)


class StoreLock:
    """The lock a writer holds for its whole run (module docstring); `shard` None: a run without --shard."""

    def __init__(self, store_path: Path, shard: Shard | None = None):
        from ser_cache.infra import locks, shards

        self._store = Path(store_path)
        self.shard = shard
        self._lock = locks.FileLock(store_path if shard is None else shards.lock_target(store_path, shard))
        self.path = self._lock.path

    def acquire(self) -> None:
        from ser_cache.infra import locks, shards

        try:
            self._lock.acquire()
        except locks.Held as exc:
            if self.shard is None:
                raise StoreError(f"{self._store}: another extraction is writing this store ({exc.holder}); "
                                 "wait for it to finish (a second run would interleave writes)") from None
            raise StoreError(f"{self._store}: shard {self.shard.label} is already running ({exc.holder}); a second "
                             "copy of the same shard would write the same chunks: wait for it, or cancel it "
                             "first") from None
        try:
            if self.shard is None:
                others = shards.running(self._store)
                if others:
                    first, who = next(iter(others.items()))
                    raise StoreError(f"{self._store}: {len(others)} shard(s) of it are running (shard {first.label}: "
                                     f"{who}); let them finish, or run this extraction with --shard too")
            else:
                who = locks.holder(self._store)
                if who:
                    raise StoreError(f"{self._store}: an extraction without --shard is writing this store ({who}); "
                                     "wait for it to finish")
        except StoreError:
            self._lock.release()
            raise

    @contextmanager
    def setup(self) -> Iterator[None]:
        """Hold the store's set-up lock (waiting for it) for the block: creating, opening, finishing."""
        from ser_cache.infra import locks

        try:
            held = locks.acquire_waiting(self._store.with_name(self._store.name + ".setup"), timeout_s=SETUP_WAIT_S)
        except locks.Held as exc:
            raise StoreError(f"{self._store}: waited {SETUP_WAIT_S:.0f} s for the store's set-up lock ({exc.holder})"
                             "; a writer seems stuck creating or finishing it") from None
        try:
            yield
        finally:
            held.release()

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
