"""Corpus readers: the MSP-Podcast layout and a generic CSV manifest, both giving `Utterance` records.

Every command (extract, train-heads, evaluate, predict) reads a corpus through `load_corpus`, so
an utterance has the same id, split and labels everywhere. The id is the corpus's own key: for
MSP-Podcast the FileName (`MSP-PODCAST_0002_0033.wav`).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

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
MSP_REQUIRED = ("FileName", "EmoClass", "EmoAct", "EmoVal", "EmoDom", "Split_Set")  # SpkrID, Gender may be absent

# The scale of the dimensional labels. MSP-Podcast rates arousal, valence and dominance on 1-7,
# and so does everything ser-cache writes (submissions are checked against it), so a manifest is
# held to it too unless its first line declares another (`# label_scale: 0 1`, or `none`): a
# label of 70 or 0 is far more often a typo or a wrong column than a corpus on another scale.
DEFAULT_SCALE = (1.0, 7.0)
_SCALE_LINE = re.compile(r"#\s*label_scale\s*[:=]\s*(?P<value>.*?)\s*$", re.IGNORECASE)
_SCALE_VALUE = re.compile(r"(?P<lo>[-+]?[0-9.]+(?:e[-+]?\d+)?)\s*(?:,|\.\.|to|-|\u2013|\s)\s*(?P<hi>[-+]?[0-9.]+(?:e[-+]?\d+)?)",
                          re.IGNORECASE)
OutOfScale = Literal["error", "exclude"]
# A corpus's text files may come from elsewhere (a download, a colleague's archive): a FileName or
# manifest path with a `..` part, or an absolute FileName, would read files outside the corpus's
# audio folder and turn them into rows. Both separators count, so that `..\x` is refused on any system.
_PATH_PARTS = re.compile(r"[\\/]")
_DRIVE = re.compile(r"[A-Za-z]:")
_EXCLUDED_SHOWN = 5  # excluded rows named in the log line
_SKIPPED_SHOWN = 10  # skipped file names named in the log line


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


def load_corpus(
    data: str | Path,
    splits: Sequence[str] | None = None,
    *,
    label_scale: tuple[float, float] | Literal["none"] | None = None,
    out_of_scale: OutOfScale = "error",
) -> list[Utterance]:
    """Read a corpus: a directory in the MSP-Podcast layout or a CSV manifest; optionally keep splits.

    Utterances come back sorted by id, so that every run sees the same order.

    `label_scale` is the (low, high) range every arousal/valence/dominance label must lie in, or
    "none" for no check; None means the corpus's own: 1-7 for MSP-Podcast, for a manifest the
    scale its first line declares, else 1-7. A label outside it is an error naming the file, line
    and column; with `out_of_scale="exclude"` such rows are left out instead and a warning counts
    them and names the first few.
    """
    data = Path(data)
    if out_of_scale not in ("error", "exclude"):
        raise CorpusError(f"out_of_scale={out_of_scale!r}: expected 'error' or 'exclude'")
    if data.is_dir():
        utts = read_msp_podcast(data, label_scale=label_scale, out_of_scale=out_of_scale)
    elif data.is_file():
        utts = read_manifest(data, label_scale=label_scale, out_of_scale=out_of_scale)
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


def read_msp_podcast(
    root: Path,
    *,
    label_scale: tuple[float, float] | Literal["none"] | None = None,
    out_of_scale: OutOfScale = "error",
) -> list[Utterance]:
    """Read the MSP-Podcast v1.12 layout: Audios/, Labels/labels_consensus.csv, Transcripts/.

    Labels must lie on `label_scale` (default 1-7); see `load_corpus`.
    """
    root = Path(root)
    audio_dir = root / "Audios"
    label_file = root / MSP_LABEL_FILE
    transcript_dir = root / "Transcripts"
    if not audio_dir.is_dir() and not label_file.is_file():
        raise CorpusError(
            f"{root}: not an MSP-Podcast layout (expected Audios/ and {MSP_LABEL_FILE}); "
            "for other corpora pass a CSV manifest with --data: one row per utterance, a path column "
            f"(audio file) and optionally {', '.join(c for c in MANIFEST_COLUMNS if c != 'path')}"
        )
    if not audio_dir.is_dir():
        raise CorpusError(f"{root}: no Audios/ folder; the MSP-Podcast layout keeps the audio of every "
                          f"turn that {MSP_LABEL_FILE} lists in {audio_dir}")
    audio_files = _scan_audio(audio_dir)
    if not audio_files:
        raise CorpusError(f"{audio_dir}: no audio files ({', '.join(AUDIO_SUFFIXES)}); the MSP-Podcast layout "
                          "keeps the audio of every turn there")
    scale = DEFAULT_SCALE if label_scale is None else _scale_option(label_scale)
    utts: list[Utterance] = []
    seen: set[str] = set()
    excluded: list[str] = []
    if label_file.is_file():
        text = _read_utf8(label_file)
        reader = csv.DictReader(io.StringIO(text, newline=""))
        fields = _header(reader, label_file)
        missing = [c for c in MSP_REQUIRED if c not in fields]
        if missing:
            raise CorpusError(f"{label_file}: missing column(s) {', '.join(missing)}; found {', '.join(fields) or 'no header'}; "
                              f"expected {', '.join(MSP_COLUMNS)}")
        for lineno, row in _rows(reader, label_file):
            name = (row.get("FileName") or "").strip()
            if not name:
                raise CorpusError(f"{label_file}, line {lineno}: empty FileName")
            if name in seen:
                raise CorpusError(f"{label_file}, line {lineno}: FileName {name} is listed twice")
            seen.add(name)  # an excluded row's audio must not come back as an unlisted file
            outside = _leaves_folder(name, absolute_ok=False)
            if outside:
                raise CorpusError(f"{label_file}, line {lineno}: FileName {name!r} is {outside}; a FileName names "
                                  f"a file inside {audio_dir}")
            avd = [_label(row.get(c), label_file, lineno, c, nan_is_missing=False) for c in ("EmoAct", "EmoVal", "EmoDom")]
            bad = _outside(row, ("EmoAct", "EmoVal", "EmoDom"), avd, scale)
            if bad:
                if out_of_scale == "error":
                    raise CorpusError(f"{label_file}, line {lineno}: {bad} is outside the scale {_fmt_scale(scale)}")
                excluded.append(f"line {lineno} ({name}: {bad})")
                continue
            stem = Path(name).stem
            utts.append(
                Utterance(
                    id=name,
                    path=audio_dir / name,
                    split=(row.get("Split_Set") or "").strip() or None,
                    emotion=_code(row.get("EmoClass")),
                    arousal=avd[0],
                    valence=avd[1],
                    dominance=avd[2],
                    speaker=_known(row.get("SpkrID")),
                    gender=_known(row.get("Gender")),
                    transcript=transcript_dir / f"{stem}.txt",
                )
            )
        _log_excluded(label_file, excluded, scale)
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


def read_manifest(
    path: Path,
    *,
    label_scale: tuple[float, float] | Literal["none"] | None = None,
    out_of_scale: OutOfScale = "error",
) -> list[Utterance]:
    """Read a generic CSV manifest (columns in MANIFEST_COLUMNS; only `path` is required).

    Relative audio paths are relative to the manifest's directory; `id` defaults to the file name.
    The file must be UTF-8. Its first line may declare the label scale (`# label_scale: 1 5`, or
    `# label_scale: none`); without it labels are checked against 1-7. An explicit `label_scale`
    wins over the declaration; see `load_corpus`.
    """
    path = Path(path)
    base = path.parent
    utts: list[Utterance] = []
    seen: dict[str, int] = {}
    excluded: list[str] = []
    text = _read_utf8(path)
    first, _, rest = text.partition("\n")
    declared = _SCALE_LINE.fullmatch(first.strip().rstrip(",").strip().strip('"'))  # Excel may quote it or pad it with commas
    first_row = 2
    if declared:
        text, first_row = rest, 3
    if label_scale is not None:
        scale = _scale_option(label_scale)
    elif declared:
        scale = _parse_scale(declared["value"], f"{path}, line 1")
    else:
        scale = DEFAULT_SCALE
    reader = csv.DictReader(io.StringIO(text, newline=""))
    fields = _header(reader, path, first_row - 1)
    if "path" not in fields:
        raise CorpusError(
            f"{path}: a manifest needs a 'path' column; found {', '.join(fields) or 'no header'}; "
            f"recognised columns: {', '.join(MANIFEST_COLUMNS)}"
        )
    for lineno, row in _rows(reader, path, first_row):
        p = (row.get("path") or "").strip()
        if not p:
            raise CorpusError(f"{path}, line {lineno}: empty path")
        outside = _leaves_folder(p, absolute_ok=True)
        if outside:
            raise CorpusError(f"{path}, line {lineno}: path {p!r} is {outside}; a relative path must stay inside "
                              f"the manifest's folder {base}: write the absolute path of audio kept elsewhere")
        audio = Path(p) if os.path.isabs(p) else base / p
        uid = (row.get("id") or "").strip() or Path(p).name
        if uid in seen:
            raise CorpusError(f"{path}, line {lineno}: id {uid} already used on line {seen[uid]}")
        seen[uid] = lineno
        avd = [_label(row.get(c), path, lineno, c, nan_is_missing=True) for c in ("arousal", "valence", "dominance")]
        bad = _outside(row, ("arousal", "valence", "dominance"), avd, scale)
        if bad:
            if out_of_scale == "error":
                raise CorpusError(f"{path}, line {lineno}: {bad} is outside the scale {_fmt_scale(scale)}; "
                                  "a manifest on another scale declares it on its first line: # label_scale: LOW HIGH")
            excluded.append(f"line {lineno} ({uid}: {bad})")
            continue
        text_cell = row.get("text")
        utts.append(
            Utterance(
                id=uid,
                path=audio,
                split=(row.get("split") or "").strip() or None,
                emotion=_code(row.get("emotion")),
                arousal=avd[0],
                valence=avd[1],
                dominance=avd[2],
                speaker=_known(row.get("speaker")),
                gender=_known(row.get("gender")),
                text=text_cell.strip() if text_cell is not None and text_cell.strip() else None,
                transcript=audio.with_suffix(".txt"),
            )
        )
    _log_excluded(path, excluded, scale)
    return utts


def _leaves_folder(name: str, *, absolute_ok: bool) -> str | None:
    """Why the path `name`, read in a corpus's folder, could name a file outside it; None if it cannot.

    The check is on the text alone: a symlink inside the folder is followed, since links are made
    on the machine that holds the corpus (docs/corpora.md, "Paths outside the corpus").
    """
    if not absolute_ok and (os.path.isabs(name) or name.startswith(("/", "\\")) or _DRIVE.match(name)):
        return "an absolute path"
    if ".." in _PATH_PARTS.split(name):
        return "a path with a '..' part (it would leave the folder)"
    return None


def _scan_audio(audio_dir: Path) -> dict[str, Path]:
    """The audio files of `audio_dir` by name. A name that is not valid UTF-8 (Python hands it over
    with surrogate escapes) is skipped with a warning: such an id could be written nowhere (stores,
    CSV files), and one badly named file should not stop a 100k-file corpus."""
    out = {}
    skipped: list[str] = []
    with os.scandir(audio_dir) as it:
        for entry in it:
            if not (entry.name.lower().endswith(AUDIO_SUFFIXES) and entry.is_file()):
                continue
            if not _is_utf8(entry.name):
                skipped.append(repr(os.fsencode(entry.name)))
                continue
            out[entry.name] = Path(entry.path)
    if skipped:
        skipped.sort()
        more = f" and {len(skipped) - _SKIPPED_SHOWN} more" if len(skipped) > _SKIPPED_SHOWN else ""
        log.warning("%s: skipped %d audio file(s) whose names are not valid UTF-8; rename them to use them: %s%s",
                    audio_dir, len(skipped), ", ".join(skipped[:_SKIPPED_SHOWN]), more)
    return out


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _read_utf8(path: Path) -> str:
    """The text of a CSV file that must be UTF-8 (a byte-order mark is dropped); anything else is
    one CorpusError naming the line and byte offset of the first bad byte."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CorpusError(f"{path}: cannot read ({exc.strerror or exc})") from None
    bom = 3 if raw.startswith(b"\xef\xbb\xbf") else 0
    try:
        return raw[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        at = bom + exc.start
        line = raw.count(b"\n", 0, at) + 1
        raise CorpusError(f"{path}, line {line} (byte offset {at}): byte 0x{raw[at]:02x} is not UTF-8; the file "
                          "must be UTF-8 (re-save it as UTF-8, e.g. iconv -f latin1 -t utf-8)") from None


def _header(reader: csv.DictReader, file: Path, lineno: int = 1) -> list[str]:
    """The header's column names, stripped of surrounding spaces (`EmoAct ` is `EmoAct`)."""
    try:
        fields = reader.fieldnames or []
    except csv.Error as exc:
        raise CorpusError(f"{file}, line {lineno}: not a readable CSV header ({exc})") from None
    reader.fieldnames = [f.strip() for f in fields]
    return reader.fieldnames


def _rows(reader: csv.DictReader, file: Path, first: int = 2):
    """(line number, row) pairs; a row the csv module cannot parse (an unclosed quote that runs
    past the field size limit) is a CorpusError naming the line."""
    offset = first - 2  # reader.line_num counts the lines the reader itself has seen
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise CorpusError(f"{file}, line {reader.line_num + offset}: not readable as CSV ({exc})") from None
        # line_num is the row's last line; a quoted field (a transcript) may span several.
        spanned = sum(v.count("\n") for v in row.values() if isinstance(v, str))
        yield reader.line_num - spanned + offset, row


def _scale_option(value: tuple[float, float] | str) -> tuple[float, float] | None:
    if isinstance(value, str):
        return _parse_scale(value, "label_scale")
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise CorpusError(f"label_scale={value!r}: expected (low, high) or 'none'") from None
    if not lo < hi:
        raise CorpusError(f"label_scale={value!r}: expected low < high")
    return lo, hi


def _parse_scale(text: str, where: str) -> tuple[float, float] | None:
    """`1 7`, `1,7`, `1-7`, `1..7`, `1 to 7` -> (1.0, 7.0); `none` -> None (no check)."""
    if text.strip().lower() == "none":
        return None
    m = _SCALE_VALUE.fullmatch(text.strip())
    try:
        lo, hi = (float(m["lo"]), float(m["hi"])) if m else (math.nan, math.nan)
    except ValueError:
        lo = hi = math.nan
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise CorpusError(f"{where}: label_scale {text!r}: expected two numbers LOW HIGH with LOW < HIGH "
                          "(e.g. '# label_scale: 1 5'), or 'none'")
    return lo, hi


def _outside(row: dict, columns: Sequence[str], values: Sequence[float | None],
             scale: tuple[float, float] | None) -> str | None:
    """`EmoAct 70` for the first label outside `scale`, else None."""
    if scale is None:
        return None
    lo, hi = scale
    for column, x in zip(columns, values):
        if x is not None and not lo <= x <= hi:
            return f"{column} {(row.get(column) or '').strip()}"
    return None


def _fmt_scale(scale: tuple[float, float] | None) -> str:
    return "none" if scale is None else "\u2013".join(f"{v:g}" for v in scale)


def _log_excluded(file: Path, excluded: list[str], scale: tuple[float, float] | None) -> None:
    if excluded:
        more = f"; and {len(excluded) - _EXCLUDED_SHOWN} more" if len(excluded) > _EXCLUDED_SHOWN else ""
        log.warning("%s: excluded %d row(s) with labels outside the scale %s: %s%s", file, len(excluded),
                    _fmt_scale(scale), "; ".join(excluded[:_EXCLUDED_SHOWN]), more)


def _known(value: str | None) -> str | None:
    if value is None:
        return None
    v = value.strip()
    return None if v.lower() in _UNKNOWN else v


def _code(value: str | None) -> str | None:
    v = _known(value)
    return None if v is None else v.upper() if len(v) == 1 else v


def _label(value: str | None, file: Path, lineno: int, column: str, *, nan_is_missing: bool) -> float | None:
    """A numeric label, or None when the cell says it is missing (empty, `Unknown`, and in a manifest
    `NaN`, as pandas writes a missing value). Text, infinity, and a NaN where it cannot mean
    "missing" are errors naming the file, line and column."""
    if value is not None and not nan_is_missing and value.strip().lower() == "nan":
        raise CorpusError(f"{file}, line {lineno}: column {column} is {value!r}, expected a number "
                          "(leave the cell empty for a missing label)")
    v = _known(value)
    if v is None:
        return None
    try:
        x = float(v)
    except ValueError:
        raise CorpusError(f"{file}, line {lineno}: column {column} is {value!r}, expected a number") from None
    if math.isnan(x) and nan_is_missing:
        return None
    if not math.isfinite(x):
        raise CorpusError(f"{file}, line {lineno}: column {column} is {value!r}, expected a finite number")
    return x
