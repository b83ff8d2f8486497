"""`ser-cache transcribe`: automatic transcripts with Whisper, for utterances that have none.

The challenge's Test3 turns come without transcripts, while a multimodal system's text branch
needs one per utterance. This runs Whisper (English, no timestamps, greedy or beam search) on
those utterances and writes a table `FileName,text` that `predict --transcripts` reads.

The loop, in order:
1. pick the utterances (by default those without a transcript; `--all`: every one), read their
   file headers (durations; unreadable files fail here), sort by duration and pack batches by
   total seconds, so that clips of similar length, and so of similar token counts, decode together;
2. decode the next batch's audio in a helper thread while the model generates for this one
   (transcriber.WhisperTranscriber);
3. after each batch, append its rows to the journal `<out>.partial` and fsync it. A run killed at
   any point loses at most the batch in flight: the next run reads the journal, skips its rows,
   and packs the rest exactly as before (greedy packing restarted at a batch boundary gives the
   same batches), so it ends with the table an uninterrupted run writes;
4. at the end write the table atomically (rows sorted by FileName), then the sidecar, then remove
   the journal.

The sidecar `<out>.json` records the model, its revision and every setting that changes the text;
a rerun with other settings is refused (or starts over with --overwrite). It is written before the
first journal line, so a journal always has its settings beside it.

Shards (`--shard I/N`, for Slurm job arrays; `_transcribe_shard`): every shard plans the whole work
as a fresh one-process run plans it (the selected utterances not in the finished table, packed) and
takes batches I, I+N, ... A batch with a row not yet done (in no journal: the one-process journal or
any shard's `<out>.shard-I-of-N.partial`; and not recorded as failed) is transcribed whole, since a
row's text depends on its batch-mates (padding, rounding), and its new rows go to the shard's own
journal. The shard that finds every planned row done writes the table, the error report and the
sidecar exactly as one process does, and removes the journals. Locks: each shard holds its own
(`infra.shards.lock_target`) for its run, a run without --shard holds `<out>.unsharded`; the
sidecar's set-up and the merge are serialised by a lock on `<out>` itself, waited for.
"""

from __future__ import annotations

import csv
import glob
import io
import os
import re
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ser_cache.data import audio as audio_lib
from ser_cache.data.corpus import load_corpus
from ser_cache.data.records import Utterance
from ser_cache.data.transcripts import sidecar_path, sidecar_problem
from ser_cache.features.report import REPORT_COLUMNS
from ser_cache.features.transcriber import WHISPER_SECONDS, WhisperTranscriber
from ser_cache.infra import locks
from ser_cache.infra.atomic import atomic_path
from ser_cache.infra.progress import ExtractProgress
from ser_cache.infra.runtime import TRANSCRIBE_PRECISIONS, precision_problem
from ser_cache.infra.shards import Shard, lock_target
from ser_cache.version import __version__

DEFAULT_MODEL = "whisper-large-v3"
MAX_BATCH = 64  # utterances per batch at most, however short they are
COLUMNS = ("FileName", "text")
FAILURE_COLUMNS = ("FileName", "reason")  # a shard's failures journal
SHARED_FILES_WAIT_S = 600.0  # how long a shard waits for another one's set-up or merge
# Settings that change the text: a table or journal made with other values is not resumed.
COMPARED = ("model_id", "revision", "language", "beams", "max_new_tokens", "max_seconds", "precision")


class TranscribeError(Exception):
    """Transcription cannot start or continue as asked; the message names the file or option."""


@dataclass(frozen=True)
class TranscribeConfig:
    """What `transcribe` does: `data` + `splits`, or bare `files`; the table goes to `out`."""

    out: Path
    model: str = DEFAULT_MODEL
    data: Path | None = None
    splits: tuple[str, ...] = ()
    files: tuple[Path, ...] = ()
    all: bool = False  # every utterance, not only those without a transcript
    beams: int = 1  # 1: greedy
    max_new_tokens: int | None = None  # default: DEFAULT_MAX_NEW_TOKENS, within the decoder's positions
    batch_seconds: float = 300.0  # audio seconds per batch (before padding to 30 s)
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    overwrite: bool = False
    progress: bool = True
    shard: Shard | None = None  # this part of the plan only (--shard I/N); the last shard to finish writes the table

    def verify(self) -> None:
        """Every problem with the options at once, in one message."""
        problems = []
        if self.data is None and not self.files:
            problems.append("give --data (with --split) or audio files")
        if self.data is not None and self.files:
            problems.append("give --data or audio files, not both")
        if self.files and self.splits:
            problems.append("--split selects utterances of --data; it does not apply to audio files")
        if self.beams < 1:
            problems.append(f"--beams {self.beams}: expected 1 (greedy) or more")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            problems.append(f"--max-new-tokens {self.max_new_tokens}: expected at least 1")
        if not self.batch_seconds > 0:
            problems.append(f"--batch-seconds {self.batch_seconds}: expected a positive number")
        if problem := precision_problem(self.precision, TRANSCRIBE_PRECISIONS):
            problems.append(problem)
        if self.shard is not None and self.overwrite:
            problems.append(f"--overwrite with --shard {self.shard.label}: each shard would start the others' work "
                            "again; start again once without --shard (or remove OUT, OUT.json and the journals), "
                            "then run the shards")
        if Path(self.out).suffix.lower() != ".csv":
            problems.append(f"--out {self.out}: expected a .csv file name")
        if problems:
            raise TranscribeError("; ".join(problems))


@dataclass
class TranscribeResult:
    out: Path
    sidecar: Path
    report: Path | None  # the errors CSV, when some utterance failed
    selected: int  # utterances this run was asked for
    transcribed: int  # ... transcribed now
    skipped: int  # ... already in the table or the journal
    failed: int  # ... that could not be read
    have_transcript: int  # utterances left out because the corpus has their transcript
    rows: int  # rows in the table
    wall_seconds: float
    audio_seconds: float  # of the clips transcribed now, as cut to 30 s
    settings: dict = field(default_factory=dict)
    shard: str | None = None  # 'I/N' of a sharded run; its counts are of its share, `failed` too until complete
    complete: bool = True  # the table holds every planned row (a shard: also the other shards')
    pending_by_shard: dict[str, int] = field(default_factory=dict)  # 'I/N' → rows left, while not complete

    @property
    def utterances_per_second(self) -> float:
        return self.transcribed / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def real_time_factor(self) -> float:
        """Processing seconds per second of audio (below 1: faster than real time)."""
        return self.wall_seconds / self.audio_seconds if self.audio_seconds > 0 else 0.0


def journal_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def report_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".csv") + ".errors.csv")


# --------------------------------------------------------------------------- utterances


def select_utterances(cfg: TranscribeConfig) -> tuple[list[Utterance], int]:
    """The utterances to transcribe and how many were left out because they have a transcript."""
    if cfg.data is not None:
        utts = load_corpus(cfg.data, cfg.splits or None)
    else:
        utts = file_utterances(cfg.files)
    if cfg.all:
        return utts, 0
    todo = [u for u in utts if not (u.read_text() or "").strip()]
    return todo, len(utts) - len(todo)


def file_utterances(files: Sequence[Path]) -> list[Utterance]:
    """Bare audio files: the id is the file name (with extension), as a corpus's utterance id is."""
    utts, seen = [], {}
    for f in files:
        path = Path(f)
        if path.name in seen:
            raise TranscribeError(f"{path} and {seen[path.name]} share the file name {path.name}, which is the "
                                  "row's FileName; rename one")
        seen[path.name] = path
        utts.append(Utterance(id=path.name, path=path))
    return sorted(utts, key=lambda u: u.id)


def durations(utts: list[Utterance], max_seconds: float) -> tuple[dict[str, float], dict[str, str]]:
    """Header-only durations (cut to max_seconds) by id, and the reason for each file that failed."""

    def one(u: Utterance):
        try:
            i = audio_lib.info(u.path)
        except audio_lib.AudioError as exc:
            return u.id, None, exc.reason
        if i.frames == 0:
            return u.id, None, "empty audio (0 samples)"
        return u.id, min(i.seconds, max_seconds), None

    ok, failed = {}, {}
    with ThreadPoolExecutor(max_workers=8) as pool:
        for uid, secs, reason in pool.map(one, utts):
            if reason is None:
                ok[uid] = secs
            else:
                failed[uid] = reason
    return ok, failed


def pack(seconds: dict[str, float], batch_seconds: float, max_batch: int = MAX_BATCH) -> list[list[str]]:
    """Sort by duration (ties by id), then fill each batch up to `batch_seconds` of audio.

    Greedy from the shortest: restarting it at a batch boundary gives the same later batches,
    which is what makes a resumed run equal an uninterrupted one.
    """
    order = sorted(seconds, key=lambda i: (seconds[i], i))
    batches, cur, total = [], [], 0.0
    for uid in order:
        if cur and (total + seconds[uid] > batch_seconds or len(cur) >= max_batch):
            batches.append(cur)
            cur, total = [], 0.0
        cur.append(uid)
        total += seconds[uid]
    if cur:
        batches.append(cur)
    return batches


# --------------------------------------------------------------------------- the table, the journal, the sidecar


def read_table(path: Path, columns: tuple[str, str] = COLUMNS, *, data: bytes | None = None) -> dict[str, str]:
    """FileName → text of a transcript table (or a journal: same columns); a file that is not this
    UTF-8 CSV is one TranscribeError naming it (and the line), never a traceback. `data`: the
    file's bytes, already read (a journal cut to its complete records)."""
    raw = Path(path).read_bytes() if data is None else data
    bom = 3 if raw.startswith(b"\xef\xbb\xbf") else 0
    try:
        text = raw[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        at = bom + exc.start
        line = raw.count(b"\n", 0, at) + 1
        raise TranscribeError(f"{path}, line {line} (byte offset {at}): byte 0x{raw[at]:02x} "
                              "is not UTF-8; transcribe writes UTF-8, so the file was changed or damaged since: pass "
                              "--overwrite to start again or choose another --out") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return {}
        if tuple(header) != columns:
            raise TranscribeError(f"{path}: header is {','.join(header)!r}, expected {','.join(columns)!r}")
        table = {}
        for row in reader:
            if len(row) != 2:
                raise TranscribeError(f"{path}, line {reader.line_num}: expected 2 fields ({','.join(columns)}), "
                                      f"found {len(row)}")
            table[row[0]] = row[1]
    except csv.Error as exc:
        raise TranscribeError(f"{path}, line {reader.line_num}: not readable as CSV ({exc}); pass --overwrite to "
                              "start again") from None
    return table


def write_table(path: Path, table: dict[str, str]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        w.writerows([uid, table[uid]] for uid in sorted(table))


class Journal:
    """Finished rows, appended and fsynced batch by batch, so that a killed run keeps them.

    Texts are one line each (whitespace collapsed), so a record is one line and a last line
    without its newline is a record cut short by the kill: it is dropped on reading. (A shard's
    failures journal is the same with the columns FileName,reason.)
    """

    def __init__(self, path: Path, columns: tuple[str, str] = COLUMNS):
        self.path = path
        self.columns = columns
        self._fh = None

    def read(self, *, truncate: bool = True) -> dict[str, str]:
        """The complete records of a journal left by an earlier run; cuts off a partial last line
        (in the file with `truncate`, which only the journal's own writer may do: another shard's
        journal may be in the middle of an append)."""
        if not self.path.is_file():
            return {}
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if truncate and len(complete) != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(len(complete))
        if not complete:
            return {}
        return read_table(self.path, self.columns, data=complete)

    def append(self, rows: list[tuple[str, str]]) -> None:
        if self._fh is None:
            self._fh = open(self.path, "a", newline="", encoding="utf-8")
            self._writer = csv.writer(self._fh)
            if self._fh.tell() == 0:  # size, not existence: a kill can leave an empty file
                self._writer.writerow(self.columns)
        self._writer.writerows(rows)
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def read_sidecar(path: Path) -> dict | None:
    """The sidecar's record (a JSON object whose "settings" is an object), None without one."""
    import json

    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TranscribeError(f"{path}: not a readable settings file ({exc}); pass --overwrite to start "
                              "again") from None
    if not isinstance(record, dict) or not isinstance(record.get("settings"), dict):
        raise TranscribeError(f"{path}: expected the settings file transcribe writes (a JSON object whose 'settings' "
                              f"is an object), found {sidecar_problem(record)}; pass --overwrite to start again")
    return record


def write_sidecar(path: Path, record: dict) -> None:
    from ser_cache.infra.atomic import write_json_atomic

    write_json_atomic(path, record)


def differences(old: dict, new: dict) -> list[str]:
    return [f"{k} {old.get(k)!r} → {new.get(k)!r}" for k in COMPARED if old.get(k) != new.get(k)]


def done_rows(cfg: TranscribeConfig, settings: dict) -> tuple[dict[str, str], dict | None]:
    """Rows an earlier run with the same settings finished (its table and its journal), and its record.

    With --overwrite they are dropped; with other settings the run is refused.
    """
    out, sidecar, journal = Path(cfg.out), sidecar_path(Path(cfg.out)), journal_path(Path(cfg.out))
    if cfg.overwrite:
        journal.unlink(missing_ok=True)
        return {}, None
    record = read_sidecar(sidecar)
    if record is None:
        if out.exists() or journal.exists():
            made = journal if journal.exists() else out
            raise TranscribeError(f"{made} exists without its settings file {sidecar.name}, so it cannot be "
                                  "checked against this run; pass --overwrite to start again or choose another --out")
        return {}, None
    diff = differences(record.get("settings", {}), settings)
    if diff:
        raise TranscribeError(f"{out} was made with other settings ({'; '.join(diff)}); pass --overwrite to "
                              "start again or choose another --out")
    table = read_table(out) if out.is_file() else {}
    table.update(Journal(journal).read())
    return table, record


# --------------------------------------------------------------------------- the loop


def transcribe(cfg: TranscribeConfig, transcriber: WhisperTranscriber | None = None) -> TranscribeResult:
    """Transcribe the utterances `cfg` selects into `cfg.out`; resumable, see the module docstring.
    With `cfg.shard`, only that shard's part of the plan (see `_transcribe_shard`)."""
    cfg.verify()
    if cfg.shard is not None:
        return _transcribe_shard(cfg, transcriber)
    t0 = time.perf_counter()
    out = Path(cfg.out)
    utts, have_transcript = select_utterances(cfg)
    with _run_lock(unsharded_lock_target(out), f"another transcribe of {out} (without --shard) is running"):
        if transcriber is None:
            transcriber = _load(cfg)
        settings = transcriber.settings(WHISPER_SECONDS)
        with _shared_files_lock(out):
            _refuse_shards(out, cfg.overwrite)
            done, previous = done_rows(cfg, settings)
            record = _fresh_record(cfg, settings, previous)
            write_sidecar(sidecar_path(out), record)  # before the journal's first line: a journal has its settings

        todo = [u for u in utts if u.id not in done]
        seconds, failed = durations(todo, WHISPER_SECONDS)
        by_id = {u.id: u for u in utts}
        batches = pack(seconds, cfg.batch_seconds)
        journal = Journal(journal_path(out))
        new: dict[str, str] = {}
        audio_seconds = 0.0
        progress = ExtractProgress(enabled=cfg.progress, total=len(seconds), name=out.name)
        try:
            with progress:
                for batch, loaded in _prefetch(batches, by_id):
                    ok = []
                    for uid, (wave, reason) in zip(batch, loaded):
                        if reason is not None:
                            failed[uid] = reason
                        else:
                            ok.append((uid, wave))
                    if ok:
                        texts = transcriber.transcribe([w for _, w in ok])
                        rows = [(uid, text) for (uid, _), text in zip(ok, texts)]
                        journal.append(rows)
                        new.update(rows)
                        audio_seconds += sum(len(w) for _, w in ok) / audio_lib.SAMPLE_RATE
                    progress.advance(len(batch), sum(seconds[i] for i in batch))
        finally:
            journal.close()

        table = {**done, **new}
        report = _write_finished(out, record, table, failed, by_id)
        journal_path(out).unlink(missing_ok=True)
    return TranscribeResult(out=out, sidecar=sidecar_path(out), report=report, selected=len(utts),
                            transcribed=len(new), skipped=len(utts) - len(todo), failed=len(failed),
                            have_transcript=have_transcript, rows=len(table),
                            wall_seconds=time.perf_counter() - t0, audio_seconds=audio_seconds, settings=settings)


def _load(cfg: TranscribeConfig) -> WhisperTranscriber:
    return WhisperTranscriber.load(cfg.model, beams=cfg.beams, max_new_tokens=cfg.max_new_tokens, device=cfg.device,
                                   precision=cfg.precision)


def _fresh_record(cfg: TranscribeConfig, settings: dict, previous: dict | None) -> dict:
    """The sidecar while rows are being added: complete false (its creation time kept)."""
    created = (previous or {}).get("created") or datetime.now(timezone.utc).isoformat(timespec="seconds")
    return {"model": cfg.model, "settings": settings, "created": created, "complete": False,
            "package_version": __version__}


def _write_finished(out: Path, record: dict, table: dict[str, str], failed: dict[str, str],
                    by_id: dict[str, Utterance]) -> Path | None:
    """The table, the error report, then the sidecar marked complete; the error report's path (or None)."""
    write_table(out, table)
    report = _write_report(report_path(out), [by_id[i] for i in sorted(failed)], failed)
    record.update(complete=True, rows=len(table), failed=len(failed),
                  finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    write_sidecar(sidecar_path(out), record)
    return report


# --------------------------------------------------------------------------- shards


def _transcribe_shard(cfg: TranscribeConfig, transcriber: WhisperTranscriber | None = None) -> TranscribeResult:
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
    with _run_lock(lock_target(out, shard), f"--shard {shard.label} of {out} is already running"):
        if transcriber is None:
            transcriber = _load(cfg)
        settings = transcriber.settings(WHISPER_SECONDS)
        with _shared_files_lock(out):
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
            with _shared_files_lock(out):  # a new round (utterances added): the table is not complete any more
                record = read_sidecar(sidecar_path(out)) or record
                if record.get("complete"):
                    write_sidecar(sidecar_path(out), _fresh_record(cfg, settings, record))

        journal = Journal(shard_journal_path(out, shard))
        failures = Journal(shard_failures_path(out, shard), FAILURE_COLUMNS)
        new: dict[str, str] = {}
        failed_now: dict[str, str] = {}
        audio_seconds = 0.0
        progress = ExtractProgress(enabled=cfg.progress, total=sum(len(b) for b in todo),
                                   name=f"{out.name} {shard.label}")
        try:
            with progress:
                for batch, loaded in _prefetch(todo, by_id):
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

        with _shared_files_lock(out):
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
def _run_lock(target: Path, refusal: str) -> Iterator[None]:
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
def _shared_files_lock(out: Path) -> Iterator[None]:
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


def _refuse_shards(out: Path, overwrite: bool) -> None:
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
        record = _fresh_record(cfg, settings, None)
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
    failed = _read_report(report_path(out))
    for path in failures:
        failed.update(Journal(path, FAILURE_COLUMNS).read(truncate=path in mine))
    present = [p for p in (journal_path(out), *journals, *failures) if p.exists()]
    return _Done(table=table, rows=rows, failed=failed, files=present)


def _read_report(path: Path) -> dict[str, str]:
    """id → reason of an error report (written with the finished table)."""
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or tuple(rows[0]) != tuple(REPORT_COLUMNS) or any(len(r) != 3 for r in rows[1:]):
        raise TranscribeError(f"{path}: expected the error report transcribe writes ({','.join(REPORT_COLUMNS)}); "
                              "remove it to try those utterances again")
    return {r[0]: r[2] for r in rows[1:]}


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
    report = _write_finished(out, _fresh_record(cfg, record["settings"], record), state.rows, failed, by_id)
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


def _prefetch(batches: list[list[str]], by_id: dict[str, Utterance]) -> Iterator[tuple[list[str], list]]:
    """Each batch with its decoded clips (or failure reasons); the next batch decodes meanwhile."""
    if not batches:
        return

    def load(batch):
        return audio_lib.load_many([str(by_id[i].path) for i in batch], max_seconds=WHISPER_SECONDS)

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load, batches[0])
        for k, batch in enumerate(batches):
            loaded = pending.result()
            if k + 1 < len(batches):
                pending = pool.submit(load, batches[k + 1])
            yield batch, loaded


def _write_report(path: Path, utts: list[Utterance], reasons: dict[str, str]) -> Path | None:
    """This run's failures as `<out>.errors.csv` (id,path,reason), like extract's; none: no file."""
    if not utts:
        path.unlink(missing_ok=True)
        return None
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(REPORT_COLUMNS)
        w.writerows([u.id, str(u.path), reasons[u.id]] for u in utts)
    return path
