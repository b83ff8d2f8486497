"""Where an utterance's text comes from: the corpus's own transcript, or a transcript table.

A transcript table is a CSV with a key column `FileName` (or `id`) and a `text` column, UTF-8
with or without a byte-order mark; `ser-cache transcribe` writes one (`asr.csv`) with a sidecar
`asr.csv.json` naming the ASR model, its revision and the settings that change the text.

`attach` decides, per utterance, which text a text encoder is fed:
- "corpus": the corpus's own transcript (a manifest's `text` column, `Transcripts/<stem>.txt`,
  or a `.txt` beside a bare audio file), when it is not empty;
- "table": the table's row for the utterance (matched by id, else by the audio file's stem),
  where the corpus has none, or first of the two with `prefer=True`;
- None: neither has text (an empty table row counts as none, as an empty .txt does).

`extract` records the outcome per row beside a text store (`<name>.transcripts.csv`: id, source,
sha1 of the text fed), so that a rerun can refuse to let rows already written change text, and
`predict` can tell which rows of the store were computed from the text it is given. The store
vouches for its record with the record's sha256 (attribute `transcript_record`): a record that
is missing or replaced says nothing about the rows.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ser_cache.data.records import CSV_ENCODING, Utterance
from ser_cache.infra.atomic import atomic_path

KEY_COLUMNS = ("id", "FileName")  # either names the utterance; `id` wins when a table has both
TEXT_COLUMN = "text"
SOURCES = ("corpus", "table", "none")  # as written in the per-row record; None is written "none"
RECORD_COLUMNS = ("id", "source", "text_sha1")
RECORD_ATTR = "transcript_record"  # the store attribute holding the record's sha256 (record_attr)
SHA1_DIGITS = 12


class TranscriptError(Exception):
    """A transcript table, its sidecar or a per-row record cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class TranscriptTable:
    """A transcript table read whole: its texts by key, the file's sha256, and the ASR record (or None).

    `key` is the column its rows are matched by and `columns` its header, for messages.
    """

    path: Path
    texts: dict[str, str]
    sha256: str
    asr: dict | None  # the sidecar's settings (model_id, revision, language, ...), None without a sidecar
    key: str = KEY_COLUMNS[1]
    columns: tuple[str, ...] = (KEY_COLUMNS[1], TEXT_COLUMN)

    def text_for(self, utt: Utterance) -> str | None:
        """The row for `utt`: by id, else by its audio file's stem; None when the table has none."""
        text = self.texts.get(utt.id)
        if text is None and utt.path is not None:
            text = self.texts.get(Path(utt.path).stem)
        return text

    def describe(self) -> str:
        """How rows are matched, for a message: `keyed by its column id (columns id, FileName, text)`."""
        ignored = [c for c in KEY_COLUMNS if c != self.key and c in self.columns]
        note = f"; {ignored[0]} is not used when the table has {self.key}" if ignored else ""
        return (f"rows matched by its column {self.key}, else by the audio file's stem; columns found: "
                f"{', '.join(self.columns)}; expected FileName (or id) and text{note}")


def read_table(path: str | Path) -> dict[str, str]:
    """key → text (stripped) of a transcript table; refuses a missing column, an empty or repeated key,
    and a row with more fields than the header (an unquoted comma in a text)."""
    return _read_table(Path(path))[0]


def _read_table(path: Path) -> tuple[dict[str, str], str, tuple[str, ...]]:
    """(key → text, the key column, the header) of a transcript table; see read_table."""
    if not path.is_file():
        raise TranscriptError(f"--transcripts {path}: no such file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise TranscriptError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    bom = 3 if raw.startswith(b"\xef\xbb\xbf") else 0  # as CSV_ENCODING (utf-8-sig) drops it
    try:
        text = raw[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        at = bom + exc.start  # decoded whole, so the offset is the file's
        line = raw.count(b"\n", 0, at) + 1
        raise TranscriptError(f"{path}: not UTF-8 text (byte 0x{raw[at]:02x} at byte offset {at}, line {line}); "
                              "save it as UTF-8") from None
    try:
        with io.StringIO(text, newline="") as f:
            reader = csv.DictReader(f)
            cols = reader.fieldnames or []
            key = next((c for c in KEY_COLUMNS if c in cols), None)
            if key is None or TEXT_COLUMN not in cols:
                raise TranscriptError(f"{path}, line 1: expected columns FileName (or id) and text; found "
                                      f"{', '.join(cols) or 'no header'}")
            table: dict[str, str] = {}
            first_line: dict[str, int] = {}
            for row in reader:
                # line_num is the row's last line; a quoted text may span several.
                lineno = reader.line_num - sum(v.count("\n") for v in row.values() if isinstance(v, str))
                extra = row.get(None)  # DictReader's place for fields past the header's
                if extra:
                    raise TranscriptError(
                        f"{path}, line {lineno}: {len(cols) + len(extra)} fields, the header has {len(cols)} "
                        f"({', '.join(cols)}); a text with a comma must be quoted (\"you know, the interview\")")
                uid = (row.get(key) or "").strip()
                if not uid:
                    raise TranscriptError(f"{path}, line {lineno}: empty {key}")
                if uid in first_line:
                    raise TranscriptError(f"{path}, line {lineno}: {key} {uid} is listed twice (first on line "
                                          f"{first_line[uid]})")
                first_line[uid] = lineno
                table[uid] = (row.get(TEXT_COLUMN) or "").strip()
    except csv.Error as exc:
        raise TranscriptError(f"{path}: not a readable CSV ({exc})") from None
    return table, key, tuple(cols)


def read_sidecar(table: str | Path) -> dict | None:
    """The ASR settings `transcribe` recorded beside `table` (model_id, revision, ...), or None without a sidecar."""
    path = sidecar_path(Path(table))
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TranscriptError(f"{path}: not a readable transcribe settings file ({exc})") from None
    settings = record.get("settings") if isinstance(record, dict) else None
    if not isinstance(settings, dict):
        raise TranscriptError(f"{path}: expected the settings `transcribe` writes (a JSON object with 'settings'), "
                              f"found {sidecar_problem(record)}")
    return dict(settings)


def load_table(path: str | Path) -> TranscriptTable:
    """A transcript table with its sha256 and its sidecar's ASR settings."""
    path = Path(path)
    texts, key, columns = _read_table(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return TranscriptTable(path=path, texts=texts, sha256=digest.hexdigest(), asr=read_sidecar(path), key=key,
                           columns=columns)


def attach(utts: Sequence[Utterance], table: str | Path | TranscriptTable | None,
           prefer: bool = False) -> tuple[list[Utterance], list[str | None]]:
    """The utterances with their text set where they get one, and each one's source.

    A source is "corpus", "table" or None (no text anywhere); see the module docstring for the
    order. An utterance without text is returned unchanged, so it still names its transcript file.
    """
    if table is not None and not isinstance(table, TranscriptTable):
        table = load_table(table)
    out: list[Utterance] = []
    sources: list[str | None] = []
    for u in utts:
        corpus = u.read_text()
        found = {"corpus": corpus if corpus and corpus.strip() else None}
        if table is not None:
            text = table.text_for(u)
            found["table"] = text if text and text.strip() else None
        order = ("table", "corpus") if prefer else ("corpus", "table")
        source = next((s for s in order if found.get(s) is not None), None)
        out.append(u if source is None else u.with_text(found[source]))
        sources.append(source)
    return out, sources


def counts(sources: Iterable[str | None]) -> dict[str, int]:
    """{"corpus": n, "table": m, "none": k}."""
    out = dict.fromkeys(SOURCES, 0)
    for s in sources:
        out[s or "none"] += 1
    return out


def text_sha1(text: str | None) -> str:
    """The first 12 hex digits of the sha1 of the text's UTF-8 bytes; "" for no text."""
    if text is None:
        return ""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:SHA1_DIGITS]


@dataclass
class Texts:
    """The text utterances carry for text inputs (predict, evaluate): the table given, if any, and
    where each utterance's text came from."""

    table: TranscriptTable | None
    prefer: bool
    sources: dict[str, str | None]  # utterance id -> "corpus", "table" or None (no text)

    def summary(self, ids: Sequence[str] | None = None) -> dict:
        """What evaluate writes: the table (path, sha256, ASR settings), --prefer-transcripts and how many of
        the utterances `ids` (default: all) took their text from where."""
        t = self.table
        rows = counts(self.sources.values() if ids is None else (self.sources[i] for i in ids))
        return {"table": None if t is None else str(t.path), "table_sha256": None if t is None else t.sha256,
                "asr": None if t is None else t.asr, "prefer": self.prefer, "rows": rows}


# --------------------------------------------------------------------------- the per-row record of a text store


def record_path(store: Path) -> Path:
    """`OUT/<name>.zarr` → `OUT/<name>.transcripts.csv`."""
    store = Path(store)
    return store.with_name(store.name.removesuffix(".zarr") + ".transcripts.csv")


def read_record(path: Path) -> dict[str, tuple[str, str]]:
    """id → (source, text_sha1) of a store's per-row record; {} when there is none."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        with open(path, newline="", encoding=CSV_ENCODING) as f:
            reader = csv.DictReader(f)
            if tuple(reader.fieldnames or ()) != RECORD_COLUMNS:
                raise TranscriptError(f"{path}, line 1: expected columns {','.join(RECORD_COLUMNS)}; found "
                                      f"{','.join(reader.fieldnames or []) or 'no header'}")
            out = {}
            for row in reader:
                if row["source"] not in SOURCES:
                    raise TranscriptError(f"{path}, line {reader.line_num}: source {row['source']!r}, expected one "
                                          f"of {', '.join(SOURCES)}")
                out[row["id"]] = (row["source"], row["text_sha1"] or "")
            return out
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise TranscriptError(f"{path}: cannot be read ({exc})") from None


def record_bytes(rows: Iterable[tuple[str, str, str]]) -> bytes:
    """The record file's bytes for (id, source, text_sha1) rows."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(RECORD_COLUMNS)
    w.writerows(rows)
    return buf.getvalue().encode("utf-8")


def write_record(path: Path, rows: Iterable[tuple[str, str, str]] | bytes) -> None:
    """Write (id, source, text_sha1) rows (or record_bytes' output) atomically."""
    data = rows if isinstance(rows, bytes) else record_bytes(rows)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def file_sha256(path: Path) -> str | None:
    """The sha256 of a file's bytes; None when there is no such file."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def record_attr(new: bytes, on_disk: str | None) -> dict:
    """The store attribute that vouches for a record: the sha256 of the record about to be written,
    and of the one on disk until then, so that a run killed between the two writes still finds its
    record vouched for (both name the same text for every written row)."""
    return {"sha256": hashlib.sha256(new).hexdigest(), "previous_sha256": on_disk}


def record_problem(path: Path, attrs: dict) -> str | None:
    """Why a store's record cannot say which text its written rows hold; None when it can.

    The store's attribute RECORD_ATTR holds the record's digest: a record that is missing, or not
    the one extract wrote, vouches for nothing. A store built before the attribute existed is
    trusted with the record it has.
    """
    path = Path(path)
    found = file_sha256(path)
    if found is None:
        return f"its transcript record {path.name} is missing"
    vouched = attrs.get(RECORD_ATTR)
    if isinstance(vouched, dict) and found not in (vouched.get("sha256"), vouched.get("previous_sha256")):
        return f"its transcript record {path.name} is not the one extract wrote (its sha256 differs from the store's)"
    return None


def text_store_ids(store: Path, attrs: dict, utts: Sequence[Utterance]) -> tuple[list[str | None], str]:
    """The ids a text store may serve (None for an utterance it must not) and, for the rows it must
    not serve, why.

    A row of a text store is the encoding of the text its record names. It serves an utterance
    whose text here is that text, or that has no text here (the store's is the only one there
    is). An utterance with other text here (another table, --prefer-transcripts, a transcript
    edited since) is to be computed from its text, and so is every utterance with text when the
    store's record is missing or not the one the store vouches for (`record_problem`).
    """
    record_file = record_path(store)
    problem = record_problem(record_file, attrs)
    try:
        recorded = {} if problem else read_record(record_file)
    except TranscriptError as exc:
        problem, recorded = str(exc), {}
    ids: list[str | None] = []
    for u in utts:
        text = u.read_text()
        if text is None or not text.strip():
            ids.append(u.id)
            continue
        entry = recorded.get(u.id)
        ids.append(u.id if entry is not None and entry[1] == text_sha1(text) else None)
    return ids, problem or f"their text is not the text {record_file.name} names for them"


def sidecar_path(out: Path) -> Path:
    return out.with_name(out.name + ".json")


def sidecar_problem(record) -> str:
    """What a sidecar holds instead of an object with 'settings': `an array`, `'settings' that is a string`."""
    if not isinstance(record, dict):
        return _json_kind(record)
    return "no 'settings'" if "settings" not in record else f"'settings' that is {_json_kind(record['settings'])}"


def _json_kind(value) -> str:
    """`[]` → `an array`: a JSON value's kind, for messages."""
    kinds = ((dict, "an object"), (list, "an array"), (str, "a string"), (bool, "a boolean"), (int, "a number"),
             (float, "a number"))
    return next((name for t, name in kinds if isinstance(value, t)), "null")
