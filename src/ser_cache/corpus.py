"""Corpus readers: the MSP-Podcast layout and a generic CSV manifest, both giving `Utterance` records.

Every command (extract, train-heads, evaluate, predict) reads a corpus through `load_corpus`, so
an utterance has the same id, split and labels everywhere. The id is the corpus's own key: for
MSP-Podcast the FileName (`MSP-PODCAST_0002_0033.wav`).
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

log = logging.getLogger(__name__)

EMOTION_NAMES = {
    "N": "Neutral",
    "H": "Happy",
    "S": "Sad",
    "A": "Angry",
    "D": "Disgust",
    "C": "Contempt",
    "F": "Fear",
    "U": "Surprise",
    "O": "Other",
    "X": "No agreement",
}
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
# Audio files in Audios/ that labels_consensus.csv does not list: the challenge's unlabeled test
# set when the file name says so (MSP-PODCAST_test3_0001.wav; the challenge's baseline picks them
# with `'test3' in filename`), any other unlisted file is just unlabeled audio, kept out of Test3 so
# that a stray file never becomes a row of the submission.
TEST3_SPLIT = "Test3"
TEST3_MARK = "test3"  # matched case-insensitively anywhere in the file name
UNLISTED_SPLIT = "Unlabeled"
# CSV files written by Excel on Windows start with a UTF-8 byte-order mark; utf-8-sig drops it, so
# that the first column is `FileName`, not `\ufeffFileName`.
CSV_ENCODING = "utf-8-sig"

MSP_LABEL_FILE = Path("Labels") / "labels_consensus.csv"
MSP_COLUMNS = ("FileName", "EmoClass", "EmoAct", "EmoVal", "EmoDom", "SpkrID", "Gender", "Split_Set")
MANIFEST_COLUMNS = (
    "path",
    "id",
    "split",
    "arousal",
    "valence",
    "dominance",
    "emotion",
    "gender",
    "speaker",
    "text",
)
_UNKNOWN = {"", "unknown", "none", "nan", "na", "n/a"}


class CorpusError(Exception):
    """The corpus cannot be read as asked; the message names the file, row or option."""


@dataclass(frozen=True)
class Utterance:
    """One utterance: where its audio is, which split it belongs to, and its labels (if any).

    Missing labels are None (a float label that is missing is NaN-free: None). `text` is the
    transcript given inline (manifest column); `transcript` is a file to read it from.
    """

    id: str
    path: Path
    split: str | None = None
    emotion: str | None = None
    arousal: float | None = None
    valence: float | None = None
    dominance: float | None = None
    speaker: str | None = None
    gender: str | None = None
    text: str | None = None
    transcript: Path | None = None

    @property
    def avd(self) -> tuple[float | None, float | None, float | None]:
        return (self.arousal, self.valence, self.dominance)

    @property
    def has_avd(self) -> bool:
        return all(v is not None for v in self.avd)

    def read_text(self) -> str | None:
        """The transcript: inline text, else the transcript file's content, else None."""
        if self.text is not None:
            return self.text
        if self.transcript is not None and self.transcript.is_file():
            return self.transcript.read_text(encoding="utf-8", errors="replace").strip()
        return None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        d["transcript"] = None if self.transcript is None else str(self.transcript)
        return d

    def with_text(self, text: str | None) -> Utterance:
        return replace(self, text=text)


def load_corpus(data: str | Path, splits: Sequence[str] | None = None) -> list[Utterance]:
    """Read a corpus: a directory in the MSP-Podcast layout or a CSV manifest; optionally keep splits.

    Utterances come back sorted by id, so that every run sees the same order.
    """
    data = Path(data)
    if data.is_dir():
        utts = read_msp_podcast(data)
    elif data.is_file():
        utts = read_manifest(data)
    else:
        raise CorpusError(f"--data {data}: no such directory or manifest file")
    utts.sort(key=lambda u: u.id)
    if splits:
        utts = select_splits(utts, splits, source=data)
    return utts


def select_splits(utts: Iterable[Utterance], splits: Sequence[str], *, source: Path | str = "") -> list[Utterance]:
    """Keep the utterances of the named splits (case-insensitive); an unknown split is an error."""
    utts = list(utts)
    available = sorted({u.split for u in utts if u.split is not None})
    by_lower = {s.lower(): s for s in available}
    wanted = set()
    for s in splits:
        if s.lower() not in by_lower:
            raise CorpusError(
                f"--split {s}: not a split of {source}; available splits: {', '.join(available) or 'none'}"
            )
        wanted.add(by_lower[s.lower()])
    return [u for u in utts if u.split in wanted]


def read_msp_podcast(root: Path) -> list[Utterance]:
    """Read the MSP-Podcast v1.12 layout: Audios/, Labels/labels_consensus.csv, Transcripts/."""
    root = Path(root)
    audio_dir = root / "Audios"
    label_file = root / MSP_LABEL_FILE
    transcript_dir = root / "Transcripts"
    if not audio_dir.is_dir() and not label_file.is_file():
        raise CorpusError(
            f"{root}: not an MSP-Podcast layout (expected Audios/ and {MSP_LABEL_FILE}); "
            "for other corpora pass a CSV manifest with --data (see docs/corpora.md)"
        )
    audio_files = _scan_audio(audio_dir) if audio_dir.is_dir() else {}
    utts: list[Utterance] = []
    seen: set[str] = set()
    if label_file.is_file():
        with open(label_file, newline="", encoding=CSV_ENCODING) as f:
            reader = csv.DictReader(f)
            missing = [c for c in ("FileName", "Split_Set") if c not in (reader.fieldnames or [])]
            if missing:
                raise CorpusError(f"{label_file}: missing column(s) {', '.join(missing)}; expected {', '.join(MSP_COLUMNS)}")
            for lineno, row in enumerate(reader, start=2):
                name = (row.get("FileName") or "").strip()
                if not name:
                    raise CorpusError(f"{label_file}, line {lineno}: empty FileName")
                if name in seen:
                    raise CorpusError(f"{label_file}, line {lineno}: FileName {name} is listed twice")
                seen.add(name)
                stem = Path(name).stem
                utts.append(
                    Utterance(
                        id=name,
                        path=audio_dir / name,
                        split=(row.get("Split_Set") or "").strip() or None,
                        emotion=_code(row.get("EmoClass")),
                        arousal=_float(row.get("EmoAct"), label_file, lineno, "EmoAct"),
                        valence=_float(row.get("EmoVal"), label_file, lineno, "EmoVal"),
                        dominance=_float(row.get("EmoDom"), label_file, lineno, "EmoDom"),
                        speaker=_known(row.get("SpkrID")),
                        gender=_known(row.get("Gender")),
                        transcript=transcript_dir / f"{stem}.txt",
                    )
                )
    unlisted = {TEST3_SPLIT: 0, UNLISTED_SPLIT: 0}
    for name, path in audio_files.items():
        if name not in seen:
            split = unlisted_split(name)
            unlisted[split] += 1
            utts.append(Utterance(id=name, path=path, split=split, transcript=transcript_dir / f"{Path(name).stem}.txt"))
    if any(unlisted.values()):
        log.info("%s: %d audio file(s) not in %s: %d named as Test3 (split %s), %d others (split %s)",
                 audio_dir, sum(unlisted.values()), MSP_LABEL_FILE, unlisted[TEST3_SPLIT], TEST3_SPLIT,
                 unlisted[UNLISTED_SPLIT], UNLISTED_SPLIT)
    return utts


def unlisted_split(file_name: str) -> str:
    """The split of an audio file that the labels do not list: Test3 if its name contains `test3`
    (any case), else Unlabeled."""
    return TEST3_SPLIT if TEST3_MARK in file_name.lower() else UNLISTED_SPLIT


def read_manifest(path: Path) -> list[Utterance]:
    """Read a generic CSV manifest (columns in MANIFEST_COLUMNS; only `path` is required).

    Relative audio paths are relative to the manifest's directory; `id` defaults to the file name.
    """
    path = Path(path)
    base = path.parent
    utts: list[Utterance] = []
    seen: dict[str, int] = {}
    with open(path, newline="", encoding=CSV_ENCODING) as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        if "path" not in fields:
            raise CorpusError(
                f"{path}: a manifest needs a 'path' column; found {', '.join(fields) or 'no header'}; "
                f"recognised columns: {', '.join(MANIFEST_COLUMNS)}"
            )
        for lineno, row in enumerate(reader, start=2):
            p = (row.get("path") or "").strip()
            if not p:
                raise CorpusError(f"{path}, line {lineno}: empty path")
            audio = Path(p) if os.path.isabs(p) else base / p
            uid = (row.get("id") or "").strip() or Path(p).name
            if uid in seen:
                raise CorpusError(f"{path}, line {lineno}: id {uid} already used on line {seen[uid]}")
            seen[uid] = lineno
            text = row.get("text")
            utts.append(
                Utterance(
                    id=uid,
                    path=audio,
                    split=(row.get("split") or "").strip() or None,
                    emotion=_code(row.get("emotion")),
                    arousal=_float(row.get("arousal"), path, lineno, "arousal"),
                    valence=_float(row.get("valence"), path, lineno, "valence"),
                    dominance=_float(row.get("dominance"), path, lineno, "dominance"),
                    speaker=_known(row.get("speaker")),
                    gender=_known(row.get("gender")),
                    text=text.strip() if text is not None and text.strip() else None,
                    transcript=audio.with_suffix(".txt"),
                )
            )
    return utts


def _scan_audio(audio_dir: Path) -> dict[str, Path]:
    out = {}
    with os.scandir(audio_dir) as it:
        for entry in it:
            if entry.name.lower().endswith(AUDIO_SUFFIXES) and entry.is_file():
                out[entry.name] = Path(entry.path)
    return out


def _known(value: str | None) -> str | None:
    if value is None:
        return None
    v = value.strip()
    return None if v.lower() in _UNKNOWN else v


def _code(value: str | None) -> str | None:
    v = _known(value)
    return None if v is None else v.upper() if len(v) == 1 else v


def _float(value: str | None, file: Path, lineno: int, column: str) -> float | None:
    v = _known(value)
    if v is None:
        return None
    try:
        x = float(v)
    except ValueError:
        raise CorpusError(f"{file}, line {lineno}: column {column} is {value!r}, expected a number") from None
    return None if math.isnan(x) else x
