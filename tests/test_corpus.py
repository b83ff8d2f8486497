import pytest

from factories import tone, write_wav
from ser_cache.corpus import UNLABELED_SPLIT, CorpusError, load_corpus, read_manifest


def test_msp_layout(corpus):
    utts = load_corpus(corpus)
    assert len(utts) == 14  # 12 labelled + 2 unlabeled
    assert [u.id for u in utts] == sorted(u.id for u in utts)
    labelled = [u for u in utts if u.split != UNLABELED_SPLIT]
    assert len(labelled) == 12
    u = labelled[0]
    assert u.id.startswith("MSP-PODCAST_") and u.path.name == u.id and u.path.is_file()
    assert u.has_avd and 1 <= u.arousal <= 7
    assert u.read_text()  # from Transcripts/<stem>.txt
    # "Unknown" speakers become None
    assert any(x.speaker is None for x in labelled) and any(x.speaker for x in labelled)


def test_unlabeled_audio_is_the_test3_split(corpus):
    test3 = load_corpus(corpus, ["test3"])  # case-insensitive
    assert len(test3) == 2
    assert all(u.arousal is None and u.emotion is None for u in test3)


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


def test_manifest_errors(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text("file,label\nx.wav,1\n")
    with pytest.raises(CorpusError, match="needs a 'path' column"):
        read_manifest(m)
    m.write_text("path,id\na.wav,x\nb.wav,x\n")
    with pytest.raises(CorpusError, match="line 3: id x already used on line 2"):
        read_manifest(m)
