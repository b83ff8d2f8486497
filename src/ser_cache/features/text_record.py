"""A text store's record of which text feeds which row (`<name>.transcripts.csv`), written before
encoding and checked on every rerun: a row already written never silently gets other text.
"""

from __future__ import annotations

from pathlib import Path

from ser_cache.data.records import Utterance
from ser_cache.data.transcripts import (
    RECORD_ATTR,
    TranscriptError,
    TranscriptTable,
    counts,
    file_sha256,
    load_table,
    read_record,
    record_attr,
    record_bytes,
    record_path,
    record_problem,
    text_sha1,
    write_record,
)
from ser_cache.features.errors import ExtractError
from ser_cache.features.store import FeatureStore


class TextChanged(ExtractError):
    """Rows already written would get other text; --overwrite rebuilds the store."""


def load_transcript_table(path: Path) -> TranscriptTable:
    try:
        return load_table(path)
    except TranscriptError as exc:
        raise ExtractError(str(exc)) from None


def record_transcripts(path: Path, cfg, utts: list[Utterance], sources: list[str | None],
                        table: TranscriptTable | None) -> dict[str, int]:
    """Write which text feeds which row (`<name>.transcripts.csv`, store attribute "transcripts") for
    `cfg` (an ExtractConfig: its retry_failed, transcripts and prefer_transcripts); returns the counts.

    Runs on rank 0 before any row is encoded, with the store locked. Rows this run computes
    (pending, and failed ones with --retry-failed) take this run's text. A row already written
    keeps its entry, and if this run would feed it other text (another table, --prefer-transcripts
    given or not, a transcript edited since) the run is refused: the store would no longer say
    which text its rows hold. Written before encoding, the record of a killed run already names
    the text of every row it may have written, so its resume is checked the same way. A store with
    written rows whose record is missing, or is not the one the store vouches for (its sha256 in
    the store's attributes), is refused too: nothing says which text those rows hold.
    """
    store = FeatureStore.open(path, mode="r+")
    written, failed = store.flags()
    computed = ~written if cfg.retry_failed else ~(written | failed)
    record_file = record_path(path)
    problem = record_problem(record_file, store.attrs) if written.any() else None
    if problem:
        raise TextChanged(f"{path}: {problem}, so nothing says which text its {int(written.sum())} written row(s) "
                           "were encoded from; restore the record, or pass --overwrite to rebuild the store")
    try:
        old = read_record(record_file)
    except TranscriptError as exc:
        raise TextChanged(f"{exc}; pass --overwrite to rebuild the store and its record") from None
    rows, changed = [], []
    for i, (u, source) in enumerate(zip(utts, sources)):
        now = (u.id, source or "none", text_sha1(u.text if source else None))
        before = old.get(u.id)
        if computed[i] or before is None:
            rows.append(now)
            continue
        if written[i] and before[1] != now[2]:
            changed.append(u.id)
        rows.append((u.id, *before))
    if changed:
        shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        given = f"--transcripts {cfg.transcripts}" if cfg.transcripts is not None else "no --transcripts"
        raise TextChanged(
            f"{path}: {len(changed)} row(s) already written were encoded from other text than this run gives them "
            f"({given}{', --prefer-transcripts' if cfg.prefer_transcripts else ''}): {shown}; see {record_file.name}. "
            "Pass the transcripts the store was built with, or --overwrite to rebuild it"
        )
    data = record_bytes(rows)
    # The store vouches for the record first: a kill between the two writes leaves the old record,
    # which the attribute still names as the previous one.
    store.update_attrs(**{RECORD_ATTR: record_attr(data, file_sha256(record_file))})
    write_record(record_file, data)
    totals = counts(None if s == "none" else s for _, s, _ in rows)
    store.update_attrs(transcripts={
        "table": None if table is None else str(table.path),
        "table_sha256": None if table is None else table.sha256,
        "asr": None if table is None else table.asr,
        "prefer": bool(cfg.prefer_transcripts),
        "rows": totals,
    })
    return totals
