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
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ser_cache.atomic import atomic_path

FORMAT = "ser-cache-features"
FORMAT_VERSION = 1
STORE_DTYPE = "float16"
TARGET_CHUNK_BYTES = 4 << 20  # ~4 MiB of features per chunk: large sequential writes, cheap resume


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
        rows = chunk_rows or chunk_rows_for(feature_shape, n)
        tmp = path.with_name(f".{path.name}.creating-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        g = zarr.open_group(str(tmp), mode="w")
        g.attrs.update({**attrs, "format": FORMAT, "format_version": FORMAT_VERSION, "dtype": STORE_DTYPE,
                        "n_rows": n, "feature_shape": list(feature_shape), "chunk_rows": rows})
        id_arr = g.create_array("ids", shape=(n,), dtype=str, chunks=(min(n, 65536),))
        id_arr[:] = np.asarray(list(ids), dtype=str)
        g.create_array("features", shape=(n, *feature_shape), dtype=STORE_DTYPE,
                       chunks=(rows, *feature_shape), fill_value=0)
        for flag in ("written", "failed"):
            g.create_array(flag, shape=(n,), dtype=bool, chunks=(rows,), fill_value=False)
        if frames:
            if len(feature_shape) != 2:
                raise StoreError(f"{path}: a frame store needs a (frames, dim) feature shape, got {feature_shape}")
            g.create_array("frames", shape=(n,), dtype="int32", chunks=(rows,), fill_value=0)
        os.replace(tmp, path)
        return cls.open(path, mode="r+")

    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> FeatureStore:
        import zarr

        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise StoreError(f"{path}: not a feature store (no zarr.json); create it with `ser-cache extract`")
        g = zarr.open_group(str(path), mode=mode)
        if g.attrs.get("format") != FORMAT:
            raise StoreError(f"{path}: a Zarr group, but not a ser-cache feature store (attribute format={g.attrs.get('format')!r})")
        return cls(path=path, group=g)

    # ----------------------------------------------------------------- metadata
    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @property
    def n_rows(self) -> int:
        return int(self.group["ids"].shape[0])

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.group["features"].shape[1:])

    @property
    def chunk_rows(self) -> int:
        return int(self.group["features"].chunks[0])

    @property
    def n_chunks(self) -> int:
        return -(-self.n_rows // self.chunk_rows)

    @property
    def is_frames(self) -> bool:
        """A frame store: one vector per encoder frame (see the module docstring)."""
        return "frames" in self.group.array_keys()

    @property
    def fingerprint(self) -> str:
        return str(self.group.attrs.get("fingerprint", ""))

    def chunk_bounds(self, chunk: int) -> tuple[int, int]:
        start = chunk * self.chunk_rows
        return start, min(start + self.chunk_rows, self.n_rows)

    def ids(self) -> np.ndarray:
        return np.array(np.asarray(self.group["ids"][:]).tolist(), dtype=str)

    def flags(self) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.group["written"][:]), np.asarray(self.group["failed"][:])

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
        self.group["features"][start:end] = feats
        if frames is not None:
            self.group["frames"][start:end] = frames
        self.group["failed"][start:end] = failed
        self.group["written"][start:end] = written

    def update_attrs(self, **attrs) -> None:
        self.group.attrs.update(attrs)

    # ----------------------------------------------------------------- reading
    def read(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, features, written), each read in one pass into memory (float16 features)."""
        return self.ids(), np.asarray(self.group["features"][:]), np.asarray(self.group["written"][:])

    def frame_counts(self) -> np.ndarray:
        """Valid frames of every row (a frame store); 0 for rows not written."""
        if not self.is_frames:
            raise StoreError(f"{self.path}: not a frame store (extract it with --pooling frames)")
        return np.asarray(self.group["frames"][:], dtype=np.int64)

    def read_frames(self, rows: np.ndarray | None = None):
        """(ids, frames.Frames, written) of a frame store: the valid frames of `rows` (default: all),
        packed end to end in that order, read whole chunk by chunk (never row by row), float16.

        Rows not written come back empty (0 frames). Memory is the packed frames plus one chunk.
        """
        from ser_cache.frames import Frames

        ids = self.ids()
        written = np.asarray(self.group["written"][:])
        counts = np.where(written, self.frame_counts(), 0)
        rows = np.arange(self.n_rows) if rows is None else np.asarray(rows, dtype=np.int64)
        out = Frames.empty(counts[rows], self.feature_shape[1], dtype=STORE_DTYPE)
        if rows.size == 0:
            return ids, out, written
        chunk_of = rows // self.chunk_rows
        features = self.group["features"]
        for chunk in np.unique(chunk_of).tolist():
            where = np.flatnonzero(chunk_of == chunk)
            start, end = self.chunk_bounds(chunk)
            longest = int(counts[start:end].max(initial=0))
            if longest == 0:
                continue
            block = np.asarray(features[start:end, :longest])
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
        counts = self.frame_counts()[written]
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
    FeatureStore.open(path)  # raises for anything else
    shutil.rmtree(path)


def export_hdf5(store: FeatureStore, out: str | Path) -> Path:
    """Write the same arrays and attributes to an HDF5 file (temporary file, then rename).

    Features are copied one chunk at a time: a frame store's padded features can be several times
    the memory its valid frames need. A frame store's `frames` counts come along.
    """
    import h5py

    out = Path(out)
    ids = store.ids()
    written, failed = store.flags()
    source = store.group["features"]
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("ids", data=ids.astype(object), dtype=h5py.string_dtype())
        feats = f.create_dataset("features", shape=source.shape, dtype=STORE_DTYPE,
                                 chunks=(store.chunk_rows, *store.feature_shape), compression="gzip")
        for chunk in range(store.n_chunks):
            start, end = store.chunk_bounds(chunk)
            feats[start:end] = np.asarray(source[start:end])
        f.create_dataset("written", data=written)
        f.create_dataset("failed", data=failed)
        if store.is_frames:
            f.create_dataset("frames", data=np.asarray(store.group["frames"][:], dtype=np.int32))
        for k, v in store.attrs.items():
            f.attrs[k] = json.dumps(v) if isinstance(v, (dict, list)) else v
    return out


class StoreLock:
    """An exclusive lock on a store for one run: a second concurrent run is refused, never interleaved.

    Uses flock on `<store>.lock`, which the kernel releases when the process dies (kill -9
    included), so a crashed run never leaves a stale lock behind.
    """

    def __init__(self, store_path: Path):
        self.path = Path(str(store_path) + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = ""
            try:
                holder = os.read(fd, 200).decode(errors="replace").strip()
            finally:
                os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise StoreError(
                    f"{self.path.with_suffix('')}: another extraction is writing this store ({holder or 'unknown holder'}); "
                    "wait for it to finish (a second run would interleave writes)"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _dir_size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total
