"""Stage one's error report, `<name>.errors.csv` beside the store: one line (id, path, reason) per row
that could not be computed.

Every rank appends its failures to a partial file of its own as they happen, flushed before the
chunk whose flags point to them is written (`ReportWriter`); at the end rank 0 merges the earlier
report and every rank's lines, keeping the rows still failed (`merge_reports`).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from ser_cache.data.corpus import Utterance
from ser_cache.features.store import FeatureStore
from ser_cache.infra.atomic import atomic_path

REPORT_COLUMNS = ("id", "path", "reason")


def report_path(store: Path) -> Path:
    return store.with_name(store.name.removesuffix(".zarr") + ".errors.csv")


class ReportWriter:
    """Per-rank failure lines, appended and flushed as they happen, merged at the end."""

    def __init__(self, final: Path, rank: int):
        self.final = final
        self.partial = final.with_name(final.name.removesuffix(".csv") + f".rank{rank}.partial.csv")
        self._fh = None

    def add(self, utt: Utterance, reason: str) -> None:
        if self._fh is None:
            self._fh = open(self.partial, "a", newline="", encoding="utf-8")
            self._writer = csv.writer(self._fh)
            # Size, not existence: a process killed right after opening leaves an empty file, and
            # lines appended to it without a header would be read as one.
            if self._fh.tell() == 0:
                self._writer.writerow(REPORT_COLUMNS)
        self._writer.writerow([utt.id, str(utt.path), reason])

    def flush(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self.flush()
            self._fh.close()
            self._fh = None


def read_report(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def merge_reports(store: FeatureStore, world: int) -> None:
    """One report for the store: earlier entries plus every rank's new ones, for rows still failed."""
    final = report_path(store.path)
    partials = sorted(final.parent.glob(final.name.removesuffix(".csv") + ".rank*.partial.csv"))
    entries: dict[str, dict] = {}
    for src in [final, *partials]:
        for row in read_report(src):
            entries[row["id"]] = row
    _, failed = store.flags()
    failed_ids = set(store.ids()[failed].tolist())
    keep = [entries[i] for i in sorted(entries) if i in failed_ids]
    if keep:
        with atomic_path(final) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=REPORT_COLUMNS)
            w.writeheader()
            w.writerows({k: e.get(k, "") for k in REPORT_COLUMNS} for e in keep)
    else:
        final.unlink(missing_ok=True)
    for p in partials:
        p.unlink(missing_ok=True)
