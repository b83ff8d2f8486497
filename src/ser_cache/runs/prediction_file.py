"""Prediction files: the challenge's CSV format (FileName,EmoAct,EmoVal,EmoDom, optional gender
columns) written and read with every value checked, and the range a run's predictions must lie in.
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


def read_predictions(path: str | Path, scale: tuple[float, float] | None = None) -> tuple[list[str], np.ndarray]:
    """(ids, (N, 3) arousal/valence/dominance) from a challenge-format CSV; raises ValueError if malformed.

    Every value must be a number in plain decimal notation (`plain_number`), finite, and with
    `scale` (low, high) within it. A byte-order mark (a file saved by Excel) is read past."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: a folder, not a prediction file (a CSV written by `ser-cache predict`)")
    if not path.is_file():
        raise ValueError(f"{path}: no such prediction file")
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
