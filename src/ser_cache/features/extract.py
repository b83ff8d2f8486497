"""Stage one: run a frozen encoder once over a corpus and write pooled (or frame-level) features to a store.

The loop, in order:
1. read the corpus, load the encoder, open (or create) `OUT/<name>.zarr` and check its fingerprint;
2. list the chunks not yet done; under torchrun each rank takes every world-th group of them;
3. read file headers (durations) and sort each group by length, then pack batches by total seconds;
4. decode in worker processes (spawned once per run), encode on the device with the host's work
   overlapped (see `_encode_stream`), and write every chunk as soon as all of its rows are
   resolved (written or failed). Failures go to a per-rank report line by line first.

Resuming is the same command again: done chunks are skipped, and the result is byte-identical to an
uninterrupted run. A row's features depend on the batch it is encoded in (padding, and the matrix
products' blocking, change the rounding), so batches are planned from the store's whole chunk
layout, never from what a run left: a unit of chunks is sorted and packed the same way in every
run, and a resumed run encodes exactly the planned batches that hold a pending row, with the same
rows in them (results for rows already done are dropped). See `_run`.

With --pooling frames a row is the encoder's last layer at each of the clip's valid frames; the
chunk buffers then also hold each row's frame count, written with the chunk (store.py).

A text encoder reads each row's text through transcripts.attach: the corpus's transcript, or
the --transcripts table's where the corpus has none (first with --prefer-transcripts). Before
encoding, rank 0 writes which text feeds which row to `<name>.transcripts.csv` and refuses a
rerun that would give a row already written other text (see `_record_transcripts`).
"""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np

from ser_cache.version import __version__
from ser_cache.data import audio as audio_lib
from ser_cache.infra.atomic import atomic_path, naming_disk_full
from ser_cache.data.corpus import load_corpus
from ser_cache.data.records import Utterance
from ser_cache.features.store import (
    STORE_DTYPE,
    FeatureStore,
    StoreError,
    StoreLock,
    fingerprint,
    ids_digest,
    remove_store,
    settings_differences,
)
from ser_cache.data.transcripts import (
    RECORD_ATTR,
    TranscriptError,
    TranscriptTable,
    attach,
    counts,
    file_sha256,
    load_table,
    read_record,
    record_attr,
    record_bytes,
    record_path,
    record_problem,
    text_sha1,
    write_record,
)

ON_ERROR = ("skip", "fail")
MIN_SECONDS = 0.05  # shorter than a WavLM/Whisper frame or two: nothing to pool
UNIT_ROWS = 2048  # rows sorted together for length bucketing (bounded buffer memory)
UNIT_BYTES = 1 << 30  # ... and at most ~1 GiB of padded chunk buffers (frame stores have large rows)
REPORT_COLUMNS = ("id", "path", "reason")
# Ranks meet only at the start and at the end, where the first to finish waits for the last: on
# shares that differ by a group of slow files or a slower node that can take far longer than
# torch's default 10 minutes. A rank that dies ends the job through torchrun, not this timeout.
RANK_WAIT = timedelta(hours=24)
WAIT_SLICE = 0.25  # seconds: the longest a pending Ctrl-C waits in the main thread (see `_result`)


class ExtractError(Exception):
    """Extraction stopped (--on-error fail) or cannot start; the message names the file or option."""


@dataclass(frozen=True)
class ExtractConfig:
    model: str
    data: Path
    out: Path
    splits: tuple[str, ...] = ()
    name: str | None = None
    kind: str | None = None
    window: str | None = None  # Whisper's input: "window" (its default) or "trimmed"; refused for other encoders
    pooling: str = "mean"
    max_seconds: float = audio_lib.DEFAULT_MAX_SECONDS
    batch_seconds: float = 600.0
    batch_texts: int = 64
    device: str = "auto"
    precision: str = "auto"
    workers: int | None = None
    on_error: str = "skip"
    overwrite: bool = False
    retry_failed: bool = False
    chunk_rows: int | None = None
    progress: bool = True
    transcripts: Path | None = None  # a transcript table (transcribe's asr.csv) for rows the corpus has no text for
    prefer_transcripts: bool = False  # the table's text first, the corpus's where the table has none

    def verify(self) -> None:
        problems = []
        if self.on_error not in ON_ERROR:
            problems.append(f"--on-error {self.on_error}: expected one of {', '.join(ON_ERROR)}")
        if not self.max_seconds > 0:
            problems.append(f"--max-seconds {self.max_seconds}: expected a positive number of seconds")
        if not self.batch_seconds > 0:
            problems.append(f"--batch-seconds {self.batch_seconds}: expected a positive number of seconds")
        if self.workers is not None and self.workers < 0:
            problems.append(f"--workers {self.workers}: expected 0 or more")
        if self.chunk_rows is not None and self.chunk_rows < 1:
            problems.append(f"--chunk-rows {self.chunk_rows}: expected 1 or more")
        if self.prefer_transcripts and self.transcripts is None:
            problems.append("--prefer-transcripts: give the table with --transcripts FILE")
        if problems:
            raise ExtractError("; ".join(problems))


@dataclass
class ExtractResult:
    """What a run did; under torchrun, `computed` and `audio_seconds` are summed over the ranks."""

    store: Path
    report: Path
    rows: int
    written: int
    failed: int
    computed: int  # rows computed by this run (this rank)
    skipped: int  # rows already done before this run
    audio_seconds: float
    wall_seconds: float
    timings: dict = field(default_factory=dict)
    rank: int = 0
    world: int = 1
    setup_seconds: float = 0.0  # reading the corpus, loading the encoder, opening the store
    loop_seconds: float = 0.0  # this rank's encoding loop: wall_seconds less set-up and the final merge
    text_sources: dict | None = None  # a text store (rank 0): {"corpus": n, "table": m, "none": k} over its rows
    modality: str = "audio"  # the encoder's: a text store has no audio seconds to report

    @property
    def utterances_per_second(self) -> float:
        return self.computed / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def audio_seconds_per_second(self) -> float:
        return self.audio_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0


def store_path(cfg: ExtractConfig) -> Path:
    """OUT/<name>.zarr; by default the model's short name, `<model>-frames` for a frame store."""
    from ser_cache.encoders import default_store_name

    return Path(cfg.out) / f"{cfg.name or default_store_name(cfg.model, cfg.pooling)}.zarr"


def report_path(store: Path) -> Path:
    return store.with_name(store.name.removesuffix(".zarr") + ".errors.csv")


def extract(cfg: ExtractConfig) -> ExtractResult:
    """Run stage one as configured; returns what this process did (rank 0: the store's totals)."""
    from ser_cache.infra import distributed
    from ser_cache.encoders import load_encoder

    cfg.verify()
    t0 = time.perf_counter()
    dist = distributed.init(timeout=RANK_WAIT)
    utts = load_corpus(cfg.data, cfg.splits or None)
    if not utts:
        raise ExtractError(f"--data {cfg.data}: no utterances{' in split(s) ' + ', '.join(cfg.splits) if cfg.splits else ''}")
    table = _load_table(cfg.transcripts) if cfg.transcripts is not None else None
    encoder = load_encoder(cfg.model, kind=cfg.kind, device=dist.device(cfg.device), precision=cfg.precision,
                           window=cfg.window, pooling=cfg.pooling, max_seconds=cfg.max_seconds)
    sources = None
    if encoder.modality == "text":
        utts, sources = attach(utts, table, prefer=cfg.prefer_transcripts)
    elif cfg.transcripts is not None:
        raise ExtractError(f"--transcripts {cfg.transcripts}: model '{cfg.model}' is a {encoder.kind} (audio) encoder; "
                           "transcripts feed text encoders only (e.g. --model roberta-large)")
    ids = [u.id for u in utts]
    settings = {**encoder.settings(), "store_dtype": STORE_DTYPE, "rows": ids_digest(ids),
                "feature_shape": list(encoder.feature_shape)}
    if cfg.prefer_transcripts:
        # Only when given: stores built before the option existed keep their fingerprint.
        settings["prefer_transcripts"] = True
    path = store_path(cfg)
    lock = StoreLock(path)

    # Rank 0 alone creates or refuses the store; the others learn the outcome before touching it.
    setup_error = None
    text_sources = None
    if dist.is_main:
        try:
            lock.acquire()
            text_sources = _prepare_store(path, cfg, encoder, ids, settings, utts, sources, table)
        except (StoreError, ExtractError) as exc:
            lock.release()
            setup_error = str(exc)
    setup_error = dist.broadcast(setup_error)
    if setup_error:
        raise ExtractError(setup_error)
    try:
        store = FeatureStore.open(path, mode="r+")
        t_loop = time.perf_counter()
        computed, audio_seconds, skipped, timings = _run(cfg, dist, encoder, utts, store)
        loop_seconds = time.perf_counter() - t_loop
        # The gather is also the point after which every rank has written all its chunks.
        per_rank = dist.all_gather((computed, audio_seconds))
        written, failed = store.flags()
        if dist.is_main:
            _merge_reports(store, dist.world)
            store.update_attrs(complete=bool((written | failed).all()), rows_written=int(written.sum()),
                               rows_failed=int(failed.sum()))
        dist.barrier()
        return ExtractResult(store=store.path, report=report_path(store.path), rows=store.n_rows,
                             written=int(written.sum()), failed=int(failed.sum()),
                             computed=sum(c for c, _ in per_rank), skipped=skipped,
                             audio_seconds=sum(a for _, a in per_rank), wall_seconds=time.perf_counter() - t0,
                             timings=timings, rank=dist.rank, world=dist.world,
                             setup_seconds=t_loop - t0, loop_seconds=loop_seconds, text_sources=text_sources,
                             modality=encoder.modality)
    finally:
        lock.release()
        distributed.shutdown(dist)


class _TextChanged(ExtractError):
    """Rows already written would get other text; --overwrite rebuilds the store."""


def _prepare_store(path: Path, cfg: ExtractConfig, encoder, ids: list[str], settings: dict, utts: list[Utterance],
                   sources: list[str | None] | None, table: TranscriptTable | None) -> dict[str, int] | None:
    """Open or create the store (rank 0, locked); for a text store, check and write its transcript record."""
    _open_or_create(path, cfg, encoder, ids, settings)
    if sources is None:
        return None
    try:
        return _record_transcripts(path, cfg, utts, sources, table)
    except _TextChanged:
        if not cfg.overwrite:
            raise
        remove_store(path)  # same settings, other text: --overwrite rebuilds it as for other settings
        report_path(path).unlink(missing_ok=True)
        _open_or_create(path, cfg, encoder, ids, settings)
        return _record_transcripts(path, cfg, utts, sources, table)


def _open_or_create(path: Path, cfg: ExtractConfig, encoder, ids: list[str], settings: dict) -> None:
    fp = fingerprint(settings)
    if path.exists():
        # A store with damaged metadata or ids cannot be resumed (extract recomputes features, not
        # ids or shapes); --overwrite rebuilds it, as it rebuilds a store with other settings.
        try:
            store = FeatureStore.open(path)
            damage = None
            if store.fingerprint == fp:
                store.ids()
        except StoreError as exc:
            if not cfg.overwrite:
                raise
            store, damage = None, str(exc)
        if store is not None and damage is None and store.fingerprint == fp:
            return
        if store is not None and not cfg.overwrite:
            raise ExtractError(
                f"{path} was built with other settings ({_differences(store.attrs.get('settings', {}), settings)}); "
                "pass --overwrite to rebuild it, or --name to write a new store beside it"
            )
        if damage:
            import logging

            logging.getLogger(__name__).warning("rebuilding (--overwrite) a damaged store: %s", damage)
        remove_store(path)
        report = report_path(path)
        report.unlink(missing_ok=True)
    record_path(path).unlink(missing_ok=True)  # a record left by a store that is no longer there
    attrs = {
        "name": path.name.removesuffix(".zarr"),
        "model_id": encoder.model_id,
        "revision": encoder.revision,
        "kind": encoder.kind,
        "modality": encoder.modality,
        "window": settings.get("window"),
        "pooling": settings.get("pooling"),
        "max_seconds": settings.get("max_seconds"),
        "sample_rate": settings.get("sample_rate"),
        "settings": settings,
        "fingerprint": fp,
        "package_version": __version__,
        "corpus": str(cfg.data),
        "splits": list(cfg.splits),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "complete": False,
    }
    FeatureStore.create(path, ids, encoder.feature_shape, attrs, chunk_rows=cfg.chunk_rows,
                        frames=encoder.frame_level)


def _load_table(path: Path) -> TranscriptTable:
    try:
        return load_table(path)
    except TranscriptError as exc:
        raise ExtractError(str(exc)) from None


def _record_transcripts(path: Path, cfg: ExtractConfig, utts: list[Utterance], sources: list[str | None],
                        table: TranscriptTable | None) -> dict[str, int]:
    """Write which text feeds which row (`<name>.transcripts.csv`, store attribute "transcripts"); returns the counts.

    Runs on rank 0 before any row is encoded, with the store locked. Rows this run computes
    (pending, and failed ones with --retry-failed) take this run's text. A row already written
    keeps its entry, and if this run would feed it other text (another table, --prefer-transcripts
    given or not, a transcript edited since) the run is refused: the store would no longer say
    which text its rows hold. Written before encoding, the record of a killed run already names
    the text of every row it may have written, so its resume is checked the same way. A store with
    written rows whose record is missing, or is not the one the store vouches for (its sha256 in
    the store's attributes), is refused too: nothing says which text those rows hold.
    """
    store = FeatureStore.open(path, mode="r+")
    written, failed = store.flags()
    computed = ~written if cfg.retry_failed else ~(written | failed)
    record_file = record_path(path)
    problem = record_problem(record_file, store.attrs) if written.any() else None
    if problem:
        raise _TextChanged(f"{path}: {problem}, so nothing says which text its {int(written.sum())} written row(s) "
                           "were encoded from; restore the record, or pass --overwrite to rebuild the store")
    try:
        old = read_record(record_file)
    except TranscriptError as exc:
        raise _TextChanged(f"{exc}; pass --overwrite to rebuild the store and its record") from None
    rows, changed = [], []
    for i, (u, source) in enumerate(zip(utts, sources)):
        now = (u.id, source or "none", text_sha1(u.text if source else None))
        before = old.get(u.id)
        if computed[i] or before is None:
            rows.append(now)
            continue
        if written[i] and before[1] != now[2]:
            changed.append(u.id)
        rows.append((u.id, *before))
    if changed:
        shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        given = f"--transcripts {cfg.transcripts}" if cfg.transcripts is not None else "no --transcripts"
        raise _TextChanged(
            f"{path}: {len(changed)} row(s) already written were encoded from other text than this run gives them "
            f"({given}{', --prefer-transcripts' if cfg.prefer_transcripts else ''}): {shown}; see {record_file.name}. "
            "Pass the transcripts the store was built with, or --overwrite to rebuild it"
        )
    data = record_bytes(rows)
    # The store vouches for the record first: a kill between the two writes leaves the old record,
    # which the attribute still names as the previous one.
    store.update_attrs(**{RECORD_ATTR: record_attr(data, file_sha256(record_file))})
    write_record(record_file, data)
    totals = counts(None if s == "none" else s for _, s, _ in rows)
    store.update_attrs(transcripts={
        "table": None if table is None else str(table.path),
        "table_sha256": None if table is None else table.sha256,
        "asr": None if table is None else table.asr,
        "prefer": bool(cfg.prefer_transcripts),
        "rows": totals,
    })
    return totals


def _differences(old: dict, new: dict) -> str:
    diffs = settings_differences(old, new, labels=("store has", "this run"))
    return "; ".join(diffs) if diffs else "unknown settings"


def encoder_for_store(attrs: dict, *, device: str = "auto", precision: str = "auto", model: str | None = None):
    """Load the encoder a store was built with (same kind, window, pooling, crop), e.g. to featurise new audio.

    `model` overrides where the weights are (a local copy of the same model); the result's
    fingerprint-relevant settings still have to match the store's, which the caller checks.
    """
    from ser_cache.encoders import load_encoder

    settings = attrs.get("settings", {})
    return load_encoder(model or attrs["model_id"], kind=attrs.get("kind"), device=device, precision=precision,
                        window=settings.get("window") or None, pooling=settings.get("pooling") or "mean",
                        max_seconds=float(settings.get("max_seconds") or audio_lib.DEFAULT_MAX_SECONDS))


def compute_features(encoder, utts: list[Utterance], *, max_seconds: float = audio_lib.DEFAULT_MAX_SECONDS,
                     batch_seconds: float = 600.0, batch_texts: int = 64, workers: int = 0,
                     device: str = "auto"):
    """Features for utterances that no store holds (e.g. `predict` on bare audio files), in memory.

    Same batching, decoding and float16 rounding as `extract`, so a row equals what a store would
    hold. Returns (features, {id: reason} for the rows that failed). Features are an (N, *shape)
    float16 array (failed rows zero), or for a frame encoder a frames.Frames of the N rows' valid
    frames, as `FeatureStore.read_frames` gives them (failed rows have 0 frames).
    """
    cfg = ExtractConfig(model="", data=Path("."), out=Path("."), max_seconds=max_seconds,
                        batch_seconds=batch_seconds, batch_texts=batch_texts, workers=workers, device=device)
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

    decoder = _Decoder(min(workers, len(utts)), max_seconds)
    try:
        _encode(cfg, encoder, utts, list(range(len(utts))), resolve, _new_timings(), decoder)
    finally:
        decoder.close()
    if encoder.frame_level:
        return _pack(rows, encoder.feature_shape[-1]), errors
    return feats, errors


def _pack(rows: list, dim: int):
    """Frames holding `rows` ((T_i, D) arrays, None for none) end to end, in float16."""
    from ser_cache.features.frames import Frames

    out = Frames.empty([0 if r is None else len(r) for r in rows], dim, dtype=STORE_DTYPE)
    for i, r in enumerate(rows):
        if r is not None:
            out.set_row(i, r)
    return out


# --------------------------------------------------------------------------- the loop


@dataclass
class _Chunk:
    """A chunk being filled: existing rows are kept, pending rows are computed."""

    index: int
    start: int
    features: np.ndarray
    written: np.ndarray
    failed: np.ndarray
    remaining: int
    frames: np.ndarray | None = None  # a frame store's valid frames per row

    def put(self, i: int, value: np.ndarray) -> None:
        """Row i's features; for a frame store `value` is its valid frames, and its length the count.

        The rest of a frame row is left as it is: write_chunk zeroes it, and not touching it here
        keeps the padding of a fresh (calloc'ed) buffer out of memory until then.
        """
        if self.frames is None:
            self.features[i] = value
        else:
            self.features[i, : len(value)] = value
            self.frames[i] = len(value)
        self.written[i] = True


def _run(cfg: ExtractConfig, dist, encoder, utts: list[Utterance], store: FeatureStore) -> tuple[int, float, int, dict]:
    """This rank's share of the pending chunks: (rows computed, audio seconds, rows done before, timings)."""
    from ser_cache.infra import distributed
    from ser_cache.infra.progress import ExtractProgress

    # Rank 0 alone reads what is pending and tells the others: a rank reading the flags itself
    # could see chunks that another rank has already written, and the shares would not add up.
    written0, failed0 = dist.broadcast(_resume_flags(store) if dist.is_main else None)
    pending = set(store.pending_chunks(retry_failed=cfg.retry_failed, flags=(written0, failed0)))
    units = [u for u in _plan(store, dist.world) if pending.intersection(u)][dist.rank::dist.world]
    report = _ReportWriter(report_path(store.path), dist.rank)
    timings = _new_timings()
    total_rows = sum(min(store.chunk_rows, store.n_rows - c * store.chunk_rows) for u in units for c in u
                     if c in pending)
    computed = 0
    audio_seconds = 0.0
    progress = ExtractProgress(enabled=cfg.progress and dist.is_main, total=total_rows, name=store.path.name,
                               audio=encoder.modality == "audio")
    workers = (distributed.decoding_workers(encoder.device.type, gpu_cap=8, cpu_cap=2)
               if cfg.workers is None else cfg.workers)
    decoder = _Decoder(min(workers, total_rows), cfg.max_seconds)
    try:
        with progress:
            for unit in units:
                chunks = {}
                todo: list[int] = []
                for c in unit:
                    if c not in pending:
                        continue  # done: its rows only take their planned places in the batches
                    start, end = store.chunk_bounds(c)
                    w, f = written0[start:end].copy(), failed0[start:end].copy()
                    if w.any():
                        feats, frames = store.read_chunk(c)
                    else:
                        feats = np.zeros((end - start, *store.feature_shape), dtype=STORE_DTYPE)
                        frames = np.zeros(end - start, dtype=np.int32) if store.is_frames else None
                    need = ~w if cfg.retry_failed else ~(w | f)
                    f[need] = False
                    chunks[c] = _Chunk(c, start, feats, w, f, int(need.sum()), frames)
                    todo.extend(int(r) for r in np.flatnonzero(need) + start)
                    progress.advance(int((~need).sum()), 0.0)  # rows of the chunk already done
                planned = range(store.chunk_bounds(unit[0])[0], store.chunk_bounds(unit[-1])[1])
                rows_done = _process_unit(cfg, encoder, utts, todo, planned, chunks, store, report, timings, progress,
                                          decoder)
                computed += rows_done[0]
                audio_seconds += rows_done[1]
    finally:
        decoder.close()
        report.close()
    return computed, audio_seconds, int((written0 | failed0).sum()), timings


def _resume_flags(store: FeatureStore) -> tuple[np.ndarray, np.ndarray]:
    """The store's flags, less the written flags of chunks whose features (or frame counts) are not
    on disk: deleted or lost, they would read as zeros. Those chunks become pending and are
    recomputed, which is also how a damaged chunk is repaired: delete its file and run again."""
    import logging

    written, failed = store.flags()
    for problem in store.missing_chunks(written):
        start, end = store.chunk_bounds(problem.chunk)
        written[start:end] = False
        logging.getLogger(__name__).warning("%s: %s; recomputing chunk %d", store.path, problem, problem.chunk)
    return written, failed


def _plan(store: FeatureStore, world: int) -> list[list[int]]:
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


def _process_unit(cfg, encoder, utts, todo, planned, chunks, store, report, timings, progress,
                  decoder) -> tuple[int, float]:
    """Compute the rows `todo` in the batches planned over the unit's rows `planned`, writing each
    chunk as soon as all its rows are resolved."""
    rows_per_chunk = store.chunk_rows
    computed, seconds_done = 0, 0.0
    wanted = set(todo)

    def resolve(row: int, value: np.ndarray | None, reason: str | None, seconds: float) -> None:
        nonlocal computed, seconds_done
        if row not in wanted:
            return  # done before: encoded again only to keep its batch as planned
        ch = chunks[row // rows_per_chunk]
        i = row - ch.start
        if value is not None:
            ch.put(i, value)
        else:
            report.add(utts[row], reason)
            if cfg.on_error == "fail":
                # The run stops before the per-rank lines are merged into report.final: name the file they are in.
                raise ExtractError(f"{utts[row].path}: {reason} (--on-error fail; the failure is listed in {report.partial})")
            ch.failed[i] = True
        ch.remaining -= 1
        computed += 1
        seconds_done += seconds
        progress.advance(1, seconds)
        if ch.remaining == 0:
            t = time.perf_counter()
            report.flush()  # the reasons reach the disk before the flags that point to them
            with naming_disk_full(store.path):  # a chunk's write() names no file
                store.write_chunk(ch.index, ch.features, ch.written, ch.failed, ch.frames)
            timings["write"] += time.perf_counter() - t

    _encode(cfg, encoder, utts, todo, resolve, timings, decoder, planned=planned)
    return computed, seconds_done


def _new_timings() -> dict[str, float]:
    """Seconds spent reading headers, waiting for decoded audio, in the encoder, and writing."""
    return {"headers": 0.0, "decode_wait": 0.0, "encode": 0.0, "write": 0.0}


def _encode(cfg, encoder, utts, todo, resolve, timings, decoder, planned=None) -> None:
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
        return encoder.launch(_result(prepared_future))
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


def _result(future: Future):
    """`future.result()`, waited for in slices of WAIT_SLICE seconds.

    Python runs a signal's handler (Ctrl-C's KeyboardInterrupt) in the main thread, but the kernel
    may hand the signal to any thread of the process; the main thread then learns of it only
    when it next runs Python code. A wait with no timeout would hold Ctrl-C until the future is
    done: a whole batch's decoding, or for ever behind a stuck file. A sliced wait raises it
    within a slice.
    """
    while not future.done():
        wait_futures([future], timeout=WAIT_SLICE)
    return future.result()


def _decode_shared(decode, paths: list[str], kwargs: dict):
    """In a worker: decode a batch into one flat float32 tensor, its lengths and the failures.

    One tensor travels back through shared memory (torch's pickling of tensors), not through the
    pipe: a pickled list of arrays was about 3× slower to hand over (docs/performance.md).
    """
    import torch
    import torch.multiprocessing  # noqa: F401  (registers the shared-memory pickling of tensors)

    out = decode(paths, **kwargs)
    waves = [w for w, _ in out if w is not None]
    flat = torch.from_numpy(np.concatenate(waves)) if waves else torch.empty(0)
    return flat, [None if w is None else len(w) for w, _ in out], [reason for _, reason in out]


def _unpack(flat, lengths: list, reasons: list) -> list:
    """`_decode_shared`'s result as [(waveform view or None, reason or None), ...]."""
    data = flat.numpy()
    out, start = [], 0
    for n, reason in zip(lengths, reasons):
        if n is None:
            out.append((None, reason))
        else:
            out.append((data[start:start + n], None))
            start += n
    return out


class _Decoder:
    """Decodes batches of files in worker processes that live for the whole run.

    The workers are spawned once per run, not once per unit of chunks (a spawn costs a second or
    more, which at GPU rates is a unit's worth of encoding), and not forked: the parent runs
    Zarr's I/O thread. Up to `AHEAD` batches per worker are in flight, so the workers decode while
    the device encodes; each batch comes back as one tensor in shared memory. A worker that dies
    (a decoder crash on a malformed file) costs only that file: the batch is decoded again one
    file per task in fresh workers, and the file that kills a worker again is reported as failed.
    Workers that die with no file at all (they cannot start) stop the run with an error instead.
    """

    AHEAD = 4

    def __init__(self, workers: int, max_seconds: float, decode=None):
        self.workers = workers
        self.kwargs = {"max_seconds": max_seconds, "min_seconds": MIN_SECONDS}
        self.decode = decode or audio_lib.load_many
        self._pool = None

    def _executor(self):
        if self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            from ser_cache.infra.workers import init_worker

            # init_worker: a worker dies with this process (even one killed with SIGKILL) and
            # leaves Ctrl-C to it. Created and grown from the main thread (see workers.py).
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=init_worker, initargs=(os.getpid(),))
        return self._pool

    def _submit(self, paths: list[str]):
        return self._executor().submit(_decode_shared, self.decode, paths, self.kwargs)

    def _restart(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def close(self, grace: float = 2.0) -> None:
        """Stop the workers. At the end of a run they are idle and leave at once; when the run stops
        early (Ctrl-C, --on-error fail) batches may still be decoding, and a worker still busy
        after `grace` seconds is terminated rather than waited for."""
        if self._pool is None:
            return
        pool, self._pool = self._pool, None
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + grace
        for p in processes:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.terminate()
                p.join(grace)

    def batches(self, path_batches: list[list[str]], timings: dict) -> Iterator[list]:
        """For each batch of paths, in order: [(waveform or None, reason or None), ...]."""
        if self.workers == 0:
            for paths in path_batches:
                t = time.perf_counter()
                out = self.decode(paths, **self.kwargs)
                timings["decode_wait"] += time.perf_counter() - t
                yield out
            return
        from collections import deque

        todo = iter(path_batches)
        in_flight: deque = deque()

        def submit() -> None:
            paths = next(todo, None)
            if paths is not None:
                in_flight.append((paths, self._submit(paths)))

        for _ in range(self.AHEAD * self.workers):
            submit()
        while in_flight:
            paths, future = in_flight.popleft()
            t = time.perf_counter()
            try:
                out = _unpack(*_result(future))
            except BrokenProcessPool:
                self._check_workers_start()
                out = self._isolate(paths)
                # Every batch in flight died with the pool: send them again to the new one.
                again = [p for p, _ in in_flight]
                in_flight.clear()
                for p in again:
                    in_flight.append((p, self._submit(p)))
            timings["decode_wait"] += time.perf_counter() - t
            submit()
            yield out

    def _check_workers_start(self) -> None:
        """After a worker died: can fresh workers run at all? If a task that decodes nothing kills
        them too, the cause is the environment, not a file, and blaming the files would mark every
        row failed."""
        self._restart()
        try:
            _result(self._submit([]))
        except BrokenProcessPool:
            self._restart()
            raise ExtractError("the audio decoding worker processes die as they start (see the messages above); "
                               "pass --workers 0 to decode in the main process") from None

    def _isolate(self, paths: list[str]) -> list:
        """Decode a batch whose worker died one file per task; a file that kills a worker fails.

        Runs on the fresh workers `_check_workers_start` leaves, restarting them only after a crash.
        """
        out = []
        for path in paths:
            try:
                out.extend(_unpack(*_result(self._submit([path]))))
            except BrokenProcessPool:
                out.append((None, "decoding crashed the worker process (a malformed file?)"))
                self._restart()
        return out


# --------------------------------------------------------------------------- the report


class _ReportWriter:
    """Per-rank failure lines, appended and flushed as they happen, merged at the end."""

    def __init__(self, final: Path, rank: int):
        self.final = final
        self.partial = final.with_name(final.name.removesuffix(".csv") + f".rank{rank}.partial.csv")
        self._fh = None

    def add(self, utt: Utterance, reason: str) -> None:
        if self._fh is None:
            self._fh = open(self.partial, "a", newline="", encoding="utf-8")
            self._writer = csv.writer(self._fh)
            # Size, not existence: a process killed right after opening leaves an empty file, and
            # lines appended to it without a header would be read as one.
            if self._fh.tell() == 0:
                self._writer.writerow(REPORT_COLUMNS)
        self._writer.writerow([utt.id, str(utt.path), reason])

    def flush(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self.flush()
            self._fh.close()
            self._fh = None


def read_report(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _merge_reports(store: FeatureStore, world: int) -> None:
    """One report for the store: earlier entries plus every rank's new ones, for rows still failed."""
    final = report_path(store.path)
    partials = sorted(final.parent.glob(final.name.removesuffix(".csv") + ".rank*.partial.csv"))
    entries: dict[str, dict] = {}
    for src in [final, *partials]:
        for row in read_report(src):
            entries[row["id"]] = row
    _, failed = store.flags()
    failed_ids = set(store.ids()[failed].tolist())
    keep = [entries[i] for i in sorted(entries) if i in failed_ids]
    if keep:
        with atomic_path(final) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=REPORT_COLUMNS)
            w.writeheader()
            w.writerows({k: e.get(k, "") for k in REPORT_COLUMNS} for e in keep)
    else:
        final.unlink(missing_ok=True)
    for p in partials:
        p.unlink(missing_ok=True)
