"""`ser-cache check-submission`: is a file a valid Task 2 (arousal, valence, dominance) submission?

The challenge's format, as its baseline writes it: a CSV with the header
`FileName,EmoAct,EmoVal,EmoDom`, one row per utterance of the test split (FileName is the audio
file name, e.g. `MSP-PODCAST_test3_0001.wav`), each value on the 1–7 scale. A submission is
checked against the corpus's own list of the split's utterances, so a missing, extra or
repeated row is caught before upload, not after.

A value is read as a scorer reading the CSV reads it (runs.plain_number): optional sign, ASCII
digits with an optional decimal point, optional exponent, spaces around it allowed. Python's own
float() takes more (`4_5` is 45, Arabic-Indic or full-width digits are digits): such a value
would pass here and fail at the scorer, so it is refused.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ser_cache.data.corpus import load_corpus
from ser_cache.runs.prediction_file import plain_number

COLUMNS = ("FileName", "EmoAct", "EmoVal", "EmoDom")
LOW, HIGH = 1.0, 7.0
SHOWN_PER_KIND = 20  # problems listed per kind; the rest are counted
BOM = "\ufeff"


class SubmissionError(Exception):
    """The submission cannot be checked at all (no such file, not text); the message names it."""


@dataclass(frozen=True)
class Problem:
    kind: str  # header, fields, missing, unknown, duplicate, value, range
    line: int | None  # 1-based line of the file; None for an id that is missing from it
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}" if self.line is not None else self.message


KIND_TITLES = {
    "header": "header",
    "fields": "rows without 4 fields",
    "missing": "utterances of the split without a row",
    "unknown": "ids that are not utterances of the split",
    "duplicate": "ids given more than once",
    "value": "values that are not finite numbers",
    "range": f"values outside [{LOW:g}, {HIGH:g}]",
}


@dataclass
class SubmissionCheck:
    file: Path
    split: str
    expected: int  # utterances in the split
    rows: int  # data rows read
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def verdict(self) -> str:
        if self.ok:
            return f"OK: {self.file} has the {self.expected:,} rows of {self.split} in the challenge format"
        return f"REJECTED: {len(self.problems):,} problem(s)"

    def report(self, shown: int = SHOWN_PER_KIND) -> list[str]:
        """Every problem, grouped by kind; past `shown` of a kind, a count of the rest."""
        by_kind: dict[str, list[Problem]] = defaultdict(list)
        for p in self.problems:
            by_kind[p.kind].append(p)
        lines = []
        for kind in KIND_TITLES:
            items = by_kind.get(kind, [])
            if not items:
                continue
            lines.append(f"{KIND_TITLES[kind]} ({len(items):,}):")
            lines.extend(f"  {p}" for p in items[:shown])
            if len(items) > shown:
                lines.append(f"  … and {len(items) - shown:,} more")
        return lines


def check_submission(file: str | Path, *, data: str | Path, split: str = "Test3") -> SubmissionCheck:
    """Check `file` against the utterances of `split` in the corpus `data`; lists every problem."""
    file = Path(file)
    utts = load_corpus(data, [split])
    split_name = utts[0].split if utts else split
    return check_rows(file, [u.id for u in utts], split=split_name or split)


def check_rows(file: Path, ids: list[str], *, split: str) -> SubmissionCheck:
    """The checks themselves, against a list of expected ids."""
    if file.is_dir():
        raise SubmissionError(f"{file}: a folder, not a file; give the submission's CSV file itself")
    if not file.is_file():
        raise SubmissionError(f"{file}: no such file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SubmissionError(f"{file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    expected = set(ids)
    check = SubmissionCheck(file=file, split=split, expected=len(ids), rows=0)
    problems = check.problems
    if text.startswith(BOM):
        problems.append(Problem("header", 1, "the file starts with a UTF-8 byte-order mark; save it without one"))
        text = text[1:]
    reader = csv.reader(text.splitlines(keepends=True))
    header = _next_row(reader, file, 1)
    if header is None:
        problems.append(Problem("header", 1, f"the file is empty; expected the header {','.join(COLUMNS)}"))
        problems.extend(Problem("missing", None, f"{i} has no row") for i in sorted(expected))
        return check
    first_row = None
    if tuple(header) != COLUMNS:
        problems.append(Problem("header", 1, f"header is {','.join(header)!r}, expected {','.join(COLUMNS)!r}"))
        if header and header[0].strip() in expected:  # no header at all: the first line is a row
            first_row = header
    seen: dict[str, int] = {}

    def check_row(row: list[str], line: int) -> None:
        check.rows += 1
        if len(row) != len(COLUMNS):
            problems.append(Problem("fields", line,
                                    f"{len(row)} field(s), expected {len(COLUMNS)} ({','.join(COLUMNS)})"))
            if not row:
                return
        uid = row[0]
        if uid in seen:
            problems.append(Problem("duplicate", line, f"{uid} already on line {seen[uid]}"))
        else:
            seen[uid] = line
            if uid not in expected:
                problems.append(Problem("unknown", line, f"{uid!r} is not an utterance of {split}"))
        for column, value in zip(COLUMNS[1:], row[1:4]):
            x = plain_number(value)
            if x is None:
                problems.append(Problem("value", line, f"{column} is {value!r}, expected a number in plain decimal "
                                        "notation (ASCII digits, optional sign, decimal point and exponent)"))
                continue
            if not math.isfinite(x):
                problems.append(Problem("value", line, f"{column} is {value.strip()}, expected a finite number"))
            elif not LOW <= x <= HIGH:
                problems.append(Problem("range", line, f"{column} is {value.strip()}, outside [{LOW:g}, {HIGH:g}]"))

    if first_row is not None:
        check_row(first_row, 1)
    line = reader.line_num
    while True:
        line_start = line + 1
        row = _next_row(reader, file, line_start)
        if row is None:
            break
        line = reader.line_num
        if not row:  # a blank line: csv gives []
            problems.append(Problem("fields", line_start, "empty line"))
            continue
        check_row(row, line_start)
    problems.extend(Problem("missing", None, f"{i} has no row") for i in sorted(expected - set(seen)))
    return check


def _next_row(reader, file: Path, line: int) -> list[str] | None:
    """The reader's next row (None at the end); a row csv cannot read is one line naming where it starts."""
    try:
        return next(reader, None)
    except csv.Error as exc:  # e.g. its field size limit: a quote opened and never closed takes the rest
        raise SubmissionError(f"{file}, line {line}: not readable as CSV ({exc}); a quote (\") opened there and "
                              "never closed makes the rest of the file one field") from None
