"""transcripts.py: reading a transcript table and its sidecar, which text an utterance gets, the per-row record."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from ser_cache.data import transcripts
from ser_cache.data.corpus import load_corpus
from ser_cache.data.records import Utterance
from ser_cache.data.transcripts import (
    TranscriptError,
    attach,
    counts,
    load_table,
    read_record,
    read_sidecar,
    read_table,
    record_path,
    sidecar_path,
    text_sha1,
    write_record,
)
from ser_cache.features import transcript_table

from factories import msp_corpus


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_text(text, encoding=encoding)
    return path


# --------------------------------------------------------------------------- the table


def test_a_table_is_read_by_filename_or_id_with_or_without_a_bom(tmp_path):
    plain = write(tmp_path / "a.csv", "FileName,text\nx.wav, hello there \ny.wav,\"with, a comma\"\n")
    assert read_table(plain) == {"x.wav": "hello there", "y.wav": "with, a comma"}
    bom = write(tmp_path / "b.csv", "FileName,text\nx.wav,héllo\n", encoding="utf-8-sig")
    assert bom.read_bytes().startswith(b"\xef\xbb\xbf")
    assert read_table(bom) == {"x.wav": "héllo"}
    by_id = write(tmp_path / "c.csv", "id,speaker,text\nu1,s,one\nu2,s,\n")
    assert read_table(by_id) == {"u1": "one", "u2": ""}


def test_table_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(TranscriptError, match=r"--transcripts .*nope.csv: no such file"):
        read_table(tmp_path / "nope.csv")
    missing = write(tmp_path / "m.csv", "FileName,transcript\nx.wav,hi\n")
    with pytest.raises(TranscriptError, match=rf"{missing}, line 1: expected columns FileName \(or id\) and text; "
                                              r"found FileName, transcript"):
        read_table(missing)
    twice = write(tmp_path / "d.csv", "FileName,text\nx.wav,a\ny.wav,b\nx.wav,c\n")
    with pytest.raises(TranscriptError, match=rf"{twice}, line 4: FileName x.wav is listed twice \(first on line 2\)"):
        read_table(twice)
    empty_key = write(tmp_path / "e.csv", "id,text\nu1,a\n,b\n")
    with pytest.raises(TranscriptError, match=rf"{empty_key}, line 3: empty id"):
        read_table(empty_key)
    latin = tmp_path / "l.csv"
    latin.write_bytes("FileName,text\nx.wav,caf\xe9\n".encode("latin-1"))
    with pytest.raises(TranscriptError, match=rf"{latin}: not UTF-8 text"):
        read_table(latin)
    with pytest.raises(TranscriptError, match="no header"):
        read_table(write(tmp_path / "z.csv", ""))


def test_the_sidecar_is_transcribes_and_gives_the_asr_settings(tmp_path):
    table = write(tmp_path / "asr.csv", "FileName,text\nx.wav,hi\n")
    assert sidecar_path(table) == transcripts.sidecar_path(table) == tmp_path / "asr.csv.json"
    assert read_sidecar(table) is None and load_table(table).asr is None
    settings = {"model_id": "openai/whisper-large-v3", "revision": "abc123", "language": "en", "beams": 1,
                "max_new_tokens": 224, "max_seconds": 30.0, "precision": "bf16", "timestamps": False}
    transcript_table.write_sidecar(sidecar_path(table), {"model": "whisper-large-v3", "settings": settings,
                                                         "complete": True})
    loaded = load_table(table)
    assert loaded.asr == settings
    assert loaded.sha256 == hashlib.sha256(table.read_bytes()).hexdigest()
    write(sidecar_path(table), "{not json")
    with pytest.raises(TranscriptError, match=r"asr.csv.json: not a readable transcribe settings file"):
        read_sidecar(table)
    write(sidecar_path(table), json.dumps({"model": "x"}))
    with pytest.raises(TranscriptError, match=r"asr.csv.json: expected the settings"):
        read_sidecar(table)


# --------------------------------------------------------------------------- which text an utterance gets


@pytest.fixture
def utts(tmp_path):
    """Four corpus utterances: two with a transcript, one with an empty one, one with none."""
    root = msp_corpus(tmp_path / "c", n=4, unlabeled=0)
    out = load_corpus(root)
    (root / "Transcripts" / out[2].path.with_suffix(".txt").name).write_text("  \n")
    (root / "Transcripts" / out[3].path.with_suffix(".txt").name).unlink()
    return out


def test_corpus_first_the_table_where_the_corpus_has_none(tmp_path, utts):
    own = [u.read_text() for u in utts]
    table = write(tmp_path / "t.csv", "FileName,text\n"
                  f"{utts[0].id},table text 0\n{utts[2].id},table text 2\n{utts[3].id},table text 3\n")
    out, sources = attach(utts, table)
    assert sources == ["corpus", "corpus", "table", "table"]
    assert [u.read_text() for u in out] == [own[0], own[1], "table text 2", "table text 3"]
    assert [u.id for u in out] == [u.id for u in utts] and out[3].path == utts[3].path

    preferred, sources = attach(utts, table, prefer=True)
    assert sources == ["table", "corpus", "table", "table"]  # the table first; the corpus where it has no row
    assert [u.read_text() for u in preferred][:2] == ["table text 0", own[1]]

    none_out, sources = attach(utts, None)
    assert sources == ["corpus", "corpus", None, None]
    assert none_out[3] is utts[3]  # no text anywhere: unchanged, still naming its transcript file
    assert counts(sources) == {"corpus": 2, "table": 0, "none": 2}


def test_an_empty_table_row_is_no_text_and_rows_match_by_id_or_stem(tmp_path, utts):
    stem = Path(utts[3].id).stem
    table = write(tmp_path / "t.csv", f"id,text\n{utts[2].id},\n{stem},by stem\n")
    out, sources = attach(utts, table, prefer=True)
    assert sources == ["corpus", "corpus", None, "table"]
    assert out[3].read_text() == "by stem"


def test_bare_utterances_take_a_txt_beside_them_as_their_own(tmp_path):
    a, b = tmp_path / "a.wav", tmp_path / "b.wav"
    write(tmp_path / "a.txt", "beside a\n")
    bare = [Utterance(id=p.name, path=p, transcript=p.with_suffix(".txt")) for p in (a, b)]
    table = write(tmp_path / "t.csv", "FileName,text\na.wav,table a\nb.wav,table b\n")
    assert attach(bare, table)[1] == ["corpus", "table"]
    assert [u.read_text() for u in attach(bare, table)[0]] == ["beside a", "table b"]


# --------------------------------------------------------------------------- the per-row record


def test_the_record_round_trips_and_sha1_is_the_first_12_hex_digits(tmp_path):
    assert text_sha1("héllo") == hashlib.sha1("héllo".encode()).hexdigest()[:12]
    assert text_sha1(None) == "" and len(text_sha1("")) == 12
    path = record_path(tmp_path / "minilm.zarr")
    assert path == tmp_path / "minilm.transcripts.csv"
    assert read_record(path) == {}
    rows = [("a.wav", "corpus", text_sha1("x")), ("b.wav", "none", ""), ("c.wav", "table", text_sha1("y"))]
    write_record(path, rows)
    assert path.read_text().splitlines()[0] == "id,source,text_sha1"
    assert read_record(path) == {uid: (s, h) for uid, s, h in rows}
    assert not list(tmp_path.glob(".*tmp*"))
    write(path, "id,source,text_sha1\na.wav,asr,123\n")
    with pytest.raises(TranscriptError, match=rf"{path}, line 2: source 'asr'"):
        read_record(path)
