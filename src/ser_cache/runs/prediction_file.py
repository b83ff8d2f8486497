"""Prediction files: the challenge's CSV formats written and read with every value checked, and the
range a run's predictions must lie in. Task 2: FileName,EmoAct,EmoVal,EmoDom (optional gender
columns); Task 1: FileName,EmoClass (optional prob_<code> columns, one per class of the run).
Every command that writes or reads predictions (train-heads' predictions_dev.csv, predict, evaluate,
ensemble, check-submission, the sweep summary) goes through it."""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ser_cache.infra.atomic import write_csv_atomic
from ser_cache.system.tasks import CLASSES_8, class_codes

# The challenge's submission columns, in order: arousal, valence, dominance.
ID_COLUMN = "FileName"
AVD_COLUMNS = ("EmoAct", "EmoVal", "EmoDom")
GENDER_COLUMN = "Gender"
GENDER_PROB_PREFIX = "GenderProb_"


def prediction_header(gender_labels: Sequence[str] | None) -> list[str]:
    header = [ID_COLUMN, *AVD_COLUMNS]
    if gender_labels:
        header += [GENDER_COLUMN, *(f"{GENDER_PROB_PREFIX}{g}" for g in gender_labels)]
    return header


def write_predictions(path: str | Path, ids: Sequence[str], avd: np.ndarray, *,
                      gender_labels: Sequence[str] | None = None, gender_probs: np.ndarray | None = None) -> Path:
    """The challenge format FileName,EmoAct,EmoVal,EmoDom; with gender labels and probabilities given,
    Gender and GenderProb_<label> columns after them (not part of the challenge's format)."""
    avd = np.asarray(avd, dtype=np.float64)
    if avd.shape != (len(ids), 3):
        raise ValueError(f"avd must be ({len(ids)}, 3), got {avd.shape}")
    with_gender = bool(gender_labels) and gender_probs is not None

    def rows():
        for i, uid in enumerate(ids):
            row = [uid, *(f"{x:.6f}" for x in avd[i])]
            if with_gender:
                p = gender_probs[i]
                row += [gender_labels[int(np.argmax(p))], *(f"{x:.6f}" for x in p)]
            yield row

    return write_csv_atomic(path, prediction_header(gender_labels if with_gender else None), rows())


def read_gender_probabilities(path: str | Path) -> tuple[list[str], list[str], np.ndarray] | None:
    """(ids, gender labels, (N, G) probabilities) of a prediction file written `--with-gender`; None
    when it has no GenderProb_* columns. Raises ValueError if they are malformed."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c for c in (reader.fieldnames or []) if c.startswith(GENDER_PROB_PREFIX)]
        if not columns:
            return None
        labels = [c.removeprefix(GENDER_PROB_PREFIX) for c in columns]
        ids, probs = [], []
        for lineno, row in enumerate(reader, start=2):
            try:
                p = [float(row[c]) for c in columns]
            except (TypeError, ValueError):
                raise ValueError(f"{path}, line {lineno}: {', '.join(columns)} must be numbers") from None
            ids.append((row[ID_COLUMN] or "").strip())
            probs.append(p)
    return ids, labels, np.asarray(probs, dtype=np.float64).reshape(-1, len(columns))


# Slack for a prediction at the edge of its range: the heads compute lo/hi in float32 (1e-6 at 7).
RANGE_SLACK = 1e-5


def bad_value(avd: np.ndarray, lo, hi) -> tuple[int, int, float, str] | None:
    """The first (row, column, value, why) of the (N, 3) `avd` that is not finite or lies outside
    [lo, hi] (numbers, or one per column); None when every value is fine. Each prediction a command
    writes or reads goes through it: a NaN or a 99 must never be written or averaged silently."""
    avd = np.asarray(avd, dtype=np.float64).reshape(-1, 3)
    lo = np.broadcast_to(np.asarray(lo, dtype=np.float64), (3,))
    hi = np.broadcast_to(np.asarray(hi, dtype=np.float64), (3,))
    finite = np.isfinite(avd)
    inside = (avd >= lo - RANGE_SLACK) & (avd <= hi + RANGE_SLACK)
    wrong = np.argwhere(~(finite & inside))
    if not wrong.size:
        return None
    i, j = (int(x) for x in wrong[0])
    if not finite[i, j]:
        return i, j, float(avd[i, j]), "not a finite number"
    return i, j, float(avd[i, j]), f"outside the label range [{lo[j]:g}, {hi[j]:g}]"


def label_range(config: dict) -> tuple[list[float], list[float]]:
    """A run's label range (config.json "labels": its training labels' min and max), else the 1-7 scale."""
    labels = config.get("labels") if isinstance(config.get("labels"), dict) else {}
    try:
        lo, hi = [float(x) for x in labels["min"]], [float(x) for x in labels["max"]]
        if len(lo) == len(hi) == 3:
            return lo, hi
    except (KeyError, TypeError, ValueError):
        pass
    return [1.0] * 3, [7.0] * 3


def existing_file(path: str | Path) -> Path:
    """`path` as a Path, or a ValueError saying it is a folder or is missing: a prediction file to read."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: a folder, not a prediction file (a CSV written by `ser-cache predict`)")
    if not path.is_file():
        raise ValueError(f"{path}: no such prediction file")
    return path


def read_predictions(path: str | Path, scale: tuple[float, float] | None = None) -> tuple[list[str], np.ndarray]:
    """(ids, (N, 3) arousal/valence/dominance) from a challenge-format CSV; raises ValueError if malformed.

    Every value must be a number in plain decimal notation (`plain_number`), finite, and with
    `scale` (low, high) within it. A byte-order mark (a file saved by Excel) is read past."""
    path = existing_file(path)
    ids: list[str] = []
    values: list[list[float]] = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        try:
            missing = [c for c in (ID_COLUMN, *AVD_COLUMNS) if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; expected "
                                 f"{','.join((ID_COLUMN, *AVD_COLUMNS))}")
            seen: set[str] = set()
            for lineno, row in enumerate(reader, start=2):
                uid = (row[ID_COLUMN] or "").strip()
                if not uid:
                    raise ValueError(f"{path}, line {lineno}: empty {ID_COLUMN}")
                if uid in seen:
                    raise ValueError(f"{path}, line {lineno}: {uid} is listed twice")
                seen.add(uid)
                ids.append(uid)
                values.append(_prediction_row(path, lineno, uid, row, scale))
        except csv.Error as exc:
            raise ValueError(f"{path}, line {reader.line_num}: not readable as CSV ({exc}); a quote (\") opened "
                             "there and never closed makes the rest of the file one field") from None
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return ids, np.asarray(values, dtype=np.float64).reshape(-1, 3)


def _prediction_row(path: Path, lineno: int, uid: str, row: dict, scale) -> list[float]:
    vals = []
    for column in AVD_COLUMNS:
        text = row.get(column)
        value = plain_number(text)
        if value is None:
            raise ValueError(f"{path}, line {lineno} ({uid}): {column} is {text!r}, expected a number in plain "
                             "decimal notation")
        vals.append(value)
    bad = bad_value(vals, *(scale or (-math.inf, math.inf)))
    if bad is not None:
        _, j, _, why = bad
        raise ValueError(f"{path}, line {lineno} ({uid}): {AVD_COLUMNS[j]} is {row[AVD_COLUMNS[j]].strip()}, {why}")
    return vals


# A number as a CSV reader that converts columns (pandas, R, a spreadsheet) reads one: optional
# sign, ASCII digits with an optional decimal point, optional exponent; spaces around it. Python's
# float() takes more ("4_5" is 45, Arabic-Indic digits are digits), which no scorer reading the
# CSV does; nan and inf are read (as pandas reads them) and refused for not being finite.
PLAIN_NUMBER = re.compile(r"[ \t]*[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?[ \t]*"
                          r"|[ \t]*[+-]?(?:nan|inf|infinity)[ \t]*", re.IGNORECASE | re.ASCII)


def plain_number(text: str | None) -> float | None:
    """`text` as a float when it is a number in plain decimal notation (PLAIN_NUMBER), else None."""
    if text is None or not PLAIN_NUMBER.fullmatch(text):
        return None
    return float(text)


# Task 1 (categorical emotion): FileName,EmoClass, the columns of the corpus's label file and of the
# challenge's Test3 submission; with probabilities, one prob_<code> column per class of the run, in
# the run's class order (class_codes(8) or class_codes(9)). Each row's probabilities lie in [0, 1]
# and sum to 1 within PROBABILITY_TOLERANCE.
CLASS_COLUMN = "EmoClass"
CLASS_PROB_PREFIX = "prob_"
PROBABILITY_TOLERANCE = 1e-4
CLASS_ORDERS = (class_codes(8), class_codes(9))  # the class orders a run has


def class_prediction_header(classes: Sequence[str] | None = None) -> list[str]:
    """FileName,EmoClass, and prob_<code> per class when `classes` are given."""
    return [ID_COLUMN, CLASS_COLUMN, *(f"{CLASS_PROB_PREFIX}{c}" for c in classes or ())]


def bad_probabilities(probabilities: np.ndarray) -> tuple[int, str] | None:
    """The first (row, why) of (N, C) `probabilities` that is not a distribution: a value not finite
    or outside [0, 1], or a row whose sum is not 1 within PROBABILITY_TOLERANCE; None when all are."""
    p = np.asarray(probabilities, dtype=np.float64)
    for i, row in enumerate(p):
        if not np.isfinite(row).all():
            return i, "a probability is not a finite number"
        if (row < 0).any() or (row > 1).any():
            return i, f"a probability lies outside [0, 1] ({', '.join(f'{x:g}' for x in row)})"
        if abs(float(row.sum()) - 1.0) > PROBABILITY_TOLERANCE:
            return i, f"the probabilities sum to {float(row.sum()):.6g}, not 1 (within {PROBABILITY_TOLERANCE:g})"
    return None


def write_class_predictions(path: str | Path, ids: Sequence[str], codes: Sequence[str],
                           probabilities: np.ndarray | None = None,
                           classes: Sequence[str] = CLASSES_8) -> Path:
    """Task 1's format FileName,EmoClass (one code of `classes` per row), written atomically; with
    `probabilities` ((N, len(classes)), each row a distribution over `classes`) a prob_<code>
    column per class after them. Every value is checked before anything is written."""
    classes = tuple(classes)
    if classes not in CLASS_ORDERS:
        raise ValueError(f"classes {','.join(classes)}: expected a run's class order, "
                         f"{' or '.join(','.join(c) for c in CLASS_ORDERS)}")
    if len(codes) != len(ids):
        raise ValueError(f"{len(codes)} class code(s) for {len(ids)} id(s)")
    seen: set[str] = set()
    for uid in ids:
        if uid in seen:
            raise ValueError(f"{path}: {uid} is listed twice; one row per utterance")
        seen.add(uid)
    for i, code in enumerate(codes):
        if code not in classes:
            raise ValueError(f"{path}: the class of {ids[i]} (row {i + 1}) is {code!r}, expected one of "
                             f"{', '.join(classes)}")
    if probabilities is not None:
        probabilities = np.asarray(probabilities, dtype=np.float64)
        if probabilities.shape != (len(ids), len(classes)):
            raise ValueError(f"probabilities must be ({len(ids)}, {len(classes)}), got {probabilities.shape}")
        bad = bad_probabilities(probabilities)
        if bad is not None:
            i, why = bad
            raise ValueError(f"{path}: row {i + 1} ({ids[i]}): {why}; nothing written")

    def rows():
        for i, uid in enumerate(ids):
            row = [uid, codes[i]]
            if probabilities is not None:
                row += [f"{x:.6f}" for x in probabilities[i]]
            yield row

    header = class_prediction_header(classes if probabilities is not None else None)
    return write_csv_atomic(path, header, rows())


def read_class_predictions(path: str | Path, classes: Sequence[str] | None = None
                           ) -> tuple[list[str], list[str], np.ndarray | None, tuple[str, ...]]:
    """(ids, codes, (N, C) probabilities or None, classes) of a Task 1 prediction file; raises
    ValueError naming the file and line of the first problem.

    The header is exactly FileName,EmoClass, optionally followed by prob_<code> for each class of a
    run's class order (the 8 codes, or the 8 and O). The classes are those of the prob_ columns; a
    file without them has `classes` (default the challenge's 8: a 9-class file without
    probabilities is read with class_codes(9)). Each code must be one of the classes, each id given
    once, each row's probabilities in [0, 1] and summing to 1 within PROBABILITY_TOLERANCE."""
    path = existing_file(path)
    ids: list[str] = []
    codes: list[str] = []
    probs: list[list[float]] = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, [])
            found = _class_columns(path, header)
            if found is not None and classes is not None and tuple(classes) != found:
                raise ValueError(f"{path}: its probability columns are for the classes {','.join(found)}, expected "
                                 f"{','.join(classes)}")
            known = found or tuple(classes or CLASSES_8)
            width = len(header)
            seen: dict[str, int] = {}
            for row in reader:
                lineno = reader.line_num
                if len(row) != width:
                    raise ValueError(f"{path}, line {lineno}: {len(row)} field(s), expected {width} "
                                     f"({','.join(header)})")
                uid, code = row[0].strip(), row[1].strip()
                if not uid:
                    raise ValueError(f"{path}, line {lineno}: empty {ID_COLUMN}")
                if uid in seen:
                    raise ValueError(f"{path}, line {lineno}: {uid} is listed twice (first on line {seen[uid]})")
                seen[uid] = lineno
                if code not in known:
                    raise ValueError(f"{path}, line {lineno} ({uid}): {CLASS_COLUMN} is {row[1]!r}, expected one of "
                                     f"{', '.join(known)}")
                if found is not None:
                    probs.append(_probability_row(path, lineno, uid, row[2:], found))
                ids.append(uid)
                codes.append(code)
        except csv.Error as exc:
            raise ValueError(f"{path}, line {reader.line_num}: not readable as CSV ({exc}); a quote (\") opened "
                             "there and never closed makes the rest of the file one field") from None
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if found is None:
        return ids, codes, None, known
    return ids, codes, np.asarray(probs, dtype=np.float64).reshape(-1, len(found)), found


def _class_columns(path: Path, header: list[str]) -> tuple[str, ...] | None:
    """The classes of a Task 1 header's prob_ columns (None without them); ValueError if it is not one."""
    expected = (f"{','.join((ID_COLUMN, CLASS_COLUMN))}, optionally followed by "
                f"{','.join(f'{CLASS_PROB_PREFIX}{c}' for c in CLASSES_8)}[,{CLASS_PROB_PREFIX}O]")
    if header[:2] != [ID_COLUMN, CLASS_COLUMN]:
        raise ValueError(f"{path}, line 1: header is {','.join(header)!r}, expected {expected}")
    rest = header[2:]
    if not rest:
        return None
    found = tuple(c.removeprefix(CLASS_PROB_PREFIX) for c in rest)
    if not all(c.startswith(CLASS_PROB_PREFIX) for c in rest) or found not in CLASS_ORDERS:
        raise ValueError(f"{path}, line 1: header is {','.join(header)!r}, expected {expected} (one probability "
                         "column per class, in the run's class order)")
    return found


def _probability_row(path: Path, lineno: int, uid: str, fields: list[str], classes: tuple[str, ...]) -> list[float]:
    values = []
    for code, text in zip(classes, fields):
        value = plain_number(text)
        if value is None:
            raise ValueError(f"{path}, line {lineno} ({uid}): {CLASS_PROB_PREFIX}{code} is {text!r}, expected a number "
                             "in plain decimal notation")
        values.append(value)
    bad = bad_probabilities(np.asarray([values]))
    if bad is not None:
        raise ValueError(f"{path}, line {lineno} ({uid}): {bad[1]}")
    return values
