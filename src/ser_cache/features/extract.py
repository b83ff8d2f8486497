"""Stage one: run a frozen encoder once over a corpus and write pooled (or frame-level) features to a store.

The loop, in order:
1. read the corpus, load the encoder, open (or create) `OUT/<name>.zarr` and check its fingerprint;
2. list the chunks not yet done; under torchrun each rank takes every world-th group of them;
3. read file headers (durations) and sort each group by length, then pack batches by total seconds;
4. decode in worker processes (spawned once per run, decoding.py), encode on the device with the
   host's work overlapped (encode.py), and write every chunk as soon as all of its rows are
   resolved (written or failed). Failures go to a per-rank report line by line first (report.py).

Resuming is the same command again: done chunks are skipped, and the result is byte-identical to an
uninterrupted run. A row's features depend on the batch it is encoded in (padding, and the matrix
products' blocking, change the rounding), so batches are planned from the store's whole chunk
layout, never from what a run left: a unit of chunks is sorted and packed the same way in every
run, and a resumed run encodes exactly the planned batches that hold a pending row, with the same
rows in them (results for rows already done are dropped). See `_run` and encode.plan_units.

With --pooling frames a row is the encoder's last layer at each of the clip's valid frames; the
chunk buffers then also hold each row's frame count, written with the chunk (store.py).

--layers chooses the hidden states an audio encoder keeps (encoders/layers.py): pooled stores of
several states hold (L, D) rows, frame stores (T, L, D). The choice is in the settings (and so the
fingerprint); what the encoder is (family, states held, hidden size, frame rate, input
convention) goes into the store's attribute "encoder" (Encoder.describe()), which is not
fingerprinted. Before the run, rank 0 hands `announce` the store's estimated size (`SizeEstimate`):
a frame store of every layer is L times a last-layer one, which the user should see first.

A text encoder reads each row's text through transcripts.attach: the corpus's transcript, or
the --transcripts table's where the corpus has none (first with --prefer-transcripts). Before
encoding, rank 0 writes which text feeds which row to `<name>.transcripts.csv` and refuses a
rerun that would give a row already written other text (see `record_transcripts`).

With --shard I/N (Slurm job arrays, docs/cluster.md) the run does shard I's share of the one-process
plan (units I, I+N, ... of `plan_units(store, 1)`; shard_progress.py), so that N shards, run at once
or one after another, killed and rerun, write exactly the store one process writes. Shards run side
by side under locks of their own; creating the store and finishing it (the report, `complete`) are
serialised under the store's set-up lock (store_lock.py). Under torchrun, a shard's ranks split its share.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np

from ser_cache.data import audio as audio_lib
from ser_cache.data.corpus import load_corpus
from ser_cache.data.records import Utterance
from ser_cache.data.transcripts import (
    TranscriptTable,
    attach,
    record_path,
)
from ser_cache.features.decoding import Decoder
from ser_cache.features.encode import encode_rows, new_timings, plan_units
from ser_cache.features.errors import ExtractError, StoreError
from ser_cache.features.report import ReportWriter, merge_reports, report_path, unreported
from ser_cache.features.size_estimate import SizeEstimate, estimate_size
from ser_cache.features.store import STORE_DTYPE, FeatureStore, remove_store
from ser_cache.features.store_lock import StoreLock
from ser_cache.features.store_ref import default_store_name, fingerprint, ids_digest, settings_differences
from ser_cache.features.text_record import TextChanged, load_transcript_table, record_transcripts
from ser_cache.infra.atomic import naming_disk_full
from ser_cache.infra.shards import Shard
from ser_cache.version import __version__

ON_ERROR = ("skip", "fail")
# Ranks meet only at the start and at the end, where the first to finish waits for the last: on
# shares that differ by a group of slow files or a slower node that can take far longer than
# torch's default 10 minutes. A rank that dies ends the job through torchrun, not this timeout.
RANK_WAIT = timedelta(hours=24)


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
    layers: str | None = None  # --layers: all, last, or indices and ranges; None: the encoder's default
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
    shard: Shard | None = None  # --shard I/N: this run does shard I's share of the plan (module docstring)

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
    complete: bool = False  # every row of the store written or failed (and reported)
    shard: Shard | None = None
    shard_rows: int = 0  # rows in this shard's share (a sharded run)
    shards_pending: str = ""  # a sharded run: the shards with rows still pending (shard_progress.missing_text)

    @property
    def utterances_per_second(self) -> float:
        return self.computed / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def audio_seconds_per_second(self) -> float:
        return self.audio_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0


def store_path(cfg: ExtractConfig) -> Path:
    """OUT/<name>.zarr; by default the model's short name, `<model>-frames` for a frame store."""
    return Path(cfg.out) / f"{cfg.name or default_store_name(cfg.model, cfg.pooling)}.zarr"


def extract(cfg: ExtractConfig, *, announce: Callable[[SizeEstimate], None] | None = None) -> ExtractResult:
    """Run stage one as configured; returns what this process did (rank 0: the store's totals).

    `announce`: called on rank 0 with the store's estimated size once the store is ready and before
    any row is encoded, unless every row is done (the CLI prints it)."""
    from ser_cache.encoders import load_encoder
    from ser_cache.infra import distributed

    cfg.verify()
    t0 = time.perf_counter()
    dist = distributed.init(timeout=RANK_WAIT)
    utts = load_corpus(cfg.data, cfg.splits or None)
    if not utts:
        raise ExtractError(f"--data {cfg.data}: no "
                           f"utterances{' in split(s) ' + ', '.join(cfg.splits) if cfg.splits else ''}")
    table = load_transcript_table(cfg.transcripts) if cfg.transcripts is not None else None
    encoder = load_encoder(cfg.model, kind=cfg.kind, device=dist.device(cfg.device), precision=cfg.precision,
                           window=cfg.window, pooling=cfg.pooling, max_seconds=cfg.max_seconds, layers=cfg.layers)
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
    lock = StoreLock(path, cfg.shard)

    # Rank 0 alone creates or refuses the store; the others learn the outcome before touching it.
    setup_error = None
    text_sources = None
    if dist.is_main:
        try:
            lock.acquire()
            with lock.setup():
                text_sources = _prepare_store(path, cfg, encoder, ids, settings, utts, sources, table)
                if cfg.shard is not None:
                    FeatureStore.open(path, mode="r+").update_attrs(shards={"count": cfg.shard.count})
        except (StoreError, ExtractError) as exc:
            lock.release()
            setup_error = str(exc)
    setup_error = dist.broadcast(setup_error)
    if setup_error:
        raise ExtractError(setup_error)
    try:
        store = FeatureStore.open(path, mode="r+")
        if announce is not None and dist.is_main and not store.attrs.get("complete"):
            announce(estimate_size(encoder, utts, path, cfg.max_seconds))
        t_loop = time.perf_counter()
        computed, audio_seconds, skipped, timings = _run(cfg, dist, encoder, utts, store)
        loop_seconds = time.perf_counter() - t_loop
        # The gather is also the point after which every rank has written all its chunks.
        per_rank = dist.all_gather((computed, audio_seconds))
        complete, pending = False, ""
        if dist.is_main:
            complete, pending = _finish(store, lock, cfg.shard)
        complete, pending = dist.broadcast((complete, pending))
        written, failed = store.flags()
        return ExtractResult(store=store.path, report=report_path(store.path), rows=store.n_rows,
                             written=int(written.sum()), failed=int(failed.sum()),
                             computed=sum(c for c, _ in per_rank), skipped=skipped,
                             audio_seconds=sum(a for _, a in per_rank), wall_seconds=time.perf_counter() - t0,
                             timings=timings, rank=dist.rank, world=dist.world,
                             setup_seconds=t_loop - t0, loop_seconds=loop_seconds, text_sources=text_sources,
                             modality=encoder.modality, complete=complete, shard=cfg.shard,
                             shard_rows=_share_rows(store, cfg.shard), shards_pending=pending)
    finally:
        lock.release()
        distributed.shutdown(dist)


def _finish(store: FeatureStore, lock: StoreLock, shard: Shard | None) -> tuple[bool, str]:
    """Merge the error report and set `complete` (rank 0, under the set-up lock: one view of the flags);
    (complete, the shards with rows pending — sharded runs)."""
    from ser_cache.features.shard_progress import missing_text, progress

    with lock.setup():
        merge_reports(store, shard)
        written, failed = store.flags()
        complete = bool((written | failed).all()) and unreported(store, failed & ~written) == 0
        store.update_attrs(complete=complete, rows_written=int(written.sum()), rows_failed=int(failed.sum()))
    pending = missing_text(progress(store, shard.count, (written, failed))) if shard is not None else ""
    return complete, pending


def _share_rows(store: FeatureStore, shard: Shard | None) -> int:
    if shard is None:
        return store.n_rows
    from ser_cache.features.shard_progress import shard_chunks

    return sum(e - s for s, e in map(store.chunk_bounds, shard_chunks(store, shard)))


def _prepare_store(path: Path, cfg: ExtractConfig, encoder, ids: list[str], settings: dict, utts: list[Utterance],
                   sources: list[str | None] | None, table: TranscriptTable | None) -> dict[str, int] | None:
    """Open or create the store (rank 0, locked); for a text store, check and write its transcript record."""
    _open_or_create(path, cfg, encoder, ids, settings)
    if sources is None:
        return None
    try:
        return record_transcripts(path, cfg, utts, sources, table)
    except TextChanged:
        if not cfg.overwrite:
            raise
        remove_store(path)  # same settings, other text: --overwrite rebuilds it as for other settings
        report_path(path).unlink(missing_ok=True)
        _open_or_create(path, cfg, encoder, ids, settings)
        return record_transcripts(path, cfg, utts, sources, table)


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
        **({"encoder": described} if (described := encoder.describe()) else {}),
        "package_version": __version__,
        "corpus": str(cfg.data),
        "splits": list(cfg.splits),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "complete": False,
    }
    FeatureStore.create(path, ids, encoder.feature_shape, attrs, chunk_rows=cfg.chunk_rows,
                        frames=encoder.frame_level)


def _differences(old: dict, new: dict) -> str:
    diffs = settings_differences(old, new, labels=("store has", "this run"))
    if old.get("layer") != new.get("layer"):  # say which option chose them
        diffs = [d + " (the hidden states kept: --layers)" if d.startswith("layer:") else d for d in diffs]
    return "; ".join(diffs) if diffs else "unknown settings"


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
    # A shard: its share of the one-process plan, whatever is done (a rerun takes the same units).
    plan = plan_units(store, dist.world) if cfg.shard is None else cfg.shard.share(plan_units(store, 1))
    units = [u for u in plan if pending.intersection(u)][dist.rank::dist.world]
    report = ReportWriter(report_path(store.path), dist.rank, cfg.shard)
    timings = new_timings()
    total_rows = sum(min(store.chunk_rows, store.n_rows - c * store.chunk_rows) for u in units for c in u
                     if c in pending)
    computed = 0
    audio_seconds = 0.0
    progress = ExtractProgress(enabled=cfg.progress and dist.is_main, total=total_rows, name=store.path.name,
                               audio=encoder.modality == "audio")
    workers = (distributed.decoding_workers(encoder.device.type, gpu_cap=8, cpu_cap=2)
               if cfg.workers is None else cfg.workers)
    decoder = Decoder(min(workers, total_rows), cfg.max_seconds)
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
                raise ExtractError(f"{utts[row].path}: {reason} (--on-error fail; the failure is listed in "
                                   f"{report.partial})")
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

    encode_rows(cfg, encoder, utts, todo, resolve, timings, decoder, planned=planned)
    return computed, seconds_done


# --------------------------------------------------------------------------- the report


