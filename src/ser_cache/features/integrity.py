"""Is a feature store whole? The checks every reader runs, `verify`, and what to do about a damaged chunk.

Why checksums and `verify`: Zarr reads a chunk that is not on disk as its fill value, so a deleted
features chunk would read as rows of zeros that the flags still call written. New stores end every
chunk with a crc32c checksum (Zarr v3's `crc32c` codec), readers check that every chunk holding a
written row is on disk (`verify(deep=False)`, a directory listing), and every read error names the
store, the array and the chunk (`StoreError`). `verify(deep=True)` decodes every chunk.

A frame store's counts are checked too, since a count that is wrong but readable would slice
the wrong frames: every reader refuses a count outside [0, T], `read_frames` a written row of a
chunk it reads whose count disagrees with its features (its last counted frame all zeros, or a
non-zero frame right after it), and `verify(deep=True)` looks at every frame past each count.

`StoreChecks` holds these checks as methods of FeatureStore (store.py), which inherits them; they
read the store through its arrays (`_array`, `read_array`) and its layout (`chunk_rows`,
`is_frames`, `frame_counts`). A failing chunk is a `ChunkProblem`; `repair_advice` says what to
do about a list of them, `problems_message` puts both in one line for a reader.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ser_cache.features.errors import StoreError

ROW_ARRAYS = ("ids", "features", "written", "failed")  # every store has them, one row per utterance


@dataclass(frozen=True)
class ChunkProblem:
    """One chunk of one array that fails `FeatureStore.verify`: missing on disk, or unreadable."""

    array: str
    chunk: int  # index along the rows, in that array's own chunking (ids has its own)
    first: int  # first and last row affected
    last: int
    key: str  # the chunk's key inside the store: its file, relative to the store folder
    missing: bool  # True: not on disk; False: on disk but cannot be read (reason says why)
    reason: str = ""

    def __str__(self) -> str:
        if self.missing:
            what = "rows" if self.array == "ids" else "written rows"
            return (f"{what} {self.first}–{self.last} have no {self.array} chunk on disk (chunk {self.chunk}, "
                    f"{self.key})")
        return f"{self.array} chunk {self.chunk} (rows {self.first}–{self.last}, {self.key}) {self.reason}"


def repair_advice(problems: Sequence[ChunkProblem]) -> str:
    """What to do about `problems`: extract recomputes missing chunks; ids only a rebuild restores."""
    if any(p.array == "ids" for p in problems):
        return ("ids are written when the store is created, so extract cannot recompute them: "
                "rebuild the store with `ser-cache extract --overwrite`")
    if all(p.missing for p in problems):
        return "run `ser-cache extract` with the same options again to recompute them"
    return ("delete the damaged chunk file(s) and run `ser-cache extract` with the same options again to "
            "recompute them, or rebuild the store with `ser-cache extract --overwrite`")


def writer_of(store_path: str | Path) -> str | None:
    """Who holds the store's extraction lock (StoreLock), or a shard's, or None when nobody does (locks.holder)."""
    from ser_cache.infra import locks, shards

    who = locks.holder(store_path)
    if who:
        return who
    running = shards.running(store_path)
    if running:
        first, who = next(iter(running.items()))
        return f"shard {first.label}, {who}" + (f", and {len(running) - 1} more shard(s)" if len(running) > 1 else "")
    return None


def problems_message(path: Path, problems: Sequence[ChunkProblem]) -> str:
    """One line for a reader: the first problem, how many more, and what to do."""
    more = (f" (and {len(problems) - 1} more chunk(s) missing or damaged; `ser-cache info --verify {path}` lists them)"
            if len(problems) > 1 else "")
    return f"{path}: {problems[0]}{more}; {repair_advice(problems)}"


def short_error(exc: BaseException) -> str:
    """'Type: first line of the message', short enough for a one-line error."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if "checksum do not match" in text:  # zarr's Crc32cCodec: the stored bytes are not those written
        return "crc32c checksum mismatch"
    text = text[:160] + "…" if len(text) > 160 else text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class StoreChecks:
    """FeatureStore's integrity checks (a mixin: FeatureStore is the only class that inherits it)."""

    def _ids_problem(self, rows: np.ndarray) -> ChunkProblem:
        arr = self._array("ids")
        chunk = int(rows[0]) // arr.chunks[0]
        return ChunkProblem("ids", chunk, int(rows[0]), int(rows[-1]), self._chunk_keys("ids", chunk)[0],
                            missing=False, reason="holds empty utterance ids")

    def _chunk_keys(self, name: str, chunk: int, arr=None) -> list[str]:
        """Keys (paths inside the store) of row-chunk `chunk` of array `name`, for any chunk key
        encoding ("c/3/0", "3.0") and any number of trailing dimensions (a frame store's "c/3/0/0")."""
        arr = self._array(name) if arr is None else arr
        trailing = [range(-(-size // step)) for size, step in zip(arr.shape[1:], arr.chunks[1:])]
        return [f"{arr.path}/{arr.metadata.encode_chunk_key((chunk, *rest))}" for rest in itertools.product(*trailing)]

    def _stored_keys(self) -> set[str]:
        """Every key the store holds (for a local store: its files), listed once."""
        from zarr.core.sync import sync

        async def listing():
            store_path = self.group.store_path
            prefix = store_path.path
            keys = [k async for k in store_path.store.list_prefix(prefix)]
            return {k[len(prefix):].lstrip("/") if prefix else k for k in keys}

        return sync(listing())

    def _row_chunks(self, name: str, arr=None) -> list[tuple[int, int, int]]:
        """(chunk, start, end) of every row-chunk of array `name`."""
        arr = self._array(name) if arr is None else arr
        step, n = int(arr.chunks[0]), int(arr.shape[0])
        return [(c, c * step, min((c + 1) * step, n)) for c in range(-(-n // step))]

    def _absent(self, name: str, written: np.ndarray | None, stored: set[str]) -> list[ChunkProblem]:
        """Chunks of `name` not on disk: every one (written None, for ids), or those holding a written row."""
        arr = self._array(name)
        problems = []
        for c, start, end in self._row_chunks(name, arr):
            rows = np.arange(end - start) if written is None else np.flatnonzero(written[start:end])
            if not rows.size:
                continue
            keys = self._chunk_keys(name, c, arr)
            if not all(k in stored for k in keys):
                problems.append(ChunkProblem(name, c, start + int(rows[0]), start + int(rows[-1]), keys[0],
                                             missing=True))
        return problems

    def verify(self, deep: bool = False) -> list[ChunkProblem]:
        """The chunks that fail: empty if the store's written rows are all there (and, `deep`, all readable).

        Cheap (`deep=False`): a listing of the store's keys. Every ids chunk must be on disk, and every
        features (and frames) chunk that holds a written row. Deep: also read every chunk on disk of
        every array, which decompresses it and checks its crc32c (stores created before checksums only
        fail where decompression does), and look for empty ids.
        """
        stored = self._stored_keys()
        problems = self._absent("ids", None, stored)
        try:
            written = self.read_array("written")
        except StoreError:
            if not deep:
                raise
            written = None  # the deep pass below names the chunk
        if written is not None:
            problems += self.missing_chunks(written, stored)
        counts = None
        if self.is_frames:
            try:
                counts = self.frame_counts(check=False)
            except StoreError:
                if not deep:
                    raise
            if counts is not None:
                problems += self._count_problems(counts)
        if not deep:
            return problems
        for name in (*ROW_ARRAYS, *(("frames",) if self.is_frames else ())):
            arr = self._array(name)
            for c, start, end in self._row_chunks(name, arr):
                keys = self._chunk_keys(name, c, arr)
                if not any(k in stored for k in keys):
                    continue  # missing chunks read as fill values: reported above where they matter
                try:
                    block = np.asarray(arr[start:end])
                except MemoryError:
                    raise
                except Exception as exc:  # noqa: BLE001 - whatever the codecs raise on bad bytes
                    problems.append(ChunkProblem(name, c, start, end - 1, keys[0], missing=False,
                                                 reason=f"cannot be read ({short_error(exc)})"))
                    continue
                if name == "features" and counts is not None and written is not None:
                    problems += self._disagreements(block, start, counts, written, whole=True)
                if name == "ids":
                    empty = np.flatnonzero(np.array(block.tolist(), dtype=str) == "")
                    if empty.size:
                        problems.append(ChunkProblem("ids", c, start + int(empty[0]), start + int(empty[-1]),
                                                     keys[0], missing=False, reason="holds empty utterance ids"))
        return sorted(problems, key=lambda p: (ROW_ARRAYS.index(p.array) if p.array in ROW_ARRAYS else 9, p.chunk))

    def check_readable(self) -> None:
        """Refuse to read a store that an extraction is writing, or whose written rows lack chunks on disk.

        What train-heads and predict run before reading: a lock probe and `verify(deep=False)`.
        """
        holder = writer_of(self.path)
        if holder:
            raise StoreError(f"{self.path}: is being written by another extract ({holder}); wait for it to finish")
        problems = self.verify(deep=False)
        if problems:
            raise StoreError(problems_message(self.path, problems))

    def missing_chunks(self, written: np.ndarray, stored: set[str] | None = None) -> list[ChunkProblem]:
        """Chunks of features (and frames) that hold rows `written` says are written but are not on disk."""
        stored = self._stored_keys() if stored is None else stored
        return [p for name in ("features", *(("frames",) if self.is_frames else ()))
                for p in self._absent(name, written, stored)]

    def _damaged_message(self, name: str, exc: Exception, chunk: int | None) -> str:
        if chunk is None:  # a whole-array read failed: find the first chunk that does
            for c, start, end in self._row_chunks(name):
                try:
                    np.asarray(self._array(name)[start:end])
                except Exception:  # noqa: BLE001
                    chunk = c
                    break
        where = f"array '{name}'"
        problems = []
        if chunk is not None:
            step = int(self._array(name).chunks[0])
            start, end = chunk * step, min((chunk + 1) * step, self.n_rows)
            key = self._chunk_keys(name, chunk)[0]
            where = f"chunk {chunk} of array '{name}' (rows {start}–{end - 1}, file {key})"
            problems = [ChunkProblem(name, chunk, start, end - 1, key, missing=False)]
        advice = repair_advice(problems or [ChunkProblem(name, -1, 0, 0, "", missing=False)])
        return (f"{self.path}: {where} cannot be read ({short_error(exc)}); `ser-cache info --verify {self.path}` "
                f"lists every damaged chunk; {advice}")

    def _count_problems(self, counts: np.ndarray) -> list[ChunkProblem]:
        """A problem per chunk of 'frames' holding a count outside [0, T]: write_chunk never writes one."""
        limit = self.feature_shape[0]
        bad = np.flatnonzero((counts < 0) | (counts > limit))
        if not bad.size:
            return []
        arr = self._array("frames")
        step = int(arr.chunks[0])
        problems = []
        for chunk in np.unique(bad // step).tolist():
            rows = bad[bad // step == chunk]
            r = int(rows[0])
            more = f" (and {rows.size - 1} more row(s) of the chunk)" if rows.size > 1 else ""
            problems.append(ChunkProblem("frames", chunk, r, int(rows[-1]), self._chunk_keys("frames", chunk, arr)[0],
                                         missing=False, reason=f"holds frame count {int(counts[r])} for row {r}{more}, "
                                                               f"outside 0–{limit} (the most frames a row can have)"))
        return problems

    def _disagreements(self, block: np.ndarray, start: int, counts: np.ndarray, written: np.ndarray, *,
                       whole: bool) -> list[ChunkProblem]:
        """Written rows of a features chunk (`block`, starting at row `start`) whose count disagrees with
        their frames: write_chunk zeroes everything past a row's count, and an encoder's frame is never all
        zeros, so a non-zero frame past the count means it is too small, an all-zero last counted frame too
        large. `whole`: look at every frame past the count (else at the first, which `block` must hold).
        At most one problem, for the first row found.
        """
        width = block.shape[1]
        limit = self.feature_shape[0]
        for i in range(block.shape[0]):
            r = start + int(i)
            n = int(counts[r])
            if not written[r] or not 0 <= n <= limit:
                continue
            why = None
            if n > 0 and not block[i, n - 1].any():
                why = f"frame {n - 1} is all zeros: the count is larger than the frames written"
            elif n < width and (block[i, n:].any() if whole else block[i, n].any()):
                past = block[i, n:].reshape(block.shape[1] - n, -1)  # (frames, everything in a frame)
                k = n + int(np.flatnonzero(past.any(axis=1))[0]) if whole else n
                why = f"frame {k}, past the count, is not all zeros: the count is smaller than the frames written"
            if why:
                chunk = r // self.chunk_rows
                return [ChunkProblem("frames", chunk, r, r, self._chunk_keys("frames", chunk)[0], missing=False,
                                     reason=f"holds frame count {n} for row {r}, but {why}")]
        return []
