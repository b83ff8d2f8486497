import logging

import pytest

from factories import msp_corpus, tone, write_wav
from ser_cache.corpus import TEST3_SPLIT, UNLISTED_SPLIT, CorpusError, load_corpus, read_manifest, unlisted_split


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
    with caplog.at_level(logging.INFO, logger="ser_cache.corpus"):
        utts = {u.id: u for u in load_corpus(data)}
    assert len(utts) == 6 + 1 + 4  # the .txt file is not audio
    assert {i for i, u in utts.items() if u.split == TEST3_SPLIT} == {
        "MSP-PODCAST_test3_0001.wav", "MSP-PODCAST_TEST3_0002.wav", "msp-podcast_Test3_0003.flac"}
    assert {i for i, u in utts.items() if u.split == UNLISTED_SPLIT} == {"MSP-PODCAST_9999_0001.wav", "stray_recording.wav"}
    assert "5 audio file(s) not in" in caplog.text and "3 named as Test3" in caplog.text and "2 others" in caplog.text
    assert len(load_corpus(data, ["Test3"])) == 3 and len(load_corpus(data, ["unlabeled"])) == 2
    assert unlisted_split("a_tEsT3_b.wav") == TEST3_SPLIT and unlisted_split("MSP-PODCAST_0003_0001.wav") == UNLISTED_SPLIT


def test_listed_test3_rows_are_used_as_listed(tmp_path):
    data = msp_corpus(tmp_path / "c", n=4, unlabeled=0)
    labels = data / "Labels" / "labels_consensus.csv"
    write_wav(data / "Audios" / "MSP-PODCAST_0500_0001.wav", tone(1.0))  # no "test3" in the name
    write_wav(data / "Audios" / "MSP-PODCAST_test3_0007.wav", tone(1.0))  # listed under another split
    labels.write_text(labels.read_text() + "MSP-PODCAST_0500_0001.wav,N,4.0,4.0,4.0,7,Male,Test3\n"
                      "MSP-PODCAST_test3_0007.wav,H,5.0,5.5,4.5,8,Female,Development\n")
    utts = {u.id: u for u in load_corpus(data)}
    assert utts["MSP-PODCAST_0500_0001.wav"].split == "Test3" and utts["MSP-PODCAST_0500_0001.wav"].arousal == 4.0
    assert utts["MSP-PODCAST_test3_0007.wav"].split == "Development" and utts["MSP-PODCAST_test3_0007.wav"].valence == 5.5
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
