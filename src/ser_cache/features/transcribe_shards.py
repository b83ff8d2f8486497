"""`transcribe --shard I/N` (Slurm job arrays): one shard's part of the plan, and the merge.

Every shard plans the whole work as a fresh one-process run plans it (the selected utterances not
in the finished table, packed) and takes batches I, I+N, ... A batch with a row not yet done (in no
journal: the one-process journal or any shard's `<out>.shard-I-of-N.partial`; and not recorded as
failed) is transcribed whole, since a row's text depends on its batch-mates (padding, rounding), and
its new rows go to the shard's own journal. The shard that finds every planned row done writes the
table, the error report and the sidecar exactly as one process does, and removes the journals.
Locks: each shard holds its own (`infra.shards.lock_target`) for its run, a run without --shard
holds `<out>.unsharded`; the sidecar's set-up and the merge are serialised by a lock on `<out>`
itself, waited for.

This module also names the shards' files and locks, which a run without --shard checks too
(`refuse_shards`, `unsharded_lock_target`, the locks both loops hold). It imports transcribe_plan
(the options, the plan) and transcript_table (the files); transcribe.py imports it to dispatch a
run with `cfg.shard` to `transcribe_shard`.
"""

from __future__ import annotations

import glob
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ser_cache.data import audio as audio_lib
from ser_cache.data.records import Utterance
from ser_cache.data.transcripts import sidecar_path
from ser_cache.features.transcribe_plan import (
    TranscribeConfig,
    TranscribeResult,
    durations,
    fresh_record,
    load_transcriber,
    pack,
    prefetch,
    select_utterances,
)
from ser_cache.features.transcriber import WHISPER_SECONDS, WhisperTranscriber
from ser_cache.features.transcript_table import (
    FAILURE_COLUMNS,
    Journal,
    TranscribeError,
    differences,
    journal_path,
    read_report,
    read_sidecar,
    read_table,
    report_path,
    write_finished,
    write_sidecar,
)
from ser_cache.infra import locks
from ser_cache.infra.progress import ExtractProgress
from ser_cache.infra.shards import Shard, lock_target

SHARED_FILES_WAIT_S = 600.0  # how long a shard waits for another one's set-up or merge


def transcribe_shard(cfg: TranscribeConfig, transcriber: WhisperTranscriber | None = None) -> TranscribeResult:
    """Shard `cfg.shard` of the plan, then, if no planned row is left, the table (see the module docstring).

    The plan is made as a fresh one-process run makes it: the selected utterances not in the finished
    table `out`, packed into batches. This shard takes its share of those batches; a batch with a row
    no journal holds (nor a failure record) is transcribed whole, so that every row gets the text one
    process gives it, and its new rows go to this shard's journal.
    """
    shard, out = cfg.shard, Path(cfg.out)
    t0 = time.perf_counter()
    utts, have_transcript = select_utterances(cfg)
    by_id = {u.id: u for u in utts}
    with run_lock(lock_target(out, shard), f"--shard {shard.label} of {out} is already running"):
        if transcriber is None:
            transcriber = load_transcriber(cfg)
        settings = transcriber.settings(WHISPER_SECONDS)
        with shared_files_lock(out):
            if who := locks.holder(unsharded_lock_target(out)):
                raise TranscribeError(f"{out}: a transcribe without --shard is writing it ({who}); wait for it to "
                                      "finish (the shards then have nothing left to do), or choose another --out")
            record = _shard_sidecar(cfg, settings)
            state = _read_state(out, own=shard)
        seconds, header_failed = durations([u for u in utts if u.id not in state.table], WHISPER_SECONDS)
        plan = pack(seconds, cfg.batch_seconds)
        settled = state.rows.keys() | state.failed.keys()
        mine = shard.share(plan)
        todo = [b for b in mine if any(i not in settled for i in b)]
        if todo and record.get("complete"):
            with shared_files_lock(out):  # a new round (utterances added): the table is not complete any more
                record = read_sidecar(sidecar_path(out)) or record
                if record.get("complete"):
                    write_sidecar(sidecar_path(out), fresh_record(cfg, settings, record))

        journal = Journal(shard_journal_path(out, shard))
        failures = Journal(shard_failures_path(out, shard), FAILURE_COLUMNS)
        new: dict[str, str] = {}
        failed_now: dict[str, str] = {}
        audio_seconds = 0.0
        progress = ExtractProgress(enabled=cfg.progress, total=sum(len(b) for b in todo),
                                   name=f"{out.name} {shard.label}")
        try:
            with progress:
                for batch, loaded in prefetch(todo, by_id):
                    ok = [(uid, wave) for uid, (wave, reason) in zip(batch, loaded) if reason is None]
                    lost = [(uid, reason) for uid, (_, reason) in zip(batch, loaded)
                            if reason is not None and uid not in settled]
                    if lost:
                        failures.append(lost)
                        failed_now.update(lost)
                    if any(uid not in settled for uid, _ in ok):
                        texts = transcriber.transcribe([w for _, w in ok])  # whole: batch-mates change rounding
                        rows = [(uid, text) for (uid, _), text in zip(ok, texts) if uid not in settled]
                        journal.append(rows)
                        new.update(rows)
                        audio_seconds += sum(len(w) for _, w in ok) / audio_lib.SAMPLE_RATE
                    progress.advance(len(batch), sum(seconds[i] for i in batch))
        finally:
            journal.close()
            failures.close()

        with shared_files_lock(out):
            end = _finish_shards(cfg, plan, header_failed, by_id)
    share = [i for b in mine for i in b]
    return TranscribeResult(
        out=out, sidecar=sidecar_path(out), report=end.report, selected=len(utts), transcribed=len(new),
        skipped=sum(i in settled for i in share),
        failed=end.failed if end.complete else sum(i in state.failed for i in share) + len(failed_now),
        have_transcript=have_transcript, rows=end.rows, wall_seconds=time.perf_counter() - t0,
        audio_seconds=audio_seconds, settings=settings, shard=shard.label, complete=end.complete,
        pending_by_shard=end.pending_by_shard)


def unsharded_lock_target(out: Path) -> Path:
    """What a run without --shard locks for its whole run: `<out>.unsharded` (file `<out>.unsharded.lock`)."""
    return out.with_name(out.name + ".unsharded")


def shard_journal_path(out: Path, shard: Shard) -> Path:
    return out.with_name(f"{out.name}.{shard.slug}.partial")


def shard_failures_path(out: Path, shard: Shard) -> Path:
    return out.with_name(f"{out.name}.{shard.slug}.failed.partial")


def shard_files(out: Path) -> tuple[list[Path], list[Path]]:
    """The shards' journals and failure journals beside `out` (of any N)."""
    pattern = re.compile(re.escape(out.name) + r"\.shard-\d+-of-\d+\.(failed\.)?partial")
    journals, failures = [], []
    for p in sorted(out.parent.glob(glob.escape(out.name) + ".shard-*.partial")):
        if m := pattern.fullmatch(p.name):
            (failures if m.group(1) else journals).append(p)
    return journals, failures


def running_shards(out: Path) -> list[str]:
    """'shard I/N (pid … on … since …)' for each shard of `out` whose lock is held now."""
    base = locks.lock_path(out).with_suffix("")  # resolved, as FileLock resolves it
    pattern = re.compile(re.escape(base.name) + r"\.shard-(\d+)-of-(\d+)\.lock")
    found = []
    for p in sorted(base.parent.glob(glob.escape(base.name) + ".shard-*.lock")):
        if (m := pattern.fullmatch(p.name)) and (who := locks.holder(p.with_suffix(""))):
            found.append(f"shard {m[1]}/{m[2]} ({who})")
    return found


@contextmanager
def run_lock(target: Path, refusal: str) -> Iterator[None]:
    """Held for a whole run: a second copy of the same run (or shard) is refused at once."""
    lock = locks.FileLock(target)
    try:
        lock.acquire()
    except locks.Held as exc:
        raise TranscribeError(f"{refusal} ({exc.holder}; lock {lock.path}); wait for it to finish, or choose "
                              "another --out") from None
    try:
        yield
    finally:
        lock.release()


@contextmanager
def shared_files_lock(out: Path) -> Iterator[None]:
    """The lock on `<out>` itself, waited for: shards hold it only to check or create the sidecar and to merge."""
    try:
        lock = locks.acquire_waiting(out, SHARED_FILES_WAIT_S)
    except locks.Held as exc:
        raise TranscribeError(f"{out}: waited {SHARED_FILES_WAIT_S:.0f} s for {exc.path} ({exc.holder}), which "
                              "a shard holds only to set up or merge; is that process hung?") from None
    try:
        yield
    finally:
        lock.release()


def refuse_shards(out: Path, overwrite: bool) -> None:
    """A run without --shard is refused while shards run or have journals left (--overwrite removes those)."""
    if running := running_shards(out):
        raise TranscribeError(f"{out}: {', '.join(running)} of a sharded transcribe is running; a run without --shard "
                              "would write the same files: wait for the shards to finish, or choose another --out")
    journals, failures = shard_files(out)
    if journals or failures:
        if not overwrite:
            raise TranscribeError(f"{out}: a sharded transcribe has not finished ({', '.join(p.name for p in journals)}"
                                  "); run the remaining shards with the same command and --shard I/N (the last one "
                                  "writes the table), or pass --overwrite to start again")
        for p in journals + failures:
            p.unlink(missing_ok=True)


def _shard_sidecar(cfg: TranscribeConfig, settings: dict) -> dict:
    """The sidecar shards share: created by the first to arrive, checked by the others."""
    out = Path(cfg.out)
    sidecar = sidecar_path(out)
    record = read_sidecar(sidecar)
    if record is None:
        journals, failures = shard_files(out)
        if made := [p for p in (out, journal_path(out), *journals, *failures) if p.exists()]:
            raise TranscribeError(f"{made[0]} exists without its settings file {sidecar.name}, so it cannot be "
                                  "checked against this run; remove it or choose another --out")
        record = fresh_record(cfg, settings, None)
        write_sidecar(sidecar, record)
        return record
    if diff := differences(record.get("settings", {}), settings):
        raise TranscribeError(f"{out} was made with other settings ({'; '.join(diff)}): every shard needs the "
                              "same; choose another --out, or start again (--overwrite without --shard, or remove "
                              f"{out.name}, {sidecar.name} and its journals)")
    return record


@dataclass
class _Done:
    """What the shards (and an earlier run) finished: read together under the lock on `<out>`."""

    table: dict[str, str]  # the finished table
    rows: dict[str, str]  # ... and every journal's rows
    failed: dict[str, str]  # reasons recorded: the finished table's error report, then the failure journals
    files: list[Path]  # the journals read


def _read_state(out: Path, own: Shard | None = None) -> _Done:
    table = read_table(out) if out.is_file() else {}
    journals, failures = shard_files(out)
    mine = {shard_journal_path(out, own), shard_failures_path(out, own)} if own else set()
    rows = dict(table)
    for path in (journal_path(out), *journals):
        rows.update(Journal(path).read(truncate=path in mine))
    failed = read_report(report_path(out))
    for path in failures:
        failed.update(Journal(path, FAILURE_COLUMNS).read(truncate=path in mine))
    present = [p for p in (journal_path(out), *journals, *failures) if p.exists()]
    return _Done(table=table, rows=rows, failed=failed, files=present)


@dataclass
class _End:
    complete: bool
    rows: int  # in the table (complete), or done so far
    failed: int
    report: Path | None
    pending_by_shard: dict[str, int]


def _finish_shards(cfg: TranscribeConfig, plan: list[list[str]], header_failed: dict[str, str],
                   by_id: dict[str, Utterance]) -> _End:
    """Under the lock on `<out>`: if every planned row is done or failed, write what one process writes
    (table, error report, sidecar) and remove the journals; otherwise count each shard's rows left."""
    out, shard = Path(cfg.out), cfg.shard
    state = _read_state(out)
    planned = {i for b in plan for i in b}
    failed = {i: r for i, r in state.failed.items() if i in planned and i not in state.rows}
    failed.update({i: r for i, r in header_failed.items() if i not in state.rows})
    pending: dict[str, int] = {}
    for pos, batch in enumerate(plan):
        if left := sum(i not in state.rows and i not in failed for i in batch):
            label = Shard(pos % shard.count, shard.count).label
            pending[label] = pending.get(label, 0) + left
    if pending:
        return _End(False, len(state.rows), len(failed), None, dict(sorted(pending.items())))
    record = read_sidecar(sidecar_path(out))
    report = report_path(out) if report_path(out).is_file() else None
    if record.get("complete") and not state.files:  # finished before, and nothing added since
        return _End(True, len(state.table), len(failed), report, {})
    report = write_finished(out, fresh_record(cfg, record["settings"], record), state.rows, failed, by_id)
    for path in state.files:
        path.unlink(missing_ok=True)
    _remove_stale_locks(out, shard)
    return _End(True, len(state.rows), len(failed), report, {})


def _remove_stale_locks(out: Path, own: Shard) -> None:
    """Lock files left by killed runs (a shard not rerun, a run without --shard the shards took over):
    each is taken and released, which removes it safely (infra.locks); one held now is left alone."""
    base = locks.lock_path(out).with_suffix("")
    pattern = re.compile(re.escape(base.name) + r"\.shard-\d+-of-\d+\.lock")
    stale = [p for p in base.parent.glob(glob.escape(base.name) + ".shard-*.lock") if pattern.fullmatch(p.name)]
    mine = locks.lock_path(lock_target(out, own))
    for path in [locks.lock_path(unsharded_lock_target(out)), *stale]:
        if path != mine and path.exists():
            lock = locks.FileLock(path.with_suffix(""))
            try:
                lock.acquire()
            except locks.Held:
                continue
            lock.release()
