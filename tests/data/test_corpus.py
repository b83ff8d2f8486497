import logging
import os

import pytest

from ser_cache.data.corpus import load_corpus
from ser_cache.data.manifest import read_manifest
from ser_cache.data.msp_podcast import TEST3_SPLIT, UNLISTED_SPLIT, unlisted_split
from ser_cache.data.records import CorpusError
from ser_cache.features.store_ref import ids_digest

from factories import msp_corpus, tone, write_wav


def test_msp_layout(corpus):
    utts = load_corpus(corpus)
    assert len(utts) == 14  # 12 labelled + 2 unlabeled
    assert [u.id for u in utts] == sorted(u.id for u in utts)
    labelled = [u for u in utts if u.split != TEST3_SPLIT]
    assert len(labelled) == 12
    u = labelled[0]
    assert u.id.startswith("MSP-PODCAST_") and u.path.name == u.id and u.path.is_file()
    assert u.has_avd and 1 <= u.arousal <= 7
    assert u.read_text()  # from Transcripts/<stem>.txt
    # "Unknown" speakers become None
    assert any(x.speaker is None for x in labelled) and any(x.speaker for x in labelled)


def test_unlabeled_audio_is_the_test3_split(corpus):
    test3 = load_corpus(corpus, ["test3"])  # case-insensitive
    assert [u.id for u in test3] == ["MSP-PODCAST_test3_0001.wav", "MSP-PODCAST_test3_0002.wav"]
    assert all(u.arousal is None and u.emotion is None for u in test3)


def test_unlisted_files_are_test3_only_when_named_so(tmp_path, caplog):
    data = msp_corpus(tmp_path / "c", n=6, unlabeled=1)
    for name in ("MSP-PODCAST_TEST3_0002.wav", "msp-podcast_Test3_0003.flac", "MSP-PODCAST_9999_0001.wav",
                 "stray_recording.wav"):
        write_wav(data / "Audios" / name, tone(1.0))
    (data / "Audios" / "notes.txt").write_text("not audio\n")
    with caplog.at_level(logging.INFO, logger="ser_cache.data.msp_podcast"):
        utts = {u.id: u for u in load_corpus(data)}
    assert len(utts) == 6 + 1 + 4  # the .txt file is not audio
    assert {i for i, u in utts.items() if u.split == TEST3_SPLIT} == {
        "MSP-PODCAST_test3_0001.wav", "MSP-PODCAST_TEST3_0002.wav", "msp-podcast_Test3_0003.flac"}
    assert {i for i, u in utts.items() if u.split == UNLISTED_SPLIT} == {"MSP-PODCAST_9999_0001.wav",
                                                                         "stray_recording.wav"}
    assert "5 audio file(s) not in" in caplog.text and "3 named as Test3" in caplog.text and "2 others" in caplog.text
    assert len(load_corpus(data, ["Test3"])) == 3 and len(load_corpus(data, ["unlabeled"])) == 2
    assert (unlisted_split("a_tEsT3_b.wav") == TEST3_SPLIT
            and unlisted_split("MSP-PODCAST_0003_0001.wav") == UNLISTED_SPLIT)


def test_listed_test3_rows_are_used_as_listed(tmp_path):
    data = msp_corpus(tmp_path / "c", n=4, unlabeled=0)
    labels = data / "Labels" / "labels_consensus.csv"
    write_wav(data / "Audios" / "MSP-PODCAST_0500_0001.wav", tone(1.0))  # no "test3" in the name
    write_wav(data / "Audios" / "MSP-PODCAST_test3_0007.wav", tone(1.0))  # listed under another split
    labels.write_text(labels.read_text() + "MSP-PODCAST_0500_0001.wav,N,4.0,4.0,4.0,7,Male,Test3\n"
                      "MSP-PODCAST_test3_0007.wav,H,5.0,5.5,4.5,8,Female,Development\n")
    utts = {u.id: u for u in load_corpus(data)}
    assert utts["MSP-PODCAST_0500_0001.wav"].split == "Test3" and utts["MSP-PODCAST_0500_0001.wav"].arousal == 4.0
    assert (utts["MSP-PODCAST_test3_0007.wav"].split == "Development"
            and utts["MSP-PODCAST_test3_0007.wav"].valence == 5.5)
    assert [u.id for u in load_corpus(data, ["Test3"])] == ["MSP-PODCAST_0500_0001.wav"]


def test_byte_order_mark_in_labels_file_is_accepted(corpus):
    labels = corpus / "Labels" / "labels_consensus.csv"
    plain = load_corpus(corpus)
    labels.write_bytes(b"\xef\xbb\xbf" + labels.read_bytes())
    assert load_corpus(corpus) == plain


def test_split_selection_and_unknown_split(corpus):
    train = load_corpus(corpus, ["Train"])
    assert train and all(u.split == "Train" for u in train)
    with pytest.raises(CorpusError, match="--split Dev: not a split.*Development"):
        load_corpus(corpus, ["Dev"])


def test_missing_data_and_wrong_layout(tmp_path):
    with pytest.raises(CorpusError, match="no such directory"):
        load_corpus(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="not an MSP-Podcast layout"):
        load_corpus(tmp_path / "empty")


def test_bad_label_value_names_file_line_and_column(corpus):
    f = corpus / "Labels" / "labels_consensus.csv"
    lines = f.read_text().splitlines()
    parts = lines[3].split(",")
    parts[2] = "high"
    lines[3] = ",".join(parts)
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(CorpusError, match=r"labels_consensus.csv, line 4: column EmoAct is 'high'"):
        load_corpus(corpus)


def test_duplicate_filename_is_an_error(corpus):
    f = corpus / "Labels" / "labels_consensus.csv"
    lines = f.read_text().splitlines()
    f.write_text("\n".join(lines + [lines[1]]) + "\n")
    with pytest.raises(CorpusError, match="listed twice"):
        load_corpus(corpus)


def test_manifest(tmp_path):
    write_wav(tmp_path / "audio" / "a.wav", tone(1.0))
    write_wav(tmp_path / "audio" / "b.wav", tone(1.0))
    (tmp_path / "audio" / "b.txt").write_text("sidecar text\n")
    m = tmp_path / "m.csv"
    m.write_text(
        "path,id,split,arousal,valence,dominance,emotion,gender,speaker,text\n"
        "audio/a.wav,utt-a,train,4.0,3.5,,h,Female,s1,hello there\n"
        "audio/b.wav,,test,NaN,,,,,,\n"
    )
    by_id = {u.id: u for u in load_corpus(m)}
    a, b = by_id["utt-a"], by_id["b.wav"]
    assert a.id == "utt-a" and a.path == tmp_path / "audio" / "a.wav" and a.emotion == "H"
    assert a.arousal == 4.0 and a.dominance is None and not a.has_avd
    assert a.read_text() == "hello there"
    assert b.id == "b.wav" and b.arousal is None and b.read_text() == "sidecar text"


def test_byte_order_mark_in_manifest_is_accepted(tmp_path):
    write_wav(tmp_path / "a.wav", tone(1.0))
    m = tmp_path / "m.csv"
    m.write_bytes("path,id,split,arousal\na.wav,utt-a,test,3.5\n".encode("utf-8-sig"))
    (u,) = read_manifest(m)
    assert (u.id, u.split, u.arousal) == ("utt-a", "test", 3.5)


def test_manifest_errors(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text("file,label\nx.wav,1\n")
    with pytest.raises(CorpusError, match="needs a 'path' column"):
        read_manifest(m)
    m.write_text("path,id\na.wav,x\nb.wav,x\n")
    with pytest.raises(CorpusError, match="line 3: id x already used on line 2"):
        read_manifest(m)


# --------------------------------------------------------------------------- damaged corpora


def set_cell(corpus, line: int, column: str, value: str):
    """Write `value` into `column` of the labels file's `line` (1-based, the header is line 1)."""
    f = corpus / "Labels" / "labels_consensus.csv"
    lines = f.read_text().splitlines()
    col = lines[0].split(",").index(column)
    parts = lines[line - 1].split(",")
    parts[col] = value
    lines[line - 1] = ",".join(parts)
    f.write_text("\n".join(lines) + "\n")
    return parts[0]  # the FileName


@pytest.mark.parametrize("value", ["70", "-3", "0", "7.01", "0.99"])
def test_label_outside_1_to_7_names_file_line_column_and_value(corpus, value):
    set_cell(corpus, 12, "EmoAct", value)
    with pytest.raises(CorpusError, match=rf"labels_consensus.csv, line 12: EmoAct {value} is outside the scale 1–7$"):
        load_corpus(corpus)


def test_labels_on_the_ends_of_the_scale_are_kept(corpus):
    name = set_cell(corpus, 3, "EmoVal", "1")
    set_cell(corpus, 3, "EmoDom", "7.0")
    (u,) = [u for u in load_corpus(corpus) if u.id == name]
    assert (u.valence, u.dominance) == (1.0, 7.0)


def test_out_of_scale_rows_can_be_excluded_with_a_warning(corpus, caplog):
    plain = load_corpus(corpus)
    bad = [set_cell(corpus, 5, "EmoDom", "70"), set_cell(corpus, 9, "EmoVal", "0")]
    with caplog.at_level(logging.WARNING, logger="ser_cache.data.records"):
        utts = load_corpus(corpus, out_of_scale="exclude")
    assert [u.id for u in utts] == [u.id for u in plain if u.id not in bad]  # gone, not back as Unlabeled
    assert "excluded 2 row(s) with labels outside the scale 1–7" in caplog.text
    assert f"line 5 ({bad[0]}: EmoDom 70)" in caplog.text and f"line 9 ({bad[1]}: EmoVal 0)" in caplog.text
    with pytest.raises(CorpusError, match="out_of_scale='drop'"):
        load_corpus(corpus, out_of_scale="drop")


@pytest.mark.parametrize("value", ["inf", "-inf", "Infinity", "nan", "NaN"])
def test_non_finite_label_is_an_error(corpus, value):
    set_cell(corpus, 7, "EmoVal", value)
    with pytest.raises(CorpusError, match=rf"labels_consensus.csv, line 7: column EmoVal is '{value}', expected a"):
        load_corpus(corpus)


@pytest.mark.parametrize("column", ["EmoAct", "EmoDom", "EmoClass"])
def test_missing_label_column_names_the_column_and_the_file(corpus, column):
    f = corpus / "Labels" / "labels_consensus.csv"
    rows = [line.split(",") for line in f.read_text().splitlines()]
    col = rows[0].index(column)
    f.write_text("".join(",".join(r[:col] + r[col + 1:]) + "\n" for r in rows))
    with pytest.raises(CorpusError, match=rf"labels_consensus.csv: missing column\(s\) {column}; found FileName,"):
        load_corpus(corpus)


def test_spaces_around_header_names_are_ignored(corpus):
    f = corpus / "Labels" / "labels_consensus.csv"
    lines = f.read_text().splitlines()
    lines[0] = lines[0].replace("EmoAct", " EmoAct ")
    plain = load_corpus(corpus)
    f.write_text("\n".join(lines) + "\n")
    assert load_corpus(corpus) == plain


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"], ids=["plain", "with-bom"])
def test_latin1_labels_file_is_one_clear_error(corpus, bom):
    f = corpus / "Labels" / "labels_consensus.csv"
    lines = f.read_text().splitlines()
    lines[4] = lines[4].replace("Female", "Fémale").replace("Male", "Mâle")
    data = bom + ("\n".join(lines) + "\n").encode("latin-1")
    f.write_bytes(data)
    at = data.index(b"\xe9" if b"\xe9" in data else b"\xe2")
    with pytest.raises(CorpusError, match=rf"labels_consensus.csv, line 5 \(byte offset {at}\): byte 0x(e9|e2) is not "
                                          "UTF-8; the file must be UTF-8"):
        load_corpus(corpus)


def test_latin1_manifest_is_one_clear_error(tmp_path):
    write_wav(tmp_path / "a.wav", tone(1.0))
    m = tmp_path / "m.csv"
    m.write_bytes("path,id,text\na.wav,a,caf\xe9 au lait\n".encode("latin-1"))  # é is byte 13 + 11
    with pytest.raises(CorpusError, match=r"m.csv, line 2 \(byte offset 24\): byte 0xe9 is not UTF-8"):
        load_corpus(m)


def test_audio_file_name_that_is_not_utf8_is_skipped_with_a_warning(corpus, caplog):
    plain = load_corpus(corpus)
    audios = os.fsencode(corpus / "Audios")
    for name in (b"bad\xff.wav", b"MSP-PODCAST_test3_\xe9t\xe9.wav"):
        with open(os.path.join(audios, name), "wb") as f:
            f.write((corpus / "Audios" / plain[0].id).read_bytes())
    assert len(os.listdir(audios)) == len(plain) + 2  # the files are really there
    with caplog.at_level(logging.WARNING, logger="ser_cache.data.msp_podcast"):
        utts = load_corpus(corpus)
    assert utts == plain
    assert "skipped 2 audio file(s) whose names are not valid UTF-8; rename them" in caplog.text
    assert r"b'bad\xff.wav'" in caplog.text and r"b'MSP-PODCAST_test3_\xe9t\xe9.wav'" in caplog.text
    ids_digest([u.id for u in utts])  # what crashed on a surrogate-escaped id
    assert all(u.id.encode("utf-8") and str(u.path).encode("utf-8") for u in utts)


def test_msp_folder_without_audio_is_an_error_naming_the_folder(corpus):
    audios = corpus / "Audios"
    for p in audios.iterdir():
        p.unlink()
    (audios / "readme.txt").write_text("audio comes later\n")
    with pytest.raises(CorpusError, match=rf"{audios}: no audio files \(.wav, .flac, .ogg, .mp3\)"):
        load_corpus(corpus)
    for p in audios.iterdir():
        p.unlink()
    audios.rmdir()
    with pytest.raises(CorpusError, match=rf"{corpus}: no Audios/ folder"):
        load_corpus(corpus)


# --------------------------------------------------------------------------- manifests and their scale


def test_manifest_labels_are_checked_against_1_to_7_by_default(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text("path,id,arousal,valence\na.wav,a,4,4\nb.wav,b,3,70\n")
    with pytest.raises(CorpusError, match=r"m.csv, line 3: valence 70 is outside the scale 1–7; a manifest on "
                                          "another scale declares it on its first line: # label_scale: LOW HIGH"):
        load_corpus(m)
    m.write_text("path,id,arousal\na.wav,a,inf\n")
    with pytest.raises(CorpusError, match=r"m.csv, line 2: column arousal is 'inf', expected a finite number"):
        load_corpus(m)


@pytest.mark.parametrize("declaration", ["# label_scale: 0 1", "# label_scale = 0..1", "#label_scale: 0-1",
                                         '"# label_scale: 0, 1",,', "# LABEL_SCALE: 0 to 1"])
def test_manifest_may_declare_its_scale_on_its_first_line(tmp_path, declaration):
    m = tmp_path / "m.csv"
    m.write_text(f"{declaration}\npath,id,arousal,dominance\na.wav,a,0.25,1\nb.wav,b,0,0.5\n")
    assert [(u.id, u.arousal, u.dominance) for u in load_corpus(m)] == [("a", 0.25, 1.0), ("b", 0.0, 0.5)]
    m.write_text(f"{declaration}\npath,id,arousal,dominance\na.wav,a,0.25,1\nb.wav,b,4,0.5\n")
    with pytest.raises(CorpusError, match=r"m.csv, line 4: arousal 4 is outside the scale 0–1"):
        load_corpus(m)


def test_manifest_scale_none_and_the_label_scale_option(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text("# label_scale: none\npath,id,arousal\na.wav,a,70\n")
    assert load_corpus(m)[0].arousal == 70.0
    assert load_corpus(m, label_scale=(0, 100))[0].arousal == 70.0
    with pytest.raises(CorpusError, match="line 3: arousal 70 is outside the scale 1–5"):
        load_corpus(m, label_scale=(1, 5))  # the caller's scale wins over the declaration
    m.write_text("path,id,arousal\na.wav,a,70\n")
    assert load_corpus(m, label_scale="none")[0].arousal == 70.0
    m.write_text("# label_scale: seven\npath,id\na.wav,a\n")
    with pytest.raises(CorpusError, match=r"m.csv, line 1: label_scale 'seven': expected two numbers LOW HIGH"):
        load_corpus(m)
    with pytest.raises(CorpusError, match=r"label_scale=\(7, 1\): expected low < high"):
        load_corpus(m, label_scale=(7, 1))


def test_manifest_line_numbers_count_multi_line_transcripts(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text('path,id,arousal,text\na.wav,a,4,"two\nlines"\nb.wav,b,4,\nc.wav,c,high,\n')
    with pytest.raises(CorpusError, match=r"m.csv, line 5: column arousal is 'high'"):
        load_corpus(m)
