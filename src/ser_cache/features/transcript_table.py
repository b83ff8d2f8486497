"""The files `transcribe` writes and reads back: the table, the journals, the sidecar, the error report.

- the table `<out>` (`FileName,text`, rows sorted by FileName, UTF-8), written atomically at the end;
- the journal `<out>.partial` (same columns), appended and fsynced batch by batch (`Journal`); a shard's
  journals `<out>.shard-I-of-N.partial` and `<out>.shard-I-of-N.failed.partial` (`FileName,reason`) are
  the same kind of file (their names: transcribe_shards);
- the sidecar `<out>.json`: the model, its revision and every setting that changes the text (`COMPARED`),
  whether the table is complete;
- the error report `<out>.errors.csv` (id,path,reason, like extract's), when some utterance failed.

A file that is not what transcribe writes is one TranscribeError naming it, never a traceback. This
is the lowest of the transcribe modules (transcript_table ← transcribe_plan ← transcribe_shards ←
transcribe): it knows no options and no loop, so both loops (one process, shards) read and write
these files through it.
"""

from __future__ import annotations

import csv
import io
import os
from datetime import datetime, timezone
from pathlib import Path

from ser_cache.data.records import Utterance
from ser_cache.data.transcripts import sidecar_path, sidecar_problem
from ser_cache.features.report import REPORT_COLUMNS
from ser_cache.infra.atomic import atomic_path

COLUMNS = ("FileName", "text")
FAILURE_COLUMNS = ("FileName", "reason")  # a shard's failures journal
# Settings that change the text: a table or journal made with other values is not resumed.
COMPARED = ("model_id", "revision", "language", "beams", "max_new_tokens", "max_seconds", "precision")


class TranscribeError(Exception):
    """Transcription cannot start or continue as asked; the message names the file or option."""


def journal_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def report_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".csv") + ".errors.csv")


def read_table(path: Path, columns: tuple[str, str] = COLUMNS, *, data: bytes | None = None) -> dict[str, str]:
    """FileName → text of a transcript table (or a journal: same columns); a file that is not this
    UTF-8 CSV is one TranscribeError naming it (and the line), never a traceback. `data`: the
    file's bytes, already read (a journal cut to its complete records)."""
    raw = Path(path).read_bytes() if data is None else data
    bom = 3 if raw.startswith(b"\xef\xbb\xbf") else 0
    try:
        text = raw[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        at = bom + exc.start
        line = raw.count(b"\n", 0, at) + 1
        raise TranscribeError(f"{path}, line {line} (byte offset {at}): byte 0x{raw[at]:02x} "
                              "is not UTF-8; transcribe writes UTF-8, so the file was changed or damaged since: pass "
                              "--overwrite to start again or choose another --out") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return {}
        if tuple(header) != columns:
            raise TranscribeError(f"{path}: header is {','.join(header)!r}, expected {','.join(columns)!r}")
        table = {}
        for row in reader:
            if len(row) != 2:
                raise TranscribeError(f"{path}, line {reader.line_num}: expected 2 fields ({','.join(columns)}), "
                                      f"found {len(row)}")
            table[row[0]] = row[1]
    except csv.Error as exc:
        raise TranscribeError(f"{path}, line {reader.line_num}: not readable as CSV ({exc}); pass --overwrite to "
                              "start again") from None
    return table


def write_table(path: Path, table: dict[str, str]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        w.writerows([uid, table[uid]] for uid in sorted(table))


class Journal:
    """Finished rows, appended and fsynced batch by batch, so that a killed run keeps them.

    Texts are one line each (whitespace collapsed), so a record is one line and a last line
    without its newline is a record cut short by the kill: it is dropped on reading. (A shard's
    failures journal is the same with the columns FileName,reason.)
    """

    def __init__(self, path: Path, columns: tuple[str, str] = COLUMNS):
        self.path = path
        self.columns = columns
        self._fh = None

    def read(self, *, truncate: bool = True) -> dict[str, str]:
        """The complete records of a journal left by an earlier run; cuts off a partial last line
        (in the file with `truncate`, which only the journal's own writer may do: another shard's
        journal may be in the middle of an append)."""
        if not self.path.is_file():
            return {}
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if truncate and len(complete) != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(len(complete))
        if not complete:
            return {}
        return read_table(self.path, self.columns, data=complete)

    def append(self, rows: list[tuple[str, str]]) -> None:
        if self._fh is None:
            self._fh = open(self.path, "a", newline="", encoding="utf-8")
            self._writer = csv.writer(self._fh)
            if self._fh.tell() == 0:  # size, not existence: a kill can leave an empty file
                self._writer.writerow(self.columns)
        self._writer.writerows(rows)
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def read_sidecar(path: Path) -> dict | None:
    """The sidecar's record (a JSON object whose "settings" is an object), None without one."""
    import json

    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TranscribeError(f"{path}: not a readable settings file ({exc}); pass --overwrite to start "
                              "again") from None
    if not isinstance(record, dict) or not isinstance(record.get("settings"), dict):
        raise TranscribeError(f"{path}: expected the settings file transcribe writes (a JSON object whose 'settings' "
                              f"is an object), found {sidecar_problem(record)}; pass --overwrite to start again")
    return record


def write_sidecar(path: Path, record: dict) -> None:
    from ser_cache.infra.atomic import write_json_atomic

    write_json_atomic(path, record)


def differences(old: dict, new: dict) -> list[str]:
    return [f"{k} {old.get(k)!r} → {new.get(k)!r}" for k in COMPARED if old.get(k) != new.get(k)]


def read_report(path: Path) -> dict[str, str]:
    """id → reason of an error report (written with the finished table)."""
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or tuple(rows[0]) != tuple(REPORT_COLUMNS) or any(len(r) != 3 for r in rows[1:]):
        raise TranscribeError(f"{path}: expected the error report transcribe writes ({','.join(REPORT_COLUMNS)}); "
                              "remove it to try those utterances again")
    return {r[0]: r[2] for r in rows[1:]}


def write_finished(out: Path, record: dict, table: dict[str, str], failed: dict[str, str],
                    by_id: dict[str, Utterance]) -> Path | None:
    """The table, the error report, then the sidecar marked complete; the error report's path (or None)."""
    write_table(out, table)
    report = _write_report(report_path(out), [by_id[i] for i in sorted(failed)], failed)
    record.update(complete=True, rows=len(table), failed=len(failed),
                  finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    write_sidecar(sidecar_path(out), record)
    return report


def _write_report(path: Path, utts: list[Utterance], reasons: dict[str, str]) -> Path | None:
    """This run's failures as `<out>.errors.csv` (id,path,reason), like extract's; none: no file."""
    if not utts:
        path.unlink(missing_ok=True)
        return None
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(REPORT_COLUMNS)
        w.writerows([u.id, str(u.path), reasons[u.id]] for u in utts)
    return path
