"""What both corpus readers share: the `Utterance` record, `CorpusError`, and the checks of a corpus's text
files: UTF-8, the CSV header and rows, label cells and their scale, paths that would leave the corpus's folder."""

from __future__ import annotations

import csv
import logging
import math
import os
import re
from collections.abc import Sequence
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
# CSV files written by Excel on Windows start with a UTF-8 byte-order mark; utf-8-sig drops it, so
# that the first column is `FileName`, not `\ufeffFileName`.
CSV_ENCODING = "utf-8-sig"
_UNKNOWN = {"", "unknown", "none", "nan", "na", "n/a"}

# The scale of the dimensional labels. MSP-Podcast rates arousal, valence and dominance on 1-7,
# and so does everything ser-cache writes (submissions are checked against it), so a manifest is
# held to it too unless its first line declares another (`# label_scale: 0 1`, or `none`): a
# label of 70 or 0 is far more often a typo or a wrong column than a corpus on another scale.
DEFAULT_SCALE = (1.0, 7.0)
_SCALE_VALUE = re.compile(r"(?P<lo>[-+]?[0-9.]+(?:e[-+]?\d+)?)\s*(?:,|\.\.|to|-|\u2013|\s)\s*"
                          r"(?P<hi>[-+]?[0-9.]+(?:e[-+]?\d+)?)",
                          re.IGNORECASE)
OutOfScale = Literal["error", "exclude"]
# A corpus's text files may come from elsewhere (a download, a colleague's archive): a FileName or
# manifest path with a `..` part, or an absolute FileName, would read files outside the corpus's
# audio folder and turn them into rows. Both separators count, so that `..\x` is refused on any system.
_PATH_PARTS = re.compile(r"[\\/]")
_DRIVE = re.compile(r"[A-Za-z]:")
_EXCLUDED_SHOWN = 5  # excluded rows named in the log line


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


def leaves_folder(name: str, *, absolute_ok: bool) -> str | None:
    """Why the path `name`, read in a corpus's folder, could name a file outside it; None if it cannot.

    The check is on the text alone: a symlink inside the folder is followed, since links are made
    on the machine that holds the corpus (docs/corpora.md, "Paths outside the corpus").
    """
    if not absolute_ok and (os.path.isabs(name) or name.startswith(("/", "\\")) or _DRIVE.match(name)):
        return "an absolute path"
    if ".." in _PATH_PARTS.split(name):
        return "a path with a '..' part (it would leave the folder)"
    return None


def read_utf8(path: Path) -> str:
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


def csv_header(reader: csv.DictReader, file: Path, lineno: int = 1) -> list[str]:
    """The header's column names, stripped of surrounding spaces (`EmoAct ` is `EmoAct`)."""
    try:
        fields = reader.fieldnames or []
    except csv.Error as exc:
        raise CorpusError(f"{file}, line {lineno}: not a readable CSV header ({exc})") from None
    reader.fieldnames = [f.strip() for f in fields]
    return reader.fieldnames


def csv_rows(reader: csv.DictReader, file: Path, first: int = 2):
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


def scale_argument(value: tuple[float, float] | str) -> tuple[float, float] | None:
    if isinstance(value, str):
        return parse_scale(value, "label_scale")
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise CorpusError(f"label_scale={value!r}: expected (low, high) or 'none'") from None
    if not lo < hi:
        raise CorpusError(f"label_scale={value!r}: expected low < high")
    return lo, hi


def parse_scale(text: str, where: str) -> tuple[float, float] | None:
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


def outside_scale(row: dict, columns: Sequence[str], values: Sequence[float | None],
             scale: tuple[float, float] | None) -> str | None:
    """`EmoAct 70` for the first label outside `scale`, else None."""
    if scale is None:
        return None
    lo, hi = scale
    for column, x in zip(columns, values):
        if x is not None and not lo <= x <= hi:
            return f"{column} {(row.get(column) or '').strip()}"
    return None


def format_scale(scale: tuple[float, float] | None) -> str:
    return "none" if scale is None else "\u2013".join(f"{v:g}" for v in scale)


def log_excluded(file: Path, excluded: list[str], scale: tuple[float, float] | None) -> None:
    if excluded:
        more = f"; and {len(excluded) - _EXCLUDED_SHOWN} more" if len(excluded) > _EXCLUDED_SHOWN else ""
        log.warning("%s: excluded %d row(s) with labels outside the scale %s: %s%s", file, len(excluded),
                    format_scale(scale), "; ".join(excluded[:_EXCLUDED_SHOWN]), more)


def known_value(value: str | None) -> str | None:
    if value is None:
        return None
    v = value.strip()
    return None if v.lower() in _UNKNOWN else v


def emotion_code(value: str | None) -> str | None:
    v = known_value(value)
    return None if v is None else v.upper() if len(v) == 1 else v


def label_value(value: str | None, file: Path, lineno: int, column: str, *, nan_is_missing: bool) -> float | None:
    """A numeric label, or None when the cell says it is missing (empty, `Unknown`, and in a manifest
    `NaN`, as pandas writes a missing value). Text, infinity, and a NaN where it cannot mean
    "missing" are errors naming the file, line and column."""
    if value is not None and not nan_is_missing and value.strip().lower() == "nan":
        raise CorpusError(f"{file}, line {lineno}: column {column} is {value!r}, expected a number "
                          "(leave the cell empty for a missing label)")
    v = known_value(value)
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
