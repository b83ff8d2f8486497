"""The feature store: one Zarr v3 group per encoder and corpus, written in whole chunks, read once.

Layout (documented for other tools in docs/feature-store.md):

    <name>.zarr/
        zarr.json        group attributes: model id/revision, kind, window, pooling, ... fingerprint
        ids/             (N,)  string   the corpus's utterance ids, in row order
        features/        (N, D) or (N, L, D)  float16, or (N, T, D) in a frame store (below)
        written/         (N,)  bool     row holds a valid feature vector
        failed/          (N,)  bool     row could not be computed (reason in <name>.errors.csv)
        frames/          (N,)  int32    frame stores only: valid frames of each row

A frame store (`extract --pooling frames`, attribute pooling="frames") keeps one vector per
encoder frame: row i's valid frames are features[i, :frames[i]], and the rest of the row is zeros
up to T, the most frames any clip can have. Those zeros cost almost nothing on disk (the chunks
are compressed), and readers pack the valid frames end to end (`read_frames`, frames.Frames).

Why whole chunks: Zarr v3 writes a chunk as one object. Two writers touching different rows of
the same chunk each rewrite the whole object and one of them loses; appending row by row is
also slow. So every write here covers complete chunks, and the extraction loop buffers rows
until the chunks they fall in are complete. Zarr's local store writes each chunk to a temporary
file and renames it, so a killed process leaves either the old or the new chunk, never half.
Features are written before the flags, so a crash between the two only costs a recomputation.

Why checksums and `verify`: Zarr reads a chunk that is not on disk as its fill value, so a deleted
features chunk would read as rows of zeros that the flags still call written. New stores end every
chunk with a crc32c checksum (Zarr v3's `crc32c` codec), readers check that every chunk holding a
written row is on disk (`verify(deep=False)`, a directory listing), and every read error names the
store, the array and the chunk (`StoreError`). `verify(deep=True)` decodes every chunk.

A frame store's counts are checked too, since a count that is wrong but readable would slice
the wrong frames: every reader refuses a count outside [0, T], `read_frames` a written row of a
chunk it reads whose count disagrees with its features (its last counted frame all zeros, or a
non-zero frame right after it), and `verify(deep=True)` looks at every frame past each count.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ser_cache.infra.atomic import atomic_path

FORMAT = "ser-cache-features"
FORMAT_VERSION = 1
STORE_DTYPE = "float16"
TARGET_CHUNK_BYTES = 4 << 20  # ~4 MiB of features per chunk: large sequential writes, cheap resume
ROW_ARRAYS = ("ids", "features", "written", "failed")  # every store has them, one row per utterance

log = logging.getLogger(__name__)


class StoreError(Exception):
    """A feature store cannot be used as asked; the message names the store and the reason."""


def fingerprint(settings: dict) -> str:
    """A short hash of everything that changes the numbers in a store (canonical JSON, sha256)."""
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def settings_differences(a: dict, b: dict, *, labels: tuple[str, str], keys=None, ignore=()) -> list[str]:
    """'key: <labels[0]> <a's value>, <labels[1]> <b's value>' for every setting that differs."""
    keys = sorted(set(a) | set(b)) if keys is None else keys
    return [f"{k}: {labels[0]} {a.get(k)!r}, {labels[1]} {b.get(k)!r}"
            for k in keys if k not in ignore and a.get(k) != b.get(k)]


def ids_digest(ids: Sequence[str]) -> str:
    """A hash of the row order: a store built over other utterances must not be resumed."""
    h = hashlib.sha256()
    for i in ids:
        h.update(i.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _codecs() -> dict:
    """Zstd (Zarr's default) then a crc32c checksum of every chunk: garbage in a chunk file is an error, not data."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return {"compressors": [ZstdCodec(level=0, checksum=False), Crc32cCodec()]}


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
            return f"{what} {self.first}–{self.last} have no {self.array} chunk on disk (chunk {self.chunk}, {self.key})"
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
    """Who holds the store's extraction lock (StoreLock), or None when nobody does (locks.holder)."""
    from ser_cache.infra import locks

    return locks.holder(store_path)


def chunk_rows_for(feature_shape: tuple[int, ...], n_rows: int) -> int:
    """Rows per chunk: a power of two giving about TARGET_CHUNK_BYTES, between 16 and 8192."""
    row_bytes = int(np.prod(feature_shape)) * np.dtype(STORE_DTYPE).itemsize
    rows = 16
    while rows * 2 * row_bytes <= TARGET_CHUNK_BYTES and rows < 8192:
        rows *= 2
    return max(1, min(rows, max(n_rows, 1)))


@dataclass
class FeatureStore:
    """An open store. `create` and `open` build one; `write_chunks` and `read` use it."""

    path: Path
    group: object  # zarr.Group

    # ----------------------------------------------------------------- construction
    @classmethod
    def create(
        cls,
        path: str | Path,
        ids: Sequence[str],
        feature_shape: tuple[int, ...],
        attrs: dict,
        *,
        chunk_rows: int | None = None,
        frames: bool = False,
    ) -> FeatureStore:
        """Create an empty store atomically: built beside the target, then renamed into place.

        `frames`: a frame store; feature_shape is (T, D), T the most frames a row can have.
        """
        import zarr

        path = Path(path)
        if path.exists():
            raise StoreError(f"{path}: already exists")
        n = len(ids)
        if n == 0:
            raise StoreError(f"{path}: no utterances to store")
        if any(not str(i) for i in ids):  # an empty id is how a lost ids chunk reads (`ids`)
            raise StoreError(f"{path}: every utterance needs a non-empty id")
        rows = chunk_rows or chunk_rows_for(feature_shape, n)
        tmp = path.with_name(f".{path.name}.creating-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        g = zarr.open_group(str(tmp), mode="w")
        g.attrs.update({**attrs, "format": FORMAT, "format_version": FORMAT_VERSION, "dtype": STORE_DTYPE,
                        "n_rows": n, "feature_shape": list(feature_shape), "chunk_rows": rows})
        id_arr = g.create_array("ids", shape=(n,), dtype=str, chunks=(min(n, 65536),), **_codecs())
        id_arr[:] = np.asarray(list(ids), dtype=str)
        g.create_array("features", shape=(n, *feature_shape), dtype=STORE_DTYPE,
                       chunks=(rows, *feature_shape), fill_value=0, **_codecs())
        for flag in ("written", "failed"):
            g.create_array(flag, shape=(n,), dtype=bool, chunks=(rows,), fill_value=False, **_codecs())
        if frames:
            if len(feature_shape) != 2:
                raise StoreError(f"{path}: a frame store needs a (frames, dim) feature shape, got {feature_shape}")
            g.create_array("frames", shape=(n,), dtype="int32", chunks=(rows,), fill_value=0, **_codecs())
        os.replace(tmp, path)
        return cls.open(path, mode="r+")

    @classmethod
    def open(cls, path: str | Path, mode: str = "r", *, check: bool = True) -> FeatureStore:
        """Open a store; `check` (the default) also refuses arrays whose shapes disagree (`check_shapes`)."""
        store = cls(path=Path(path), group=_open_group(Path(path), mode))
        if check:
            store.check_shapes()
        return store

    def check_shapes(self) -> None:
        """Every array present, one row per utterance in each, features shaped as the attributes say.

        A hand-edited or damaged zarr.json would otherwise surface as an IndexError deep in a reader.
        """
        rebuild = "restore the array's zarr.json, or rebuild the store with `ser-cache extract --overwrite`"
        shapes = {}
        for name in (*ROW_ARRAYS, *(("frames",) if "frames" in self._member_names() else ())):
            shapes[name] = tuple(self._array(name).shape)
        n = shapes["ids"][0] if shapes["ids"] else 0
        for name, shape in shapes.items():
            if not shape or shape[0] != n:
                raise StoreError(f"{self.path}: array '{name}' has shape {shape}, but 'ids' has {n} rows; "
                                 f"every array needs one row per utterance; {rebuild}")
        attrs = self.group.attrs
        expected = attrs.get("feature_shape")
        if expected is not None and tuple(shapes["features"][1:]) != tuple(expected):
            raise StoreError(f"{self.path}: array 'features' has rows of shape {shapes['features'][1:]}, but the store's "
                             f"attribute feature_shape is {tuple(expected)}; {rebuild}")
        if attrs.get("n_rows") is not None and int(attrs["n_rows"]) != n:
            raise StoreError(f"{self.path}: the arrays have {n} rows, but the store's attribute n_rows is "
                             f"{attrs['n_rows']}; {rebuild}")
        rows = self._array("features").chunks[0]
        for name in shapes:
            if name != "ids" and self._array(name).chunks[0] != rows:
                raise StoreError(f"{self.path}: array '{name}' is chunked by {self._array(name).chunks[0]} rows, "
                                 f"'features' by {rows}; {rebuild}")

    def _member_names(self) -> set[str]:
        try:
            return set(self.group.array_keys())
        except Exception as exc:  # noqa: BLE001 - a damaged member's metadata: name the store
            raise StoreError(f"{self.path}: the arrays' metadata cannot be read ({_short(exc)}); "
                             "rebuild the store with `ser-cache extract --overwrite`") from None

    def _array(self, name: str):
        """The Zarr array `name`, or a StoreError naming it when it is missing or its zarr.json is damaged."""
        try:
            return self.group[name]
        except KeyError:
            raise StoreError(f"{self.path}: array '{name}' is missing (no {name}/zarr.json); "
                             "rebuild the store with `ser-cache extract --overwrite`") from None
        except Exception as exc:  # noqa: BLE001 - zarr raises many kinds for bad metadata
            raise StoreError(f"{self.path}: array '{name}' cannot be opened ({_short(exc)}); restore "
                             f"{name}/zarr.json, or rebuild the store with `ser-cache extract --overwrite`") from None

    # ----------------------------------------------------------------- metadata
    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @property
    def n_rows(self) -> int:
        return int(self._array("ids").shape[0])

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self._array("features").shape[1:])

    @property
    def chunk_rows(self) -> int:
        return int(self._array("features").chunks[0])

    @property
    def n_chunks(self) -> int:
        return -(-self.n_rows // self.chunk_rows)

    @property
    def is_frames(self) -> bool:
        """A frame store: one vector per encoder frame (see the module docstring)."""
        return "frames" in self._member_names()

    @property
    def fingerprint(self) -> str:
        return str(self.group.attrs.get("fingerprint", ""))

    def chunk_bounds(self, chunk: int) -> tuple[int, int]:
        start = chunk * self.chunk_rows
        return start, min(start + self.chunk_rows, self.n_rows)

    def ids(self) -> np.ndarray:
        """The utterance ids in row order; a StoreError when any is empty (its chunk lost or overwritten)."""
        ids = np.array(self._read("ids").tolist(), dtype=str)
        empty = np.flatnonzero(ids == "")
        if empty.size:
            raise StoreError(f"{self.path}: array 'ids' is damaged: {empty.size} row(s) have no utterance id "
                             f"(rows {int(empty[0])}–{int(empty[-1])}); {repair_advice([self._ids_problem(empty)])}")
        return ids

    def flags(self) -> tuple[np.ndarray, np.ndarray]:
        return self._read("written"), self._read("failed")

    def _ids_problem(self, rows: np.ndarray) -> ChunkProblem:
        arr = self._array("ids")
        chunk = int(rows[0]) // arr.chunks[0]
        return ChunkProblem("ids", chunk, int(rows[0]), int(rows[-1]), self._chunk_keys("ids", chunk)[0],
                            missing=False, reason="holds empty utterance ids")

    # ----------------------------------------------------------------- integrity
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
                problems.append(ChunkProblem(name, c, start + int(rows[0]), start + int(rows[-1]), keys[0], missing=True))
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
            written = self._read("written")
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
                                                 reason=f"cannot be read ({_short(exc)})"))
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

    def _read(self, name: str, selection=slice(None), chunk: int | None = None) -> np.ndarray:
        """`array[selection]` as numpy; a chunk that cannot be decoded becomes a StoreError naming it."""
        arr = self._array(name)
        try:
            return np.asarray(arr[selection])
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - zstd, crc32c, vlen-utf8... each raises its own kind
            raise StoreError(self._damaged_message(name, exc, chunk)) from None

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
        return (f"{self.path}: {where} cannot be read ({_short(exc)}); `ser-cache info --verify {self.path}` "
                f"lists every damaged chunk; {advice}")

    def pending_chunks(self, *, retry_failed: bool = False, flags: tuple[np.ndarray, np.ndarray] | None = None) -> list[int]:
        """Chunks with at least one row neither written nor (unless retried) failed."""
        written, failed = flags if flags is not None else self.flags()
        done = written if retry_failed else (written | failed)
        rows = self.chunk_rows
        return [c for c in range(self.n_chunks) if not done[c * rows:(c + 1) * rows].all()]

    # ----------------------------------------------------------------- writing
    def write_chunk(self, chunk: int, features: np.ndarray, written: np.ndarray, failed: np.ndarray,
                    frames: np.ndarray | None = None) -> None:
        """Write one whole chunk: features (and a frame store's counts) first, then the flags that declare them valid.

        In a frame store, everything past a row's `frames` count is written as zeros, whatever
        `features` holds there.
        """
        start, end = self.chunk_bounds(chunk)
        n = end - start
        if self.is_frames:
            if frames is None or np.shape(frames) != (n,):
                raise StoreError(f"{self.path}: chunk {chunk} of a frame store needs {n} frame counts")
            frames = np.asarray(frames, dtype=np.int32)
            limit = self.feature_shape[0]
            if frames.min(initial=0) < 0 or frames.max(initial=0) > limit:
                raise StoreError(f"{self.path}: chunk {chunk}: frame counts must lie in [0, {limit}]")
            frames = np.where(written, frames, 0).astype(np.int32)
            features = np.array(features, copy=True)
            features[np.arange(limit)[None, :] >= frames[:, None]] = 0
        elif frames is not None:
            raise StoreError(f"{self.path}: not a frame store; chunk {chunk} takes no frame counts")
        if features.shape != (n, *self.feature_shape):
            raise StoreError(f"{self.path}: chunk {chunk} expects features {(n, *self.feature_shape)}, got {features.shape}")
        if written.shape != (n,) or failed.shape != (n,):
            raise StoreError(f"{self.path}: chunk {chunk} flags must have {n} rows")
        with np.errstate(over="ignore"):  # overflow becomes inf, which the check below refuses
            feats = features.astype(STORE_DTYPE, copy=False)
        if not np.isfinite(feats[written]).all():
            raise StoreError(f"{self.path}: refusing to write non-finite features in chunk {chunk}")
        # Every chunk is stored, even one of zeros (which Zarr would otherwise skip): `verify` then
        # knows that a written row's chunk missing on disk was lost, not elided.
        def array(name):
            return self._array(name).with_config({"write_empty_chunks": True})

        array("features")[start:end] = feats
        if frames is not None:
            array("frames")[start:end] = frames
        array("failed")[start:end] = failed
        array("written")[start:end] = written

    def update_attrs(self, **attrs) -> None:
        self.group.attrs.update(attrs)

    # ----------------------------------------------------------------- reading
    def read(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, features, written), each read in one pass into memory (float16 features)."""
        return self.ids(), self._read("features"), self._read("written")

    def read_chunk(self, chunk: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(features, a frame store's counts or None) of one chunk, as stored."""
        start, end = self.chunk_bounds(chunk)
        frames = self._read("frames", slice(start, end), chunk).astype(np.int32) if self.is_frames else None
        return self._read("features", slice(start, end), chunk), frames

    def frame_counts(self, *, check: bool = True) -> np.ndarray:
        """Valid frames of every row (a frame store); 0 for rows not written, except in a chunk whose
        write was cut short before its flags (readers mask counts with `written`).

        `check`: refuse a count outside [0, T] (a StoreError naming the row and the chunk); a
        count read unchecked is for reports about the store, not for slicing its frames.
        """
        if not self.is_frames:
            raise StoreError(f"{self.path}: not a frame store (extract it with --pooling frames)")
        counts = self._read("frames").astype(np.int64)
        if check:
            problems = self._count_problems(counts)
            if problems:
                raise StoreError(problems_message(self.path, problems))
        return counts

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
                k = n + int(np.flatnonzero(block[i, n:].any(axis=-1))[0]) if whole else n
                why = f"frame {k}, past the count, is not all zeros: the count is smaller than the frames written"
            if why:
                chunk = r // self.chunk_rows
                return [ChunkProblem("frames", chunk, r, r, self._chunk_keys("frames", chunk)[0], missing=False,
                                     reason=f"holds frame count {n} for row {r}, but {why}")]
        return []

    def read_frames(self, rows: np.ndarray | None = None):
        """(ids, frames.Frames, written) of a frame store: the valid frames of `rows` (default: all),
        packed end to end in that order, read whole chunk by chunk (never row by row), float16.

        Rows not written come back empty (0 frames). Memory is the packed frames plus one chunk.
        """
        from ser_cache.features.frames import Frames

        ids = self.ids()
        written = self._read("written")
        counts = np.where(written, self.frame_counts(), 0)
        rows = np.arange(self.n_rows) if rows is None else np.asarray(rows, dtype=np.int64)
        out = Frames.empty(counts[rows], self.feature_shape[1], dtype=STORE_DTYPE)
        if rows.size == 0:
            return ids, out, written
        chunk_of = rows // self.chunk_rows
        for chunk in np.unique(chunk_of).tolist():
            where = np.flatnonzero(chunk_of == chunk)
            start, end = self.chunk_bounds(chunk)
            if not written[start:end].any():
                continue  # no frames to read (rows not written come back empty)
            longest = int(counts[start:end].max(initial=0))
            # One frame more than the longest row: the frame after each count, which must be zeros
            # (also for rows of 0 frames, whose first frame is that one).
            width = min(longest + 1, self.feature_shape[0])
            block = self._read("features", (slice(start, end), slice(0, width)), chunk)
            # Every written row of the chunk, not only those asked for: a count rewritten to 0 would
            # otherwise pass for a row without features and be left out without a word.
            problems = self._disagreements(block, start, counts, written, whole=False)
            if problems:
                raise StoreError(problems_message(self.path, problems))
            for j in where.tolist():
                r = int(rows[j])
                out.set_row(j, block[r - start, : counts[r]])
        return ids, out, written

    def frame_summary(self, written: np.ndarray | None = None, size_bytes: int | None = None) -> dict:
        """A frame store's figures: valid frames per written row, and what they cost on disk.

        `frames_bytes` is what the valid frames alone take in float16 (sum of counts × D × 2), the
        floor any layout could reach; `size_bytes` is what the store takes, padding and ids included.
        """
        written = self.flags()[0] if written is None else written
        size = _dir_size(self.path) if size_bytes is None else size_bytes
        # Unchecked (clipped): `info` shows a damaged store's figures and warns (verify names the rows).
        counts = np.clip(self.frame_counts(check=False), 0, self.feature_shape[0])[written]
        n = int(written.sum())
        frames_bytes = int(counts.sum()) * self.feature_shape[1] * np.dtype(STORE_DTYPE).itemsize
        return {
            "rows_written": n,
            "max_frames_per_row": self.feature_shape[0],
            "frames_mean": float(counts.mean()) if n else 0.0,
            "frames_max": int(counts.max()) if n else 0,
            "frames_total": int(counts.sum()),
            "frames_bytes": frames_bytes,
            "frames_bytes_per_row": frames_bytes / n if n else 0.0,
            "size_bytes_per_row": size / n if n else 0.0,
        }

    def summary(self) -> dict:
        written, failed = self.flags()
        a = self.attrs
        size = _dir_size(self.path)
        frames = {"frames": self.frame_summary(written, size)} if self.is_frames else {}
        return {
            "path": str(self.path),
            "name": a.get("name"),
            "model_id": a.get("model_id"),
            "revision": a.get("revision"),
            "kind": a.get("kind"),
            "rows": self.n_rows,
            "written": int(written.sum()),
            "failed": int(failed.sum()),
            "pending": int((~written & ~failed).sum()),
            "feature_shape": list(self.feature_shape),
            "dtype": a.get("dtype"),
            "chunk_rows": self.chunk_rows,
            "fingerprint": self.fingerprint,
            "settings": a.get("settings", {}),
            "package_version": a.get("package_version"),
            "size_bytes": size,
            **frames,
            **({"transcripts": a["transcripts"]} if a.get("transcripts") else {}),  # a text store's sources of text
        }


def remove_store(path: Path) -> None:
    """Delete a store, but only one that is recognisably a ser-cache store (never an arbitrary folder)."""
    FeatureStore.open(path, check=False)  # raises for anything else; a damaged store may still be removed
    shutil.rmtree(path)


LABEL_FLOATS = ("arousal", "valence", "dominance")
LABEL_STRINGS = ("emotion", "gender", "speaker", "split")


def export_hdf5(store: FeatureStore, out: str | Path, labels=None) -> Path:
    """Write the same arrays and attributes to an HDF5 file (temporary file, then rename).

    Features are copied one chunk at a time: a frame store's padded features can be several times
    the memory its valid frames need. A frame store's `frames` counts come along. With `labels`
    (the corpus's utterances), `labels/arousal`, `valence`, `dominance` (float32, NaN where
    missing) and `labels/emotion`, `gender`, `speaker`, `split` (strings, "" where missing) are
    added, row for row with `ids`; an id the corpus lacks gets NaN and "".
    """
    import h5py

    out = Path(out)
    ids = store.ids()
    written, failed = store.flags()
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("ids", data=ids.astype(object), dtype=h5py.string_dtype())
        feats = f.create_dataset("features", shape=(store.n_rows, *store.feature_shape), dtype=STORE_DTYPE,
                                 chunks=(store.chunk_rows, *store.feature_shape), compression="gzip")
        for chunk in range(store.n_chunks):
            start, end = store.chunk_bounds(chunk)
            feats[start:end] = store._read("features", slice(start, end), chunk)
        f.create_dataset("written", data=written)
        f.create_dataset("failed", data=failed)
        if store.is_frames:
            f.create_dataset("frames", data=store.frame_counts().astype(np.int32))
        if labels is not None:
            by_id = {u.id: u for u in labels}
            rows = [by_id.get(str(i)) for i in ids]
            group = f.create_group("labels")
            for name in LABEL_FLOATS:
                values = [getattr(u, name, None) if u is not None else None for u in rows]
                group.create_dataset(name, data=np.array([np.nan if v is None else v for v in values], np.float32))
            for name in LABEL_STRINGS:
                values = [(getattr(u, name, None) or "") if u is not None else "" for u in rows]
                group.create_dataset(name, data=np.array(values, dtype=object), dtype=h5py.string_dtype())
            group.attrs["rows_without_labels"] = sum(u is None for u in rows)
        for k, v in store.attrs.items():
            f.attrs[k] = json.dumps(v) if isinstance(v, (dict, list)) else v
    return out


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


def problems_message(path: Path, problems: Sequence[ChunkProblem]) -> str:
    """One line for a reader: the first problem, how many more, and what to do."""
    more = (f" (and {len(problems) - 1} more chunk(s) missing or damaged; `ser-cache info --verify {path}` lists them)"
            if len(problems) > 1 else "")
    return f"{path}: {problems[0]}{more}; {repair_advice(problems)}"


def _short(exc: BaseException) -> str:
    """'Type: first line of the message', short enough for a one-line error."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if "checksum do not match" in text:  # zarr's Crc32cCodec: the stored bytes are not those written
        return "crc32c checksum mismatch"
    text = text[:160] + "…" if len(text) > 160 else text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _open_group(path: Path, mode: str):
    """The Zarr group of a ser-cache store at `path`; a StoreError for anything else (an array inside a store included)."""
    import zarr

    meta = path / "zarr.json"
    if not meta.is_file():
        raise StoreError(f"{path}: not a feature store (no zarr.json); create it with `ser-cache extract`")
    try:
        node_type = json.loads(meta.read_text()).get("node_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise StoreError(f"{meta}: not readable Zarr metadata ({_short(exc)})") from None
    if node_type == "array":
        parent = path.resolve().parent
        if (parent / "zarr.json").is_file():
            raise StoreError(f"{path}: an array ('{path.name}') of the feature store at {parent}, not a store; "
                             f"pass {parent}")
        raise StoreError(f"{path}: a Zarr array, not a feature store (a Zarr group made by `ser-cache extract`)")
    try:
        g = zarr.open_group(str(path), mode=mode)
    except Exception as exc:  # noqa: BLE001 - zarr's many kinds of metadata errors
        raise StoreError(f"{path}: cannot be opened as a Zarr group ({_short(exc)})") from None
    if g.attrs.get("format") != FORMAT:
        raise StoreError(f"{path}: a Zarr group, but not a ser-cache feature store (attribute format={g.attrs.get('format')!r})")
    return g


def _dir_size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total
