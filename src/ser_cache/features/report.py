"""Stage one's error report, `<name>.errors.csv` beside the store: one line (id, path, reason) per row
that could not be computed.

Every rank appends its failures to a partial file of its own as they happen, flushed before the
chunk whose flags point to them is written (`ReportWriter`); at the end rank 0 merges the earlier
report and every rank's lines, keeping the rows still failed (`merge_reports`).

A shard's ranks name their partial files after the shard (`<name>.errors.shard-I-of-N.rankK.partial.csv`),
and a shard merges its own, plus those that shards no longer running left behind (a killed shard's
lines reach the report when any later writer finishes); it never touches the file of a shard that is
still appending to it.
"""

from __future__ import annotations

import csv
import glob
import os
import re
from pathlib import Path

import numpy as np

from ser_cache.data.corpus import Utterance
from ser_cache.features.store import FeatureStore
from ser_cache.infra.atomic import atomic_path
from ser_cache.infra.shards import Shard, lock_target

REPORT_COLUMNS = ("id", "path", "reason")


def report_path(store: Path) -> Path:
    return store.with_name(store.name.removesuffix(".zarr") + ".errors.csv")


class ReportWriter:
    """Per-rank failure lines, appended and flushed as they happen, merged at the end."""

    def __init__(self, final: Path, rank: int, shard: Shard | None = None):
        self.final = final
        shard_part = f".{shard.slug}" if shard is not None else ""
        self.partial = final.with_name(final.name.removesuffix(".csv") + f"{shard_part}.rank{rank}.partial.csv")
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


def merge_reports(store: FeatureStore, shard: Shard | None = None) -> None:
    """One report for the store: earlier entries plus the new lines of the partial files this writer may
    merge (module docstring), for rows still failed."""
    from ser_cache.infra import locks

    final = report_path(store.path)
    stem = final.name.removesuffix(".csv")
    pattern = re.compile(re.escape(stem) + r"(?:\.shard-(\d+)-of-(\d+))?\.rank\d+\.partial\.csv$")
    partials, borrowed = [], []
    try:
        for p in sorted(final.parent.glob(glob.escape(stem) + ".*partial.csv")):
            m = pattern.fullmatch(p.name)
            if m is None:
                continue
            other = Shard(int(m.group(1)), int(m.group(2))) if m.group(1) and int(m.group(1)) < int(m.group(2)) \
                else None
            if other is not None and other != shard:
                lock = locks.FileLock(lock_target(store.path, other))
                try:
                    lock.acquire()  # held while merging: that shard cannot start appending meanwhile
                except locks.Held:
                    continue  # it is running: its lines reach the report when it finishes
                borrowed.append(lock)
            partials.append(p)
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
    finally:
        for lock in borrowed:
            lock.release()


def unreported(store: FeatureStore, failed: np.ndarray) -> int:
    """Rows flagged failed whose reason is not in the store's report (yet: in a partial file of a shard
    that has not finished)."""
    reported = {row["id"] for row in read_report(report_path(store.path))}
    return sum(1 for i in store.ids()[failed].tolist() if i not in reported)
