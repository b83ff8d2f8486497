"""The CSV manifest reader: one row per utterance, a `path` column and optional labels, as `Utterance` records;
its first line may declare the label scale."""

from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path
from typing import Literal

from ser_cache.data.records import (
    DEFAULT_SCALE,
    CorpusError,
    OutOfScale,
    Utterance,
    csv_header,
    csv_rows,
    emotion_code,
    format_scale,
    known_value,
    label_value,
    leaves_folder,
    log_excluded,
    outside_scale,
    parse_scale,
    read_utf8,
    scale_argument,
)

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
_SCALE_LINE = re.compile(r"#\s*label_scale\s*[:=]\s*(?P<value>.*?)\s*$", re.IGNORECASE)


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
    text = read_utf8(path)
    first, _, rest = text.partition("\n")
    # Excel may quote it or pad it with commas
    declared = _SCALE_LINE.fullmatch(first.strip().rstrip(",").strip().strip('"'))
    first_row = 2
    if declared:
        text, first_row = rest, 3
    if label_scale is not None:
        scale = scale_argument(label_scale)
    elif declared:
        scale = parse_scale(declared["value"], f"{path}, line 1")
    else:
        scale = DEFAULT_SCALE
    reader = csv.DictReader(io.StringIO(text, newline=""))
    fields = csv_header(reader, path, first_row - 1)
    if "path" not in fields:
        raise CorpusError(
            f"{path}: a manifest needs a 'path' column; found {', '.join(fields) or 'no header'}; "
            f"recognised columns: {', '.join(MANIFEST_COLUMNS)}"
        )
    for lineno, row in csv_rows(reader, path, first_row):
        p = (row.get("path") or "").strip()
        if not p:
            raise CorpusError(f"{path}, line {lineno}: empty path")
        outside = leaves_folder(p, absolute_ok=True)
        if outside:
            raise CorpusError(f"{path}, line {lineno}: path {p!r} is {outside}; a relative path must stay inside "
                              f"the manifest's folder {base}: write the absolute path of audio kept elsewhere")
        audio = Path(p) if os.path.isabs(p) else base / p
        uid = (row.get("id") or "").strip() or Path(p).name
        if uid in seen:
            raise CorpusError(f"{path}, line {lineno}: id {uid} already used on line {seen[uid]}")
        seen[uid] = lineno
        avd = [label_value(row.get(c), path, lineno, c, nan_is_missing=True)
               for c in ("arousal", "valence", "dominance")]
        bad = outside_scale(row, ("arousal", "valence", "dominance"), avd, scale)
        if bad:
            if out_of_scale == "error":
                raise CorpusError(f"{path}, line {lineno}: {bad} is outside the scale {format_scale(scale)}; "
                                  "a manifest on another scale declares it on its first line: # label_scale: LOW HIGH")
            excluded.append(f"line {lineno} ({uid}: {bad})")
            continue
        text_cell = row.get("text")
        utts.append(
            Utterance(
                id=uid,
                path=audio,
                split=(row.get("split") or "").strip() or None,
                emotion=emotion_code(row.get("emotion")),
                arousal=avd[0],
                valence=avd[1],
                dominance=avd[2],
                speaker=known_value(row.get("speaker")),
                gender=known_value(row.get("gender")),
                text=text_cell.strip() if text_cell is not None and text_cell.strip() else None,
                transcript=audio.with_suffix(".txt"),
            )
        )
    log_excluded(path, excluded, scale)
    return utts
