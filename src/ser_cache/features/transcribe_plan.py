"""What both ways of running `transcribe` share (transcribe.py: one process; transcribe_shards.py:
`--shard I/N`): the options and the result, the plan (which utterances, their durations, the batches),
loading the model, and the audio decoded a batch ahead.

The plan is the same for both: the selected utterances not done, sorted by duration and packed by
total seconds (`pack`); a shard takes its share of these batches. It sits below both loops, so that
transcribe.py can hand a sharded run to transcribe_shards without an import circle.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ser_cache.data import audio as audio_lib
from ser_cache.data.corpus import load_corpus
from ser_cache.data.records import Utterance
from ser_cache.features.transcriber import WHISPER_SECONDS, WhisperTranscriber
from ser_cache.features.transcript_table import TranscribeError
from ser_cache.infra.runtime import TRANSCRIBE_PRECISIONS, precision_problem
from ser_cache.infra.shards import Shard
from ser_cache.version import __version__

DEFAULT_MODEL = "whisper-large-v3"
MAX_BATCH = 64  # utterances per batch at most, however short they are


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


def load_transcriber(cfg: TranscribeConfig) -> WhisperTranscriber:
    return WhisperTranscriber.load(cfg.model, beams=cfg.beams, max_new_tokens=cfg.max_new_tokens, device=cfg.device,
                                   precision=cfg.precision)


def fresh_record(cfg: TranscribeConfig, settings: dict, previous: dict | None) -> dict:
    """The sidecar while rows are being added: complete false (its creation time kept)."""
    created = (previous or {}).get("created") or datetime.now(timezone.utc).isoformat(timespec="seconds")
    return {"model": cfg.model, "settings": settings, "created": created, "complete": False,
            "package_version": __version__}


def prefetch(batches: list[list[str]], by_id: dict[str, Utterance]) -> Iterator[tuple[list[str], list]]:
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
