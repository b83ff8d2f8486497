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
"""

from __future__ import annotations

import csv
import io
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ser_cache.data import audio as audio_lib
from ser_cache.data.corpus import load_corpus
from ser_cache.data.records import Utterance
from ser_cache.data.transcripts import sidecar_path, sidecar_problem
from ser_cache.features.report import REPORT_COLUMNS
from ser_cache.features.transcriber import WHISPER_SECONDS, WhisperTranscriber
from ser_cache.infra.atomic import atomic_path
from ser_cache.infra.progress import ExtractProgress
from ser_cache.infra.runtime import TRANSCRIBE_PRECISIONS, precision_problem
from ser_cache.version import __version__

DEFAULT_MODEL = "whisper-large-v3"
MAX_BATCH = 64  # utterances per batch at most, however short they are
COLUMNS = ("FileName", "text")
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


def read_table(path: Path) -> dict[str, str]:
    """FileName → text of a transcript table (or a journal: same columns); a file that is not this
    UTF-8 CSV is one TranscribeError naming it (and the line), never a traceback."""
    raw = Path(path).read_bytes()
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
        if tuple(header) != COLUMNS:
            raise TranscribeError(f"{path}: header is {','.join(header)!r}, expected {','.join(COLUMNS)!r}")
        table = {}
        for row in reader:
            if len(row) != 2:
                raise TranscribeError(f"{path}, line {reader.line_num}: expected 2 fields (FileName,text), "
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
    without its newline is a record cut short by the kill: it is dropped on reading.
    """

    def __init__(self, path: Path):
        self.path = path
        self._fh = None

    def read(self) -> dict[str, str]:
        """The complete records of a journal left by an earlier run; cuts off a partial last line."""
        if not self.path.is_file():
            return {}
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(len(complete))
        if not complete:
            return {}
        return read_table(self.path)

    def append(self, rows: list[tuple[str, str]]) -> None:
        if self._fh is None:
            self._fh = open(self.path, "a", newline="", encoding="utf-8")
            self._writer = csv.writer(self._fh)
            if self._fh.tell() == 0:  # size, not existence: a kill can leave an empty file
                self._writer.writerow(COLUMNS)
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
    """Transcribe the utterances `cfg` selects into `cfg.out`; resumable, see the module docstring."""
    cfg.verify()
    t0 = time.perf_counter()
    out = Path(cfg.out)
    utts, have_transcript = select_utterances(cfg)
    if transcriber is None:
        transcriber = WhisperTranscriber.load(cfg.model, beams=cfg.beams, max_new_tokens=cfg.max_new_tokens,
                                         device=cfg.device, precision=cfg.precision)
    settings = transcriber.settings(WHISPER_SECONDS)
    done, previous = done_rows(cfg, settings)
    created = (previous or {}).get("created") or datetime.now(timezone.utc).isoformat(timespec="seconds")
    record = {"model": cfg.model, "settings": settings, "created": created, "complete": False,
              "package_version": __version__}
    write_sidecar(sidecar_path(out), record)  # before the journal's first line: a journal always has its settings

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
    write_table(out, table)
    report = _write_report(report_path(out), [by_id[i] for i in sorted(failed)], failed)
    wall = time.perf_counter() - t0
    record.update(complete=True, rows=len(table), failed=len(failed),
                  finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    write_sidecar(sidecar_path(out), record)
    journal_path(out).unlink(missing_ok=True)
    return TranscribeResult(out=out, sidecar=sidecar_path(out), report=report, selected=len(utts),
                            transcribed=len(new), skipped=len(utts) - len(todo), failed=len(failed),
                            have_transcript=have_transcript, rows=len(table), wall_seconds=wall,
                            audio_seconds=audio_seconds, settings=settings)


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
