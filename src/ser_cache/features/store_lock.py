"""The lock one writer of a feature store holds (its lock file beside the store), so that two extract
runs never write the same store.
"""

from __future__ import annotations

from pathlib import Path

from ser_cache.features.errors import StoreError


class StoreLock:
    """An exclusive lock on a store for one run: a second concurrent run is refused, never interleaved.

    locks.FileLock on `<store>.lock`: the kernel releases it when the process dies (kill -9
    included), and the file is removed when the extraction ends.
    """

    def __init__(self, store_path: Path):
        from ser_cache.infra import locks

        self._lock = locks.FileLock(store_path)
        self.path = self._lock.path
        self._store = Path(store_path)

    def acquire(self) -> None:
        from ser_cache.infra import locks

        try:
            self._lock.acquire()
        except locks.Held as exc:
            raise StoreError(
                f"{self._store}: another extraction is writing this store ({exc.holder}); "
                "wait for it to finish (a second run would interleave writes)"
            ) from None

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
