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

With `task="categorical"` it checks a Task 1 (categorical emotion) submission instead: the header
`FileName,EmoClass` (the columns of the corpus's label file), one class code per row, one of the
challenge's eight Task 1 classes A, S, H, U, F, D, C, N, written exactly so (upper case, no spaces).
O (Other) and X (no agreement) are refused: Task 1 has eight classes and its test set none of
them (the baseline drops both). Every other check (every utterance of the split once, no unknown
id, every problem listed) is the one Task 2's check makes.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ser_cache.data.corpus import load_corpus
from ser_cache.runs.prediction_file import plain_number
from ser_cache.system.tasks import CLASSES_8

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
# Task 1: FileName,EmoClass with one of the challenge's 8 codes per row.
CLASS_COLUMNS = ("FileName", "EmoClass")
CLASS_KIND_TITLES = {
    "header": "header",
    "fields": "rows without 2 fields",
    "missing": "utterances of the split without a row",
    "unknown": "ids that are not utterances of the split",
    "duplicate": "ids given more than once",
    "class": f"classes that are not one of the {len(CLASSES_8)} codes",
}
SUBMISSION_TASKS = ("attributes", "categorical")


@dataclass
class SubmissionCheck:
    file: Path
    split: str
    expected: int  # utterances in the split
    rows: int  # data rows read
    problems: list[Problem] = field(default_factory=list)
    titles: dict[str, str] = field(default_factory=lambda: dict(KIND_TITLES))  # the task's kinds, in order
    format_name: str = "the challenge format"

    @property
    def ok(self) -> bool:
        return not self.problems

    def verdict(self) -> str:
        if self.ok:
            return f"OK: {self.file} has the {self.expected:,} rows of {self.split} in {self.format_name}"
        return f"REJECTED: {len(self.problems):,} problem(s)"

    def report(self, shown: int = SHOWN_PER_KIND) -> list[str]:
        """Every problem, grouped by kind; past `shown` of a kind, a count of the rest."""
        by_kind: dict[str, list[Problem]] = defaultdict(list)
        for p in self.problems:
            by_kind[p.kind].append(p)
        lines = []
        for kind, title in self.titles.items():
            items = by_kind.get(kind, [])
            if not items:
                continue
            lines.append(f"{title} ({len(items):,}):")
            lines.extend(f"  {p}" for p in items[:shown])
            if len(items) > shown:
                lines.append(f"  … and {len(items) - shown:,} more")
        return lines


def check_submission(file: str | Path, *, data: str | Path, split: str = "Test3",
                     task: str = "attributes") -> SubmissionCheck:
    """Check `file` against the utterances of `split` in the corpus `data`; lists every problem.
    `task`: "attributes" (Task 2, FileName,EmoAct,EmoVal,EmoDom) or "categorical" (Task 1,
    FileName,EmoClass)."""
    if task not in SUBMISSION_TASKS:
        raise SubmissionError(f"--task {task}: expected attributes (Task 2) or categorical (Task 1); a submission "
                              "is for one task")
    file = Path(file)
    utts = load_corpus(data, [split])
    split_name = utts[0].split if utts else split
    return check_rows(file, [u.id for u in utts], split=split_name or split, task=task)


@dataclass(frozen=True)
class SubmissionFormat:
    """What a task's submission holds: its exact columns, the titles of its problem kinds (in the
    order they are reported), the check of one row's values (after the id), and its name."""
    columns: tuple[str, ...]
    titles: dict[str, str]
    check_values: Callable[[list[str], int, list[Problem]], None]
    name: str


def _attribute_values(values: list[str], line: int, problems: list[Problem]) -> None:
    for column, value in zip(COLUMNS[1:], values):
        x = plain_number(value)
        if x is None:
            problems.append(Problem("value", line, f"{column} is {value!r}, expected a number in plain decimal "
                                    "notation (ASCII digits, optional sign, decimal point and exponent)"))
            continue
        if not math.isfinite(x):
            problems.append(Problem("value", line, f"{column} is {value.strip()}, expected a finite number"))
        elif not LOW <= x <= HIGH:
            problems.append(Problem("range", line, f"{column} is {value.strip()}, outside [{LOW:g}, {HIGH:g}]"))


def _class_values(values: list[str], line: int, problems: list[Problem]) -> None:
    for column, value in zip(CLASS_COLUMNS[1:], values):
        if value in CLASSES_8:
            continue
        why = ""
        if value.strip() in ("O", "X"):
            why = "; O (Other) and X (no agreement) are not classes of Task 1"
        elif value.strip() in CLASSES_8:
            why = "; write the code without spaces around it"
        elif value.strip().upper() in CLASSES_8:
            why = "; the codes are upper case"
        problems.append(Problem("class", line, f"{column} is {value!r}, expected one of {', '.join(CLASSES_8)}{why}"))


FORMATS = {
    "attributes": SubmissionFormat(COLUMNS, KIND_TITLES, _attribute_values, "the challenge format"),
    "categorical": SubmissionFormat(CLASS_COLUMNS, CLASS_KIND_TITLES, _class_values,
                                    "the challenge's Task 1 format"),
}


def check_rows(file: Path, ids: list[str], *, split: str, task: str = "attributes") -> SubmissionCheck:
    """The checks themselves, against a list of expected ids, for `task`'s format (FORMATS)."""
    form = FORMATS[task]
    columns = form.columns
    if file.is_dir():
        raise SubmissionError(f"{file}: a folder, not a file; give the submission's CSV file itself")
    if not file.is_file():
        raise SubmissionError(f"{file}: no such file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SubmissionError(f"{file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    expected = set(ids)
    check = SubmissionCheck(file=file, split=split, expected=len(ids), rows=0, titles=dict(form.titles),
                            format_name=form.name)
    problems = check.problems
    if text.startswith(BOM):
        problems.append(Problem("header", 1, "the file starts with a UTF-8 byte-order mark; save it without one"))
        text = text[1:]
    reader = csv.reader(text.splitlines(keepends=True))
    header = _next_row(reader, file, 1)
    if header is None:
        problems.append(Problem("header", 1, f"the file is empty; expected the header {','.join(columns)}"))
        problems.extend(Problem("missing", None, f"{i} has no row") for i in sorted(expected))
        return check
    first_row = None
    if tuple(header) != columns:
        problems.append(Problem("header", 1, f"header is {','.join(header)!r}, expected {','.join(columns)!r}"
                                f"{_header_hint(task, header)}"))
        if header and header[0].strip() in expected:  # no header at all: the first line is a row
            first_row = header
    seen: dict[str, int] = {}

    def check_row(row: list[str], line: int) -> None:
        check.rows += 1
        if len(row) != len(columns):
            problems.append(Problem("fields", line,
                                    f"{len(row)} field(s), expected {len(columns)} ({','.join(columns)})"))
            if not row:
                return
        uid = row[0]
        if uid in seen:
            problems.append(Problem("duplicate", line, f"{uid} already on line {seen[uid]}"))
        else:
            seen[uid] = line
            if uid not in expected:
                problems.append(Problem("unknown", line, f"{uid!r} is not an utterance of {split}"))
        form.check_values(row[1:len(columns)], line, problems)

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


def _header_hint(task: str, header: list[str]) -> str:
    """Why a Task 1 header is wrong when it is a prediction file's or another task's."""
    if task != "categorical":
        return ""
    if header[:2] == list(CLASS_COLUMNS) and len(header) > 2:
        return " (probability columns are not part of the submission: predict or ensemble without --with-probabilities)"
    if tuple(header) == COLUMNS:
        return " (a Task 2 file: check it without --task categorical)"
    return ""


def _next_row(reader, file: Path, line: int) -> list[str] | None:
    """The reader's next row (None at the end); a row csv cannot read is one line naming where it starts."""
    try:
        return next(reader, None)
    except csv.Error as exc:  # e.g. its field size limit: a quote opened and never closed takes the rest
        raise SubmissionError(f"{file}, line {line}: not readable as CSV ({exc}); a quote (\") opened there and "
                              "never closed makes the rest of the file one field") from None
