"""How stage one turns rows into features: the batches, and the encoder's work overlapped with the host's.

`extract` and `compute_features` (in memory, for `predict` and the Python API) encode rows the
same way, so a row computed here equals what a store would hold:
- the plan (`plan_units`): the store's chunks in units, whose rows are sorted by length and
  packed together, the same in every run, so that a resumed extract encodes the very batches an
  uninterrupted one would (a row's features depend on its batch: padding, and the matrix
  products' blocking, change the rounding);
- the batches (`encode_rows`): audio files' headers read for their lengths, rows sorted and packed
  by total seconds (text by count), decoded in worker processes (decoding.py);
- the encoder (`_encode_stream`): a helper thread prepares batch k+1 while the device runs batch
  k and the results of batch k-1 are handed on; a batch that fails is retried item by item.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ser_cache.data import audio as audio_lib
from ser_cache.data.corpus import Utterance
from ser_cache.features.decoding import Decoder, wait_result
from ser_cache.features.store import STORE_DTYPE, FeatureStore

UNIT_ROWS = 2048  # rows sorted together for length bucketing (bounded buffer memory)
UNIT_BYTES = 1 << 30  # ... and at most ~1 GiB of padded chunk buffers (frame stores have large rows)


# --------------------------------------------------------------------------- the plan


def plan_units(store: FeatureStore, world: int) -> list[list[int]]:
    """Every chunk of the store in units (`_units`), whatever is done: the same plan in every run.

    A unit's rows are sorted and packed into batches together, so planning from the pending
    chunks (as a resumed run has fewer) would put rows in other batches than an uninterrupted
    run and change their features by rounding. The plan depends on the store, its chunking and
    the number of ranks only.
    """
    row_bytes = int(np.prod(store.feature_shape)) * np.dtype(STORE_DTYPE).itemsize
    return _units(list(range(store.n_chunks)), store.chunk_rows, world, _unit_rows(row_bytes))


def _unit_rows(row_bytes: int) -> int:
    """Rows per unit: UNIT_ROWS, fewer where their chunk buffers would pass UNIT_BYTES.

    A unit's chunks are all buffered until its end (rows are sorted by length across the unit, so
    most chunks complete late). Pooled rows are small; a Whisper large-v3 frame row is 1.9 MB
    padded, and 2,048 of them would be 3.9 GB per rank.
    """
    return max(1, min(UNIT_ROWS, UNIT_BYTES // max(row_bytes, 1)))


def _units(chunks: list[int], chunk_rows: int, world: int = 1, unit_rows: int = UNIT_ROWS) -> list[list[int]]:
    """Group chunks into units of up to `unit_rows` rows: the span sorted for length bucketing.

    Units are dealt round-robin to ranks, so they are also kept small enough that every rank gets
    about four of them: an even share of the work without coordination.
    """
    per_unit = max(1, min(unit_rows // chunk_rows, -(-len(chunks) // (4 * world))))
    return [chunks[i:i + per_unit] for i in range(0, len(chunks), per_unit)]


# --------------------------------------------------------------------------- the batches


@dataclass(frozen=True)
class Batching:
    """What `encode_rows` reads of a configuration: crop, batch sizes, and the transcript table (for
    messages). `extract` passes its ExtractConfig, which has the same fields; `compute_features` this."""

    max_seconds: float = audio_lib.DEFAULT_MAX_SECONDS
    batch_seconds: float = 600.0
    batch_texts: int = 64
    transcripts: Path | None = None


def new_timings() -> dict[str, float]:
    """Seconds spent reading headers, waiting for decoded audio, in the encoder, and writing."""
    return {"headers": 0.0, "decode_wait": 0.0, "encode": 0.0, "write": 0.0}


def encode_rows(cfg, encoder, utts, todo, resolve, timings, decoder, planned=None) -> None:
    """Encode the rows `todo`, handing each result (or failure reason) to `resolve`.

    Batches are packed over the rows `planned` (default: `todo`), a superset of `todo` in row
    order; only the batches holding a row of `todo` are encoded, whole. `resolve` also receives
    the other rows of those batches, and ignores them.
    """
    planned = todo if planned is None else planned
    wanted = set(todo)
    if encoder.modality == "text":
        _encode_texts(cfg, encoder, utts, planned, wanted, resolve, timings)
    else:
        _encode_audio(cfg, encoder, utts, planned, wanted, resolve, timings, decoder)


def _encode_texts(cfg, encoder, utts, planned, wanted, resolve, timings) -> None:
    texts = {}
    for row in planned:
        text = utts[row].read_text()
        if text is None or not text.strip():
            where = utts[row].transcript or "manifest text column"
            if cfg.transcripts is not None:
                where = f"{where}; none in {cfg.transcripts}"
            resolve(row, None, f"missing transcript ({where})", 0.0)
        else:
            texts[row] = text
    order = sorted(texts, key=lambda r: len(texts[r]))
    batches = _needed((order[i:i + cfg.batch_texts] for i in range(0, len(order), cfg.batch_texts)), wanted)
    _encode_stream(encoder, ((rows, [texts[r] for r in rows], [0.0] * len(rows)) for rows in batches), resolve, timings)


def _needed(batches, wanted: set[int]) -> list[list[int]]:
    """The planned batches that hold a row to compute, whole."""
    return [rows for rows in batches if not wanted.isdisjoint(rows)]


def _encode_audio(cfg, encoder, utts, planned, wanted, resolve, timings, decoder) -> None:
    t = time.perf_counter()
    durations = _durations(utts, planned, cfg.max_seconds, resolve)
    timings["headers"] += time.perf_counter() - t
    batches = _needed(_batches(durations, encoder, cfg.batch_seconds), wanted)
    decoded = decoder.batches([[str(utts[r].path) for r in rows] for rows in batches], timings)

    def usable():
        for rows, results in zip(batches, decoded):
            good_rows, good_waves, secs = [], [], []
            for row, (wave, err) in zip(rows, results):
                if err is not None:
                    resolve(row, None, err, 0.0)
                else:
                    good_rows.append(row)
                    good_waves.append(wave)
                    secs.append(len(wave) / audio_lib.SAMPLE_RATE)
            if good_rows:
                yield good_rows, good_waves, secs

    _encode_stream(encoder, usable(), resolve, timings)


def _durations(utts, todo, max_seconds, resolve) -> dict[int, float]:
    """Header-only durations (no decoding), cropped to max_seconds; unreadable files fail here."""

    def one(row):
        try:
            i = audio_lib.info(utts[row].path)
        except audio_lib.AudioError as exc:
            return row, None, exc.reason
        if i.frames == 0:
            return row, None, "empty audio (0 samples)"
        return row, min(i.seconds, max_seconds), None

    out = {}
    with ThreadPoolExecutor(max_workers=16) as pool:
        for row, secs, err in pool.map(one, todo):
            if err is not None:
                resolve(row, None, err, 0.0)
            else:
                out[row] = secs
    return out


def _batches(durations: dict[int, float], encoder, batch_seconds: float) -> list[list[int]]:
    """Sort by length, then pack while (items × longest padded cost) stays within batch_seconds."""
    order = sorted(durations, key=lambda r: durations[r])
    batches, cur, longest = [], [], 0.0
    for row in order:
        cost = encoder.cost(durations[row])
        if cur and max(longest, cost) * (len(cur) + 1) > batch_seconds:
            batches.append(cur)
            cur, longest = [], 0.0
        cur.append(row)
        longest = max(longest, cost)
    if cur:
        batches.append(cur)
    return batches


# --------------------------------------------------------------------------- the encoder


def _encode_stream(encoder, batches, resolve, timings) -> None:
    """Encode (rows, inputs, seconds) batches with the host, the device and the results overlapped.

    While the device runs batch k, a helper thread prepares batch k+1 (padding into pinned
    memory, tokenising) and this thread hands batch k-1's features to `resolve`, which writes
    the chunks it completes: on a GPU the device need not wait for the host between batches.
    Every `prepare` runs in the one helper thread (a tokeniser must not be used by two threads
    at once). A batch that fails is encoded again item by item, so one bad input costs only its
    own row.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ser-cache-prepare") as helper:

        def prepared(item):
            return None if item is None else (item, helper.submit(encoder.prepare, item[1]))

        items = iter(batches)
        current = prepared(next(items, None))
        previous = None
        while current is not None:
            (rows, inputs, seconds), future = current
            pending = _launch(encoder, future, timings)
            current = prepared(next(items, None))
            if previous is not None:
                _finish(encoder, helper, *previous, resolve, timings)
            previous = (rows, inputs, seconds, pending)
        if previous is not None:
            _finish(encoder, helper, *previous, resolve, timings)


def _launch(encoder, prepared_future, timings):
    """The batch's device work, queued; or the exception that preparing or launching it raised."""
    t = time.perf_counter()
    try:
        return encoder.launch(wait_result(prepared_future))
    except Exception as exc:  # an encoder failure on one input must not cost the others
        return exc
    finally:
        timings["encode"] += time.perf_counter() - t


def _finish(encoder, helper, rows, inputs, seconds, pending, resolve, timings) -> None:
    """Wait for a launched batch and resolve its rows; on failure, retry its items one by one."""
    t = time.perf_counter()
    try:
        if isinstance(pending, Exception):
            raise pending
        out = pending.result().numpy()
    except Exception as exc:
        timings["encode"] += time.perf_counter() - t
        if len(rows) == 1:
            message = str(exc).splitlines()[0] if str(exc) else ""
            resolve(rows[0], None, f"encoder failed ({type(exc).__name__}: {message})", 0.0)
            return
        for r, x, s in zip(rows, inputs, seconds):
            one = _launch(encoder, helper.submit(encoder.prepare, [x]), timings)
            _finish(encoder, helper, [r], [x], [s], one, resolve, timings)
        return
    timings["encode"] += time.perf_counter() - t
    out16 = out.astype(STORE_DTYPE)
    values = list(out16)
    if encoder.frame_level:  # a row is its valid frames; their number is its count
        counts = encoder.frame_counts(np.array([len(x) for x in inputs], dtype=np.int64))
        values = [v[:n] for v, n in zip(values, counts.tolist())]
    for row, value, secs in zip(rows, values, seconds):
        if np.isfinite(value).all():
            resolve(row, value, None, secs)
        else:
            resolve(row, None, "encoder produced non-finite values (NaN, or beyond the float16 range)", 0.0)


# --------------------------------------------------------------------------- in memory


def layers_spec(setting) -> str | None:
    """The `--layers` value that gives a store's "layer" setting again (layers.layer_setting's forms:
    "last", "all", an index, a list of indices); None for a store without the setting."""
    if setting is None:
        return None
    if isinstance(setting, list):
        return ",".join(str(int(i)) for i in setting)
    return str(setting)


def encoder_for_store(attrs: dict, *, device: str = "auto", precision: str = "auto", model: str | None = None):
    """Load the encoder a store was built with (same kind, window, pooling, crop, hidden states), e.g. to
    featurise new audio.

    `model` overrides where the weights are (a local copy of the same model); the result's
    fingerprint-relevant settings still have to match the store's, which the caller checks.
    """
    from ser_cache.encoders import LAYERED_KINDS, load_encoder

    settings = attrs.get("settings", {})
    # Only an encoder with hidden states to choose from takes --layers (a text store's settings say
    # "last" of its one output, an x-vector's nothing).
    layers = layers_spec(settings.get("layer")) if attrs.get("kind") in LAYERED_KINDS else None
    return load_encoder(model or attrs["model_id"], kind=attrs.get("kind"), device=device, precision=precision,
                        window=settings.get("window") or None, pooling=settings.get("pooling") or "mean",
                        max_seconds=float(settings.get("max_seconds") or audio_lib.DEFAULT_MAX_SECONDS),
                        **({"layers": layers} if layers is not None else {}))


def compute_features(encoder, utts: list[Utterance], *, max_seconds: float = audio_lib.DEFAULT_MAX_SECONDS,
                     batch_seconds: float = 600.0, batch_texts: int = 64, workers: int = 0,
                     device: str = "auto"):
    """Features for utterances that no store holds (e.g. `predict` on bare audio files), in memory.

    Same batching, decoding and float16 rounding as `extract`, so a row equals what a store would
    hold. Returns (features, {id: reason} for the rows that failed). Features are an (N, *shape)
    float16 array (failed rows zero), or for a frame encoder a frames.Frames of the N rows' valid
    frames, as `FeatureStore.read_frames` gives them (failed rows have 0 frames).
    """
    cfg = Batching(max_seconds=max_seconds, batch_seconds=batch_seconds, batch_texts=batch_texts)
    if encoder.frame_level:
        rows: list[np.ndarray | None] = [None] * len(utts)  # valid frames only: no padded copy in memory
    else:
        feats = np.zeros((len(utts), *encoder.feature_shape), dtype=STORE_DTYPE)
    errors: dict[str, str] = {}

    def resolve(row, value, reason, seconds):
        if value is None:
            errors[utts[row].id] = reason
        elif encoder.frame_level:
            rows[row] = value
        else:
            feats[row] = value

    decoder = Decoder(min(workers, len(utts)), max_seconds)
    try:
        encode_rows(cfg, encoder, utts, list(range(len(utts))), resolve, new_timings(), decoder)
    finally:
        decoder.close()
    if encoder.frame_level:
        return _pack(rows, encoder.feature_shape[1:]), errors
    return feats, errors


def _pack(rows: list, frame_shape: tuple[int, ...]):
    """Frames holding `rows` ((T_i, *frame_shape) arrays, None for none) end to end, in float16."""
    from ser_cache.features.frames import Frames

    out = Frames.empty([0 if r is None else len(r) for r in rows], frame_shape, dtype=STORE_DTYPE)
    for i, r in enumerate(rows):
        if r is not None:
            out.set_row(i, r)
    return out
