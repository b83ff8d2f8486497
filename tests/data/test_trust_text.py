"""Trust in what is read: corpus paths that leave the corpus, the text a text input is given and
recorded with, transcript tables and sidecars that are not what they claim, Predictor inputs.

Each test builds its own bad input (issue 17, items 2, 7, 8, 9 and the related refusals).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from ser_cache.data import transcripts
from ser_cache.data.corpus import load_corpus
from ser_cache.data.records import CorpusError
from ser_cache.data.transcripts import TranscriptError, load_table, read_sidecar, read_table, record_path
from ser_cache.features import transcribe, transcript_table
from ser_cache.features.errors import ExtractError
from ser_cache.features.extract import ExtractConfig, extract
from ser_cache.runs.predict import PredictError, evaluate, predict

from factories import msp_corpus, tone, write_wav
from synthetic import make_corpus, make_store, train

TEST3 = ("MSP-PODCAST_test3_0001.wav", "MSP-PODCAST_test3_0002.wav")


def add_label_row(corpus: Path, file_name: str) -> int:
    """Append a labelled row for `file_name`; returns its line number."""
    labels = corpus / "Labels" / "labels_consensus.csv"
    lines = labels.read_text().splitlines()
    lines.append(f"{file_name},N,4.0,4.0,4.0,77,Female,Train")
    labels.write_text("\n".join(lines) + "\n")
    return len(lines)


def write_table(path: Path, rows: dict[str, str]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["FileName", "text"])
        w.writerows(rows.items())
    return path


# --------------------------------------------------------------------------- corpus paths (item 2)


@pytest.mark.parametrize("name, why", [
    ("../../elsewhere/x.wav", "a path with a '..' part"),
    ("../../../../etc/passwd", "a path with a '..' part"),
    ("..\\..\\elsewhere\\x.wav", "a path with a '..' part"),
    ("ABSOLUTE", "an absolute path"),
])
def test_a_label_filename_outside_audios_is_refused_naming_the_file_and_line(tmp_path, name, why):
    corpus = msp_corpus(tmp_path / "data" / "corpus", n=4, unlabeled=0)
    # Real audio where the name points, so that the old reader made a row of it.
    outside = write_wav(tmp_path / "elsewhere" / "x.wav", tone(1.0))
    name = str(outside) if name == "ABSOLUTE" else name
    line = add_label_row(corpus, name)
    with pytest.raises(CorpusError) as info:
        load_corpus(corpus)
    message = str(info.value)
    assert message.startswith(f"{corpus / 'Labels' / 'labels_consensus.csv'}, line {line}: FileName {name!r} is {why}")
    assert f"a file inside {corpus / 'Audios'}" in message and "\n" not in message


def test_a_manifest_path_leaving_its_folder_is_refused_and_absolute_paths_are_allowed(tmp_path):
    audio = write_wav(tmp_path / "audio" / "a.wav", tone(1.0))
    lists = tmp_path / "lists"
    lists.mkdir()
    m = lists / "m.csv"
    m.write_text("path,id\n../audio/a.wav,a\n")
    with pytest.raises(CorpusError, match=rf"^{m}, line 2: path '../audio/a.wav' is a path with a '\.\.' part .*"
                                          rf"must stay inside the manifest's folder {lists}: write the absolute path"):
        load_corpus(m)
    m.write_text("path,id\nsub/../../audio/a.wav,a\n")
    with pytest.raises(CorpusError, match=rf"{m}, line 2: path 'sub/\.\./\.\./audio/a\.wav'"):
        load_corpus(m)
    # An absolute path says plainly where it reads: a manifest may point at audio kept anywhere.
    m.write_text(f"path,id\n{audio},a\n")
    assert [u.path for u in load_corpus(m)] == [audio]


def test_links_inside_audios_are_followed(tmp_path):
    """The documented decision: a symlink in Audios/ is followed (links are made on the machine holding
    the corpus); only the text of FileName is checked."""
    corpus = msp_corpus(tmp_path / "corpus", n=4, unlabeled=0)
    outside = write_wav(tmp_path / "big-disk" / "MSP-PODCAST_0900_0001.wav", tone(1.0))
    (corpus / "Audios" / outside.name).symlink_to(outside)
    add_label_row(corpus, outside.name)
    u = {u.id: u for u in load_corpus(corpus)}[outside.name]
    assert u.path == corpus / "Audios" / outside.name and u.path.resolve() == outside


# --------------------------------------------------------------------------- transcript tables (item 8)


def test_a_table_row_with_an_unquoted_comma_is_refused_naming_the_line(tmp_path):
    t = tmp_path / "t.csv"
    t.write_text('id,text\nu1,"quoted, fine"\nu2,"two\nlines"\nu3,you know, the interview\n')
    with pytest.raises(TranscriptError, match=rf"^{t}, line 5: 3 fields, the header has 2 \(id, text\); a text "
                                              r"with a comma must be quoted"):
        read_table(t)
    t.write_text('id,text\nu1,"quoted, fine"\n')
    assert read_table(t) == {"u1": "quoted, fine"}


# ------------------------------------------------------------------ sidecars and journals (item "no tracebacks")


@pytest.mark.parametrize("content, found", [
    ("[]", "found an array"),
    ('{"settings": "whisper"}', "found 'settings' that is a string"),
    ('{"model": "x"}', "found no 'settings'"),
])
def test_a_sidecar_that_is_not_an_object_with_settings_is_one_error(tmp_path, content, found):
    out = tmp_path / "asr.csv"
    write_table(out, {"a.wav": "hello"})
    transcripts.sidecar_path(out).write_text(content)
    cfg = transcribe.TranscribeConfig(out=out, data=tmp_path, device="cpu", progress=False)
    with pytest.raises(transcribe.TranscribeError,
                       match=rf"^{transcripts.sidecar_path(out)}: expected the settings file transcribe "
                             rf"writes .*{found}; pass --overwrite"):
        transcribe.done_rows(cfg, {"model_id": "m"})
    # predict/extract read the same sidecar beside a --transcripts table.
    with pytest.raises(TranscriptError, match=rf"^{transcripts.sidecar_path(out)}: expected the settings .*{found}"):
        read_sidecar(out)


def test_a_journal_with_bytes_that_are_not_utf8_is_one_error(tmp_path):
    out = tmp_path / "asr.csv"
    settings = {"model_id": "m", "revision": "r"}
    transcript_table.write_sidecar(transcripts.sidecar_path(out), {"settings": settings})
    transcript_table.journal_path(out).write_bytes(b"FileName,text\na.wav,fine\nb.wav,caf\xe9 noir\n")
    cfg = transcribe.TranscribeConfig(out=out, data=tmp_path, device="cpu", progress=False)
    with pytest.raises(transcribe.TranscribeError,
                       match=rf"^{transcript_table.journal_path(out)}, line 3 \(byte offset 34\): byte 0xe9 "
                             r"is not UTF-8; .*--overwrite"):
        transcribe.done_rows(cfg, settings)
    again = transcribe.TranscribeConfig(out=out, data=tmp_path, overwrite=True)
    assert transcribe.done_rows(again, settings) == ({}, None)


# --------------------------------------------------------------------------- a cheap run on made-up stores


@pytest.fixture(scope="module")
def made_up_run(tmp_path_factory):
    """A heads run on an audio and a text store made up (no encoder behind them)."""
    root = tmp_path_factory.mktemp("made-up")
    manifest, ids, feats = make_corpus(root / "corpus", 120)
    stores = [make_store(root / "features" / "audio.zarr", ids, feats["audio"]),
              make_store(root / "features" / "text.zarr", ids, feats["text"], kind="text", modality="text")]
    result, _ = train(root, manifest, stores, epochs=2)
    return result.run_dir, manifest


def test_a_features_dir_that_does_not_exist_is_refused(tmp_path, made_up_run):
    run, manifest = made_up_run
    missing = tmp_path / "moved-stores"
    with pytest.raises(PredictError, match=rf"^--features-dir {missing}: no such folder"):
        predict(run, data=manifest, splits=["Test1"], out=tmp_path / "p.csv", device="cpu", features_dir=missing)
    with pytest.raises(PredictError, match=rf"^--features-dir {missing}: no such folder"):
        evaluate(run, manifest, "Test1", out=tmp_path / "e.json", device="cpu", features_dir=missing)
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    with pytest.raises(PredictError, match=rf"^--features-dir {a_file}: not a folder"):
        predict(run, data=manifest, splits=["Test1"], out=tmp_path / "p.csv", device="cpu", features_dir=a_file)
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "e.json").exists()


def test_a_table_that_has_no_row_for_an_utterance_says_which_columns_it_read(tmp_path, made_up_run):
    run, _ = made_up_run
    clips = [write_wav(tmp_path / f"clip{i}.wav", tone(1.0, seed=i)) for i in range(2)]
    table = tmp_path / "asr.csv"
    table.write_text("id,FileName,text\n1,clip0.wav,hello\n2,clip1.wav,there\n")
    with pytest.raises(PredictError) as info:
        predict(run, files=clips, transcripts=table, out=tmp_path / "p.csv", device="cpu")
    message = str(info.value)
    assert message.startswith(f"{clips[0]}: no transcript for the text input 'text' (and 1 more); --transcripts "
                              f"{table} has no text for it (rows matched by its column id")
    assert "columns found: id, FileName, text; expected FileName (or id) and text; FileName is not used" in message
    assert "give --transcripts FILE" not in message


# --------------------------------------------------------------------------- Predictor inputs (item 9), cheap part


def test_predictor_refuses_missing_texts_and_a_sample_rate_that_is_not_positive(made_up_run):
    from ser_cache import Predictor

    predictor = Predictor.from_run(made_up_run[0])
    wave = tone(1.0)
    for missing in (None, float("nan")):
        with pytest.raises(ValueError, match=rf"^predict: texts\[1\] is {missing!r}, not a str; every input needs"):
            predictor.predict([wave, wave], texts=["fine", missing])
    for rate in (0, -16000, 16000.5, float("nan")):
        with pytest.raises(ValueError, match=rf"^predict: sample_rate={rate!r}: expected the waveforms' rate .*"
                                             r"a positive whole number"):
            predictor.predict(wave, texts=["fine"], sample_rate=rate)
    with pytest.raises(ValueError, match=r"input 0: integer samples of type int64, which is no PCM format"):
        predictor.predict(np.zeros(16000, dtype=np.int64), texts=["fine"])


# --------------------------------------------------------------------------- a run on real encoders


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, models):
    """Whisper (audio) and MiniLM (text) stores over Train and Development, and a run trained on them."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("real")
    corpus = msp_corpus(root / "corpus")
    stores = []
    for name, model in (("audio", models["whisper"]), ("text", models["text"])):
        cfg = ExtractConfig(model=str(model), data=corpus, out=root / "f", name=name, splits=("Train", "Development"),
                            device="cpu", workers=0, progress=False)
        stores.append(extract(cfg).store)
    result, _ = train(root, corpus, stores, epochs=2, lr=1e-3, batch_size=4, select="ccc")
    yield result.run_dir, corpus, stores[1]
    torch.set_num_threads(threads)


def test_prefer_transcripts_predicts_from_the_tables_text_where_the_store_holds_the_corpus_text(tmp_path, real_run):
    from ser_cache.runs.prediction_file import read_predictions

    run, shared, text_store = real_run
    corpus = shutil.copytree(shared, tmp_path / "corpus")
    dev = [u.id for u in load_corpus(corpus, ["Development"])]
    ref = predict(run, data=corpus, splits=["Development"], out=tmp_path / "ref.csv", device="cpu")
    assert ref.sources["text"].startswith("store ")
    table = write_table(tmp_path / "asr.csv", {uid: f"something else entirely number {i}" for i, uid in enumerate(dev)})
    p = predict(run, data=corpus, splits=["Development"], transcripts=table, prefer_transcripts=True,
                out=tmp_path / "p.csv", device="cpu")
    # The text used is the table's: computed here, not the store's rows of the corpus text.
    assert not np.allclose(read_predictions(p.out)[1], read_predictions(ref.out)[1], atol=1e-4)
    assert p.sources["text"].startswith("encoder ")
    assert p.sources["text"].endswith(f"({len(dev)} rows, {len(dev)} of them held by the store with other text)")
    assert p.text["rows"] == {"corpus": 0, "table": len(dev), "none": 0} and p.text["table"] == str(table)
    assert ref.text["rows"] == {"corpus": len(dev), "table": 0, "none": 0} and ref.text["table"] is None
    # ... the same as a corpus whose own transcripts say what the table says.
    for i, uid in enumerate(dev):
        (corpus / "Transcripts" / uid.replace(".wav", ".txt")).write_text(f"something else entirely number {i}\n")
    own = predict(run, data=corpus, splits=["Development"], out=tmp_path / "own.csv", device="cpu")
    np.testing.assert_allclose(read_predictions(own.out)[1], read_predictions(p.out)[1], atol=1e-5)
    # evaluate writes which text it scored.
    e = evaluate(run, corpus, "Development", out=tmp_path / "e.json", device="cpu", transcripts=table,
                 prefer_transcripts=True)
    written = json.loads((tmp_path / "e.json").read_text())
    assert written["text"]["table"] == str(table) and written["text"]["prefer"] is True
    assert written["text"]["rows"]["table"] == e["rows"] and written["text"]["table_sha256"] == load_table(table).sha256


def test_a_text_store_without_its_record_serves_no_row_that_has_text(tmp_path, real_run):
    from ser_cache.runs.prediction_file import read_predictions

    run, shared, text_store = real_run
    ref = predict(run, data=shared, splits=["Development"], out=tmp_path / "ref.csv", device="cpu")
    features = shutil.copytree(Path(text_store).parent, tmp_path / "features")
    record_path(features / Path(text_store).name).unlink()
    p = predict(run, data=shared, splits=["Development"], out=tmp_path / "p.csv", device="cpu", features_dir=features)
    assert p.sources["text"].startswith("encoder ") and p.sources["audio"].startswith("store ")
    # The same text, so (near) the same features as the store's.
    np.testing.assert_allclose(read_predictions(p.out)[1], read_predictions(ref.out)[1], atol=1e-3)


def test_predictor_scales_integer_pcm_as_the_wav_file_it_came_from(tmp_path, real_run):
    from ser_cache import Predictor

    predictor = Predictor.from_run(real_run[0])
    clip = sorted((real_run[1] / "Audios").glob("*.wav"))[0]  # 16-bit PCM, as most WAV files are
    pcm16, rate = sf.read(clip, dtype="int16")  # the samples scipy.io.wavfile.read gives
    assert rate == 16000 and np.abs(pcm16).max() > 1000
    u8 = ((pcm16.astype(np.int32) >> 8) + 128).astype(np.uint8)  # an 8-bit WAV's unsigned samples
    file_u8 = tmp_path / "u8.wav"
    sf.write(file_u8, ((u8.astype(np.int16) - 128) * 256), rate, subtype="PCM_U8")
    pcm32 = pcm16.astype(np.int32) * 65536 + 12345
    file_32 = tmp_path / "s32.wav"
    sf.write(file_32, pcm32, rate, subtype="PCM_32")
    texts = ["a plain ordinary day"] * 3
    from_files = predictor.predict([str(clip), str(file_u8), str(file_32)], texts=texts)
    from_arrays = predictor.predict([pcm16, u8, pcm32], texts=texts)
    for name in ("arousal", "valence", "dominance"):
        np.testing.assert_array_equal(from_arrays[name], from_files[name])
    # The float waveform the file decodes to gives the same numbers too.
    floats = predictor.predict(pcm16 / np.float32(32768), texts=texts[:1])
    np.testing.assert_array_equal(floats["arousal"], from_files["arousal"][:1])


# --------------------------------------------------------------------------- extract's record (item 7)


def test_extract_refuses_a_store_whose_record_was_deleted_or_replaced(tmp_path, models, one_torch_thread):
    from ser_cache.data.transcripts import text_sha1

    corpus = msp_corpus(tmp_path / "corpus")
    for name in TEST3:
        (corpus / "Transcripts" / name.replace(".wav", ".txt")).unlink()
    first = write_table(tmp_path / "first.csv", {TEST3[0]: "first words", TEST3[1]: "second words"})
    changed = write_table(tmp_path / "changed.csv", {TEST3[0]: "first words", TEST3[1]: "other words"})

    def run(table):
        return extract(ExtractConfig(model=str(models["text"]), data=corpus, out=tmp_path / "f", name="minilm",
                                     device="cpu", workers=0, progress=False, transcripts=table))

    r = run(first)
    assert r.written == 14
    record = record_path(r.store)
    kept = record.read_bytes()
    record.unlink()
    with pytest.raises(ExtractError, match=r"minilm.zarr: its transcript record minilm.transcripts.csv is missing, so "
                                           r"nothing says which text its 14 written row\(s\) were encoded from; "
                                           r"restore the record, or pass --overwrite"):
        run(changed)
    assert not record.exists()
    # A record rewritten to claim the new text is not the one the store vouches for.
    record.write_bytes(kept.replace(text_sha1("second words").encode(), text_sha1("other words").encode()))
    with pytest.raises(ExtractError, match=r"minilm.transcripts.csv is not the one extract wrote"):
        run(changed)
    record.write_bytes(kept)
    with pytest.raises(ExtractError, match=r"1 row\(s\) already written were encoded from other text"):
        run(changed)
    assert run(first).computed == 0


def test_a_table_that_is_not_utf8_is_named_with_the_files_own_offset(tmp_path):
    t = tmp_path / "big.csv"
    rows = "".join(f"u{i:05d}.wav,a perfectly ordinary line of text\n" for i in range(1000))  # past one read buffer
    t.write_bytes(("FileName,text\n" + rows).encode() + b"late.wav,caf\xe9\n")
    at = len(("FileName,text\n" + rows).encode()) + len(b"late.wav,caf")
    with pytest.raises(TranscriptError, match=rf"^{t}: not UTF-8 text \(byte 0xe9 at byte offset {at}, line 1002\)"):
        read_table(t)
