"""The feature store: one Zarr v3 group per encoder and corpus, written in whole chunks, read once.

Layout (documented for other tools in docs/feature-store.md):

    <name>.zarr/
        zarr.json        group attributes: model id/revision, kind, window, pooling, ... fingerprint
        ids/             (N,)  string   the corpus's utterance ids, in row order
        features/        (N, D) or (N, L, D)  float16, or (N, T, D) / (N, T, L, D) in a frame store (below)
        written/         (N,)  bool     row holds a valid feature vector
        failed/          (N,)  bool     row could not be computed (reason in <name>.errors.csv)
        frames/          (N,)  int32    frame stores only: valid frames of each row

A frame store (`extract --pooling frames`, attribute pooling="frames") keeps one vector per
encoder frame: row i's valid frames are features[i, :frames[i]], and the rest of the row is zeros
up to T, the most frames any clip can have. Those zeros cost almost nothing on disk (the chunks
are compressed), and readers pack the valid frames end to end (`read_frames`, frames.Frames).
A frame store of several hidden states (`--layers`) has rows (T, L, D): a frame is one vector per
state held (the attribute "encoder" lists them), and read_frames can keep a single one of them.

Why whole chunks: Zarr v3 writes a chunk as one object. Two writers touching different rows of
the same chunk each rewrite the whole object and one of them loses; appending row by row is
also slow. So every write here covers complete chunks, and the extraction loop buffers rows
until the chunks they fall in are complete. Zarr's local store writes each chunk to a temporary
file and renames it, so a killed process leaves either the old or the new chunk, never half.
Features are written before the flags, so a crash between the two only costs a recomputation.

Every read error names the store, the array and the chunk (`StoreError`), and readers check that
the chunks of written rows are on disk before they read: integrity.py says why and how.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ser_cache.features.errors import StoreError
from ser_cache.features.integrity import ROW_ARRAYS, StoreChecks, problems_message, repair_advice, short_error

FORMAT = "ser-cache-features"
FORMAT_VERSION = 1
STORE_DTYPE = "float16"
TARGET_CHUNK_BYTES = 4 << 20  # ~4 MiB of features per chunk: large sequential writes, cheap resume
MIN_CHUNK_ROWS = 16
# A frame store of several layers has rows of T × L × D (Whisper large, every state: 750 × 33 × 1280,
# 63 MB a row): 16 of them would be 1 GB a chunk, decoded whole by every read. Such rows get fewer
# rows a chunk, down to one, keeping a chunk within this; stores without that axis are chunked as always.
MAX_LAYERED_CHUNK_BYTES = 64 << 20

log = logging.getLogger(__name__)


def _codecs() -> dict:
    """Zstd (Zarr's default) then a crc32c checksum of every chunk: garbage in a chunk file is an error, not data."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return {"compressors": [ZstdCodec(level=0, checksum=False), Crc32cCodec()]}


def chunk_rows_for(feature_shape: tuple[int, ...], n_rows: int) -> int:
    """Rows per chunk: a power of two giving about TARGET_CHUNK_BYTES, between 16 and 8192; for the
    (T, L, D) rows of a frame store with a layer axis, fewer than 16 (down to 1) where 16 would pass
    MAX_LAYERED_CHUNK_BYTES."""
    row_bytes = int(np.prod(feature_shape)) * np.dtype(STORE_DTYPE).itemsize
    rows = MIN_CHUNK_ROWS
    while rows * 2 * row_bytes <= TARGET_CHUNK_BYTES and rows < 8192:
        rows *= 2
    if len(feature_shape) >= 3:
        while rows > 1 and rows * row_bytes > MAX_LAYERED_CHUNK_BYTES:
            rows //= 2
    return max(1, min(rows, max(n_rows, 1)))


@dataclass
class FeatureStore(StoreChecks):
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

        `frames`: a frame store; feature_shape is (T, D), T the most frames a row can have, or
        (T, L, D) with a layer axis.
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
            if len(feature_shape) not in (2, 3):
                raise StoreError(f"{path}: a frame store needs a (frames, dim) or (frames, layers, dim) feature "
                                 f"shape, got {feature_shape}")
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
            raise StoreError(f"{self.path}: array 'features' has rows of shape {shapes['features'][1:]}, but the "
                             f"store's attribute feature_shape is {tuple(expected)}; {rebuild}")
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
            raise StoreError(f"{self.path}: the arrays' metadata cannot be read ({short_error(exc)}); "
                             "rebuild the store with `ser-cache extract --overwrite`") from None

    def _array(self, name: str):
        """The Zarr array `name`, or a StoreError naming it when it is missing or its zarr.json is damaged."""
        try:
            return self.group[name]
        except KeyError:
            raise StoreError(f"{self.path}: array '{name}' is missing (no {name}/zarr.json); "
                             "rebuild the store with `ser-cache extract --overwrite`") from None
        except Exception as exc:  # noqa: BLE001 - zarr raises many kinds for bad metadata
            raise StoreError(f"{self.path}: array '{name}' cannot be opened ({short_error(exc)}); restore "
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
    def frame_shape(self) -> tuple[int, ...]:
        """What one frame of a frame store is: (D,), or (L, D) with a layer axis."""
        return tuple(self.feature_shape[1:])

    @property
    def layer_axis(self) -> int | None:
        """L, the hidden states along the store's layer axis: the second of a pooled (L, D) row, the
        third of a frame store's (T, L, D) row; None for a store without one."""
        shape = self.feature_shape
        if self.is_frames:
            return int(shape[1]) if len(shape) == 3 else None
        return int(shape[0]) if len(shape) == 2 else None

    @property
    def fingerprint(self) -> str:
        return str(self.group.attrs.get("fingerprint", ""))

    def chunk_bounds(self, chunk: int) -> tuple[int, int]:
        start = chunk * self.chunk_rows
        return start, min(start + self.chunk_rows, self.n_rows)

    def ids(self) -> np.ndarray:
        """The utterance ids in row order; a StoreError when any is empty (its chunk lost or overwritten)."""
        ids = np.array(self.read_array("ids").tolist(), dtype=str)
        empty = np.flatnonzero(ids == "")
        if empty.size:
            raise StoreError(f"{self.path}: array 'ids' is damaged: {empty.size} row(s) have no utterance id "
                             f"(rows {int(empty[0])}–{int(empty[-1])}); {repair_advice([self._ids_problem(empty)])}")
        return ids

    def flags(self) -> tuple[np.ndarray, np.ndarray]:
        return self.read_array("written"), self.read_array("failed")

    # ----------------------------------------------------------------- integrity (the rest: integrity.StoreChecks)
    def read_array(self, name: str, selection=slice(None), chunk: int | None = None) -> np.ndarray:
        """`array[selection]` as numpy; a chunk that cannot be decoded becomes a StoreError naming it."""
        arr = self._array(name)
        try:
            return np.asarray(arr[selection])
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - zstd, crc32c, vlen-utf8... each raises its own kind
            raise StoreError(self._damaged_message(name, exc, chunk)) from None

    def pending_chunks(self, *, retry_failed: bool = False,
                       flags: tuple[np.ndarray, np.ndarray] | None = None) -> list[int]:
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
            raise StoreError(f"{self.path}: chunk {chunk} expects features {(n, *self.feature_shape)}, got "
                             f"{features.shape}")
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
        return self.ids(), self.read_array("features"), self.read_array("written")

    def read_chunk(self, chunk: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(features, a frame store's counts or None) of one chunk, as stored."""
        start, end = self.chunk_bounds(chunk)
        frames = self.read_array("frames", slice(start, end), chunk).astype(np.int32) if self.is_frames else None
        return self.read_array("features", slice(start, end), chunk), frames

    def frame_counts(self, *, check: bool = True) -> np.ndarray:
        """Valid frames of every row (a frame store); 0 for rows not written, except in a chunk whose
        write was cut short before its flags (readers mask counts with `written`).

        `check`: refuse a count outside [0, T] (a StoreError naming the row and the chunk); a
        count read unchecked is for reports about the store, not for slicing its frames.
        """
        if not self.is_frames:
            raise StoreError(f"{self.path}: not a frame store (extract it with --pooling frames)")
        counts = self.read_array("frames").astype(np.int64)
        if check:
            problems = self._count_problems(counts)
            if problems:
                raise StoreError(problems_message(self.path, problems))
        return counts

    def read_frames(self, rows: np.ndarray | None = None, *, layer: int | None = None):
        """(ids, frames.Frames, written) of a frame store: the valid frames of `rows` (default: all),
        packed end to end in that order, read whole chunk by chunk (never row by row), float16.

        Rows not written come back empty (0 frames). Memory is the packed frames plus one chunk.
        `layer`: in a store with a layer axis, keep only that position along it (frames of (D,)
        instead of (L, D)), so the packed frames take 1/L of the memory.
        """
        from ser_cache.features.frames import Frames

        ids = self.ids()
        written = self.read_array("written")
        counts = np.where(written, self.frame_counts(), 0)
        rows = np.arange(self.n_rows) if rows is None else np.asarray(rows, dtype=np.int64)
        frame_shape = self.frame_shape
        if layer is not None:
            if len(frame_shape) != 2 or not 0 <= layer < frame_shape[0]:
                held = f"positions 0-{frame_shape[0] - 1}" if len(frame_shape) == 2 else "no layer axis"
                raise StoreError(f"{self.path}: layer position {layer} asked for, but the store has {held}")
            frame_shape = frame_shape[1:]
        out = Frames.empty(counts[rows], frame_shape, dtype=STORE_DTYPE)
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
            block = self.read_array("features", (slice(start, end), slice(0, width)), chunk)
            # Every written row of the chunk, not only those asked for: a count rewritten to 0 would
            # otherwise pass for a row without features and be left out without a word.
            problems = self._disagreements(block, start, counts, written, whole=False)
            if problems:
                raise StoreError(problems_message(self.path, problems))
            if layer is not None:
                block = block[:, :, layer]
            for j in where.tolist():
                r = int(rows[j])
                out.set_row(j, block[r - start, : counts[r]])
        return ids, out, written

    def frame_summary(self, written: np.ndarray | None = None, size_bytes: int | None = None) -> dict:
        """A frame store's figures: valid frames per written row, and what they cost on disk.

        `frames_bytes` is what the valid frames alone take in float16 (sum of counts × D × 2, × L with
        a layer axis), the floor any layout could reach; `size_bytes` is what the store takes, padding
        and ids included. A store with a layer axis adds `layers` (L).
        """
        written = self.flags()[0] if written is None else written
        size = _dir_size(self.path) if size_bytes is None else size_bytes
        # Unchecked (clipped): `info` shows a damaged store's figures and warns (verify names the rows).
        counts = np.clip(self.frame_counts(check=False), 0, self.feature_shape[0])[written]
        n = int(written.sum())
        frames_bytes = int(counts.sum()) * int(np.prod(self.frame_shape)) * np.dtype(STORE_DTYPE).itemsize
        return {
            "rows_written": n,
            "max_frames_per_row": self.feature_shape[0],
            "frames_mean": float(counts.mean()) if n else 0.0,
            "frames_max": int(counts.max()) if n else 0,
            "frames_total": int(counts.sum()),
            "frames_bytes": frames_bytes,
            "frames_bytes_per_row": frames_bytes / n if n else 0.0,
            "size_bytes_per_row": size / n if n else 0.0,
            **({"layers": self.layer_axis} if self.layer_axis is not None else {}),
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
            **({"encoder": a["encoder"]} if a.get("encoder") else {}),  # what extract recorded of its encoder
            **({"transcripts": a["transcripts"]} if a.get("transcripts") else {}),  # a text store's sources of text
        }


def remove_store(path: Path) -> None:
    """Delete a store, but only one that is recognisably a ser-cache store (never an arbitrary folder)."""
    FeatureStore.open(path, check=False)  # raises for anything else; a damaged store may still be removed
    shutil.rmtree(path)


def _open_group(path: Path, mode: str):
    """The Zarr group of a ser-cache store at `path`; a StoreError for anything else (an array inside a store
    included)."""
    import zarr

    meta = path / "zarr.json"
    if not meta.is_file():
        raise StoreError(f"{path}: not a feature store (no zarr.json); create it with `ser-cache extract`")
    try:
        node_type = json.loads(meta.read_text()).get("node_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise StoreError(f"{meta}: not readable Zarr metadata ({short_error(exc)})") from None
    if node_type == "array":
        parent = path.resolve().parent
        if (parent / "zarr.json").is_file():
            raise StoreError(f"{path}: an array ('{path.name}') of the feature store at {parent}, not a store; "
                             f"pass {parent}")
        raise StoreError(f"{path}: a Zarr array, not a feature store (a Zarr group made by `ser-cache extract`)")
    try:
        g = zarr.open_group(str(path), mode=mode)
    except Exception as exc:  # noqa: BLE001 - zarr's many kinds of metadata errors
        raise StoreError(f"{path}: cannot be opened as a Zarr group ({short_error(exc)})") from None
    if g.attrs.get("format") != FORMAT:
        raise StoreError(f"{path}: a Zarr group, but not a ser-cache feature store (attribute "
                         f"format={g.attrs.get('format')!r})")
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
