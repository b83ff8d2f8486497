"""End-to-end stage one: what lands in the store, resume after a crash, bad input, refusals."""

import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from ser_cache.data import audio
from ser_cache.data.corpus import load_corpus
from ser_cache.encoders import load_encoder
from ser_cache.features.errors import ExtractError
from ser_cache.features.extract import ExtractConfig, extract
from ser_cache.features.report import report_path
from ser_cache.features.store import FeatureStore
from ser_cache.features.store_lock import StoreLock

from factories import msp_corpus, tone, write_wav


def cfg(model, data, out, **kw):
    base = dict(model=str(model), data=data, out=out, device="cpu", workers=0, progress=False)
    base.update(kw)
    return ExtractConfig(**base)


def read(path):
    return FeatureStore.open(path).read()


@pytest.mark.slow
def test_store_rows_equal_an_online_forward_pass(models, corpus, tmp_path):
    for kind, kw in [("whisper", {}), ("whisper", {"window": "trimmed", "name": "wt"}), ("wavlm", {}),
                     ("xvector", {}), ("text", {"name": "minilm"})]:
        r = extract(cfg(models[kind], corpus, tmp_path / "f", **kw))
        ids, feats, written = read(r.store)
        assert written.all() and r.failed == 0 and feats.dtype == np.float16
        utts = {u.id: u for u in load_corpus(corpus)}
        enc = load_encoder(str(models[kind]), device="cpu", precision="fp32",
                           **{k: v for k, v in kw.items() if k != "name"})
        for i in (0, 5, len(ids) - 1):
            u = utts[ids[i]]
            x = u.read_text() if enc.modality == "text" else audio.load(u.path)
            online = enc.encode([x]).numpy()[0]
            np.testing.assert_allclose(feats[i].astype(np.float32), online, rtol=2e-3, atol=2e-3,
                                       err_msg=f"{kind} row {i}")


def test_store_layout_and_attributes(models, corpus, tmp_path):
    r = extract(cfg(models["wavlm"], corpus, tmp_path, pooling="mean+std", chunk_rows=4))
    s = FeatureStore.open(r.store)
    a = s.attrs
    assert r.store.name == "wavlm-tiny.zarr"
    assert s.feature_shape == (3, 64)  # 2 layers + CNN output, mean and std of 32 dims
    for key in ("model_id", "revision", "kind", "window", "pooling", "max_seconds", "sample_rate", "dtype",
                "package_version", "fingerprint"):
        assert key in a, key
    assert a["kind"] == "wavlm" and a["pooling"] == "mean+std" and a["complete"] is True
    assert s.group["features"].chunks == (4, 3, 64)


@pytest.mark.slow
def test_resume_after_interruption_gives_identical_arrays(models, tmp_path, monkeypatch):
    data = msp_corpus(tmp_path / "c", n=20, unlabeled=0)
    ref = extract(cfg(models["whisper"], data, tmp_path / "ref", chunk_rows=3, workers=1))  # the worker-process path

    calls = {"n": 0}
    original = FeatureStore.write_chunk

    def crash_on_third(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as a Ctrl-C mid-run would
        return original(self, *args)

    monkeypatch.setattr(FeatureStore, "write_chunk", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        extract(cfg(models["whisper"], data, tmp_path / "run", chunk_rows=3))
    monkeypatch.setattr(FeatureStore, "write_chunk", original)
    partial = FeatureStore.open(tmp_path / "run" / "whisper-tiny.zarr")
    assert 0 < partial.flags()[0].sum() < 20
    r = extract(cfg(models["whisper"], data, tmp_path / "run", chunk_rows=3))
    assert r.skipped == 6 and r.computed == 14
    a, b = read(ref.store), read(r.store)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_resume_after_kill_9_between_features_and_flags(models, tmp_path):
    """A real SIGKILL in the worst place: inside the third chunk write, before its last array write."""
    data = msp_corpus(tmp_path / "c", n=16, unlabeled=0)
    out = tmp_path / "run"
    script = tmp_path / "killer.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, sys
        import zarr
        from ser_cache.features.store import FeatureStore
        original_write, original_set = FeatureStore.write_chunk, zarr.Array.__setitem__
        state = {{"chunk_writes": 0, "sets": 0}}
        def write_chunk(self, *args):
            state["chunk_writes"] += 1
            state["sets"] = 0
            return original_write(self, *args)
        def setitem(self, key, value):
            if state["chunk_writes"] == 3:
                state["sets"] += 1
                if state["sets"] == 3:  # two of the chunk's three arrays are on disk
                    os.kill(os.getpid(), signal.SIGKILL)
            return original_set(self, key, value)
        FeatureStore.write_chunk = write_chunk
        zarr.Array.__setitem__ = setitem
        from ser_cache.cli.app import main
        sys.argv = ["ser-cache", "extract", "--model", {str(models['whisper'])!r}, "--data", {str(data)!r},
                    "--out", {str(out)!r}, "--chunk-rows", "4", "--device", "cpu", "--workers", "0", "--no-progress"]
        main()
    """))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == -9, p.stderr
    written, _ = FeatureStore.open(out / "whisper-tiny.zarr").flags()
    assert written.sum() == 8  # two chunks declared done; the third was cut short and is not trusted
    # The same command again, in this process (a second process would spend seconds on its imports).
    from typer.testing import CliRunner

    from ser_cache.cli.app import app

    again = CliRunner().invoke(app, ["extract", "--model", str(models["whisper"]), "--data", str(data), "--out",
                                     str(out), "--chunk-rows", "4", "--device", "cpu", "--workers", "0",
                                     "--no-progress"])
    assert again.exit_code == 0, again.output
    ref = extract(cfg(models["whisper"], data, tmp_path / "ref", chunk_rows=4))
    for x, y in zip(read(ref.store), read(out / "whisper-tiny.zarr")):
        np.testing.assert_array_equal(x, y)


def bad_corpus(tmp_path) -> Path:
    data = msp_corpus(tmp_path / "c", n=8, unlabeled=0)
    names = sorted(p.name for p in (data / "Audios").iterdir())
    (data / "Audios" / names[0]).write_bytes(b"RIFF....WAVEnot really audio")  # corrupt
    sf.write(str(data / "Audios" / names[1]), np.zeros(0, dtype=np.float32), 16_000)  # empty
    write_wav(data / "Audios" / names[2], tone(2.0, sr=44_100, channels=2), sr=44_100)  # stereo 44.1 kHz: fine
    (data / "Audios" / names[3]).unlink()  # listed in the labels, file missing
    (data / "Transcripts" / names[4].replace(".wav", ".txt")).unlink()  # no transcript
    return data


@pytest.mark.parametrize("workers", [0, pytest.param(1, marks=pytest.mark.slow)], ids=["in-process", "worker-process"])
def test_bad_files_are_reported_and_skipped(models, tmp_path, workers):
    data = bad_corpus(tmp_path)
    r = extract(cfg(models["whisper"], data, tmp_path / "f", chunk_rows=4, workers=workers))
    ids, feats, written = read(r.store)
    assert r.failed == 3 and written.sum() == 5
    assert np.isfinite(feats.astype(np.float32)).all()
    with open(report_path(r.store), newline="") as f:
        rows = {row["id"]: row for row in csv.DictReader(f)}
    assert len(rows) == 3
    reasons = " | ".join(f"{k}: {v['reason']}" for k, v in sorted(rows.items()))
    assert "unreadable audio" in reasons and "empty audio" in reasons and "file not found" in reasons
    assert all(row["path"].endswith(i) for i, row in rows.items())
    # The stereo 44.1 kHz file was mixed down and resampled, then encoded like any other.
    stereo = [u for u in load_corpus(data) if u.id == ids[2]][0]
    enc = load_encoder(str(models["whisper"]), device="cpu", precision="fp32")
    np.testing.assert_allclose(feats[2].astype(np.float32), enc.encode([audio.load(stereo.path)]).numpy()[0], atol=2e-3)
    # Text: only the missing transcript fails.
    t = extract(cfg(models["text"], data, tmp_path / "f", name="text"))
    with open(report_path(t.store), newline="") as f:
        transcript = data / "Transcripts" / ids[4].replace(".wav", ".txt")
        assert [row["reason"] for row in csv.DictReader(f)] == [f"missing transcript ({transcript})"]


def test_retry_failed_after_fixing_a_file(models, tmp_path):
    data = bad_corpus(tmp_path)
    r = extract(cfg(models["whisper"], data, tmp_path / "f", chunk_rows=4))
    before = read(r.store)
    broken = sorted((data / "Audios").iterdir())[0]
    write_wav(broken, tone(1.0))
    again = extract(cfg(models["whisper"], data, tmp_path / "f", chunk_rows=4))
    assert again.computed == 0 and again.failed == 3  # failures are remembered, not retried by default
    fixed = extract(cfg(models["whisper"], data, tmp_path / "f", chunk_rows=4, retry_failed=True))
    assert fixed.failed == 2
    after = read(fixed.store)
    keep = before[2]  # rows written before stay exactly as they were
    np.testing.assert_array_equal(after[1][keep], before[1][keep])
    with open(report_path(fixed.store), newline="") as f:
        assert broken.name not in {row["id"] for row in csv.DictReader(f)}


def test_on_error_fail_stops_at_the_first_bad_file(models, tmp_path):
    data = bad_corpus(tmp_path)
    with pytest.raises(ExtractError, match=r"--on-error fail") as e:
        extract(cfg(models["whisper"], data, tmp_path / "f", on_error="fail"))
    assert "MSP-PODCAST_" in str(e.value)


def test_different_settings_are_refused_unless_overwrite(models, corpus, tmp_path):
    extract(cfg(models["whisper"], corpus, tmp_path))
    with pytest.raises(ExtractError, match=r"pooling: store has 'mean', this run 'mean\+std'.*--overwrite"):
        extract(cfg(models["whisper"], corpus, tmp_path, pooling="mean+std"))
    with pytest.raises(ExtractError, match="rows"):
        extract(cfg(models["whisper"], corpus, tmp_path, splits=("Train",)))
    r = extract(cfg(models["whisper"], corpus, tmp_path, pooling="mean+std", overwrite=True))
    assert FeatureStore.open(r.store).feature_shape == (64,)


def test_a_concurrent_run_is_refused(models, corpus, tmp_path):
    with StoreLock(tmp_path / "whisper-tiny.zarr"):
        with pytest.raises(ExtractError, match="another extraction"):
            extract(cfg(models["whisper"], corpus, tmp_path))


def test_config_problems_are_listed_together(models, corpus, tmp_path):
    with pytest.raises(ExtractError, match=r"--on-error maybe.*--max-seconds -1"):
        extract(cfg(models["whisper"], corpus, tmp_path, on_error="maybe", max_seconds=-1))


@pytest.mark.slow
def test_mini_podcast_whisper_and_text(models, mini_podcast, tmp_path):
    """The shared 400-utterance corpus in the real layout: every row written, long files cropped."""
    r = extract(cfg(models["whisper"], mini_podcast, tmp_path, pooling="mean+std", splits=("Train", "Development")))
    ids, feats, written = read(r.store)
    assert len(ids) == 302 and written.all()
    t = extract(cfg(models["text"], mini_podcast, tmp_path, name="minilm", splits=("Development",)))
    assert t.written == 59


def test_report_survives_an_empty_partial_file_left_by_a_killed_run(models, tmp_path):
    """A run killed right after opening its partial report leaves an empty file; the next run must still write a
    header."""
    data = bad_corpus(tmp_path)
    out = tmp_path / "f"
    out.mkdir()
    (out / "whisper-tiny.errors.rank0.partial.csv").write_text("")
    r = extract(cfg(models["whisper"], data, out, chunk_rows=4))
    with open(report_path(r.store), newline="") as f:
        assert len(list(csv.DictReader(f))) == 3


@pytest.mark.parametrize("kind,kw",
                         [pytest.param("whisper", {}, marks=pytest.mark.slow), ("whisper", {"window": "trimmed"}),
                          *(pytest.param(k, {}, marks=pytest.mark.slow) for k in ("wavlm", "xvector", "text"))],
                         ids=["whisper", "whisper-trimmed", "wavlm", "xvector", "text"])
def test_bf16_autocast_rows_agree_with_fp32(models, corpus, tmp_path, kind, kw):
    """The GPU's default precision path (autocast to bf16), run on the CPU: it is really taken
    (the rows differ) and agrees with fp32 to bf16 precision."""
    got = {}
    for precision in ("fp32", "bf16"):
        r = extract(cfg(models[kind], corpus, tmp_path / precision, precision=precision, **kw))
        got[precision] = read(r.store)[1].astype(np.float32).reshape(r.rows, -1)
    a, b = got["fp32"], got["bf16"]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.999 and not np.array_equal(a, b)


@pytest.mark.slow
def test_a_file_that_kills_its_decoding_worker_costs_only_that_file(tmp_path):
    """A decoder crash (a segfault on a malformed file, say) takes its worker process down: the
    batch is decoded again file by file, and only the file that kills a worker again fails."""
    from ser_cache.features.decoding import Decoder
    from ser_cache.features.encode import new_timings

    from crashing_decoders import decode_or_die

    names = ["a", "b", "die", "c", "d", "e"]
    files = [str(write_wav(tmp_path / f"{n}.wav", tone(0.5 + 0.1 * i, seed=i))) for i, n in enumerate(names)]
    batches = [files[0:2], files[2:4], files[4:6]]
    decoder = Decoder(2, 15.0, decode=decode_or_die)
    timings = new_timings()
    try:
        got = list(decoder.batches(batches, timings))
    finally:
        decoder.close()
    assert [len(b) for b in got] == [2, 2, 2]
    wave, reason = got[1][0]
    assert wave is None and "crashed the worker process" in reason
    expected = audio.load_many([f for f in files if "die" not in f])
    kept = [w for b in got for w, _ in b if w is not None]
    assert len(kept) == 5 and all(np.array_equal(w, e) for w, (e, _) in zip(kept, expected))
    assert timings["decode_wait"] > 0


class _ScriptedEncoder:
    """Stands in for an encoder in `_encode_stream`: features are the inputs' lengths, "bad"
    makes a batch fail, "nan" gives a non-finite row; every step is logged."""

    frame_level = False

    def __init__(self):
        self.log = []

    def prepare(self, batch):
        import threading

        self.log.append(("prepare", tuple(batch), threading.current_thread().name))
        return batch

    def launch(self, batch):
        import torch

        from ser_cache.encoders.base import Pending

        self.log.append(("launch", tuple(batch)))
        if "bad" in batch:
            raise RuntimeError("boom\nsecond line")
        return Pending(torch.tensor([[float("nan") if x == "nan" else float(len(x))] for x in batch]))


def test_encode_stream_overlaps_batches_and_isolates_a_failing_input():
    from ser_cache.features.encode import _encode_stream, new_timings

    enc = _ScriptedEncoder()
    got = {}

    def resolve(row, value, reason, seconds):
        enc.log.append(("resolve", row))
        got[row] = reason if value is None else float(value[0])

    batches = [([0, 1], ["a", "bb"], [1.0, 1.0]), ([2, 3, 4], ["ccc", "bad", "nan"], [1.0] * 3),
               ([5], ["ddddd"], [1.0])]
    _encode_stream(enc, iter(batches), resolve, new_timings())
    assert got[0] == 1.0 and got[1] == 2.0 and got[2] == 3.0 and got[5] == 5.0
    assert got[3] == "encoder failed (RuntimeError: boom)"  # only the bad input's row, first line only
    assert got[4].startswith("encoder produced non-finite values")
    # Every prepare ran in the helper thread, and batch 2 was launched before batch 1's rows were
    # resolved: the device is never left waiting for the host's bookkeeping.
    assert all(e[2].startswith("ser-cache-prepare") for e in enc.log if e[0] == "prepare")
    assert enc.log.index(("launch", ("ccc", "bad", "nan"))) < enc.log.index(("resolve", 0))


@pytest.mark.slow
def test_workers_that_cannot_run_at_all_stop_the_run_instead_of_failing_every_file(tmp_path):
    from ser_cache.features.decoding import Decoder
    from ser_cache.features.encode import new_timings

    from crashing_decoders import always_die

    files = [str(write_wav(tmp_path / f"{i}.wav", tone(0.5, seed=i))) for i in range(3)]
    decoder = Decoder(1, 15.0, decode=always_die)
    try:
        with pytest.raises(ExtractError, match="--workers 0"):
            list(decoder.batches([files[:2], files[2:]], new_timings()))
    finally:
        decoder.close()


def test_an_all_layers_wavlm_store_from_before_the_final_norm_fix_is_refused(models, corpus, tmp_path):
    """Stores built when the 25th WavLM state was taken before the final layer norm hold other numbers;
    their settings lack "last_state", so their fingerprint differs and they are refused, not resumed."""
    from ser_cache.features.store_ref import fingerprint

    done = extract(cfg(models["wavlm"], corpus, tmp_path))
    store = FeatureStore.open(done.store, mode="r+")
    old = {k: v for k, v in store.attrs["settings"].items() if k != "last_state"}
    store.update_attrs(settings=old, fingerprint=fingerprint(old))
    with pytest.raises(ExtractError, match=r"last_state: store has None, this run 'after-final-layer-norm'"):
        extract(cfg(models["wavlm"], corpus, tmp_path))


# --------------------------------------------------------------------------- transcripts from a table (text encoders)

TEST3 = ("MSP-PODCAST_test3_0001.wav", "MSP-PODCAST_test3_0002.wav")
ASR = {"model_id": "openai/whisper-large-v3", "revision": "0123abcd", "language": "en", "beams": 1,
       "max_new_tokens": 224, "max_seconds": 30.0, "precision": "bf16", "timestamps": False}


def asr_table(path: Path, texts: dict[str, str], *, sidecar: bool = True) -> Path:
    """A table as `ser-cache transcribe` writes it, with its sidecar."""
    from ser_cache.data import transcripts
    from ser_cache.features import transcript_table

    transcript_table.write_table(path, texts)
    if sidecar:
        transcript_table.write_sidecar(transcripts.sidecar_path(path), {"model": "whisper-large-v3", "settings": ASR,
                                                                       "complete": True, "rows": len(texts)})
    return path


def without_test3_text(corpus: Path) -> Path:
    for name in TEST3:
        (corpus / "Transcripts" / name.replace(".wav", ".txt")).unlink()
    return corpus


def text_record(store: Path) -> dict[str, dict]:
    from ser_cache.data.transcripts import record_path

    with open(record_path(store), newline="") as f:
        return {row["id"]: row for row in csv.DictReader(f)}


def sha1(text: str) -> str:
    import hashlib

    return hashlib.sha1(text.encode()).hexdigest()[:12]


@pytest.mark.slow
def test_transcripts_fill_exactly_the_rows_without_corpus_text(models, corpus, tmp_path):
    import hashlib

    without_test3_text(corpus)
    utts = {u.id: u for u in load_corpus(corpus)}
    no_text = min(utts)
    (corpus / "Transcripts" / no_text.replace(".wav", ".txt")).unlink()  # in neither the corpus nor the table
    has_text = sorted(utts)[5]
    table = asr_table(tmp_path / "asr.csv", {TEST3[0]: "oh what a lovely morning", TEST3[1]: "i could not care less",
                                             has_text: "the corpus has its own text for this one"})
    r = extract(cfg(models["text"], corpus, tmp_path / "f", name="minilm", transcripts=table))
    assert r.failed == 1 and r.text_sources == {"corpus": 11, "table": 2, "none": 1}
    s = FeatureStore.open(r.store)
    assert s.attrs["transcripts"] == {"table": str(table),
                                      "table_sha256": hashlib.sha256(table.read_bytes()).hexdigest(),
                                      "asr": ASR, "prefer": False, "rows": {"corpus": 11, "table": 2, "none": 1}}
    record = text_record(r.store)
    assert list(record) == sorted(utts)  # one line per row, in store order
    texts = {uid: u.read_text() for uid, u in utts.items()}
    texts.update({TEST3[0]: "oh what a lovely morning", TEST3[1]: "i could not care less"})
    for uid, row in record.items():
        if uid == no_text:
            assert (row["source"], row["text_sha1"]) == ("none", "")
        else:
            assert row["source"] == ("table" if uid in TEST3 else "corpus")
            assert row["text_sha1"] == sha1(texts[uid]), uid
    with open(report_path(r.store), newline="") as f:
        assert [row["reason"] for row in csv.DictReader(f)] == [
            f"missing transcript ({corpus / 'Transcripts' / no_text.replace('.wav', '.txt')}; none in {table})"]
    # Each row is the encoding of the text the record names.
    ids, feats, _ = s.read()
    enc = load_encoder(str(models["text"]), device="cpu", precision="fp32")
    rows = [list(ids).index(uid) for uid in (*TEST3, has_text)]
    online = enc.encode([texts[uid] for uid in (*TEST3, has_text)]).numpy()
    np.testing.assert_allclose(feats[rows].astype(np.float32), online, rtol=2e-3, atol=2e-3)
    table_text = enc.encode(["the corpus has its own text for this one"]).numpy()[0]
    assert not np.allclose(feats[rows[2]].astype(np.float32), table_text, atol=1e-2)
    # A store fed by a table keeps the fingerprint of one fed by the corpus alone.
    plain = extract(cfg(models["text"], corpus, tmp_path / "g", name="minilm"))
    assert FeatureStore.open(plain.store).fingerprint == s.fingerprint
    assert FeatureStore.open(plain.store).attrs["transcripts"]["rows"] == {"corpus": 11, "table": 0, "none": 3}
    assert FeatureStore.open(plain.store).attrs["transcripts"]["table"] is None


@pytest.mark.slow
def test_retry_failed_with_transcripts_fills_test3_and_keeps_the_other_rows(models, corpus, tmp_path):
    from typer.testing import CliRunner

    from ser_cache.cli.app import app
    from ser_cache.data.transcripts import record_path

    without_test3_text(corpus)
    before = extract(cfg(models["text"], corpus, tmp_path, name="minilm"))  # a store built before the table existed
    assert before.failed == 2
    ids, feats0, written0 = read(before.store)
    assert set(ids[~written0]) == set(TEST3)
    table = asr_table(tmp_path / "asr.csv", {TEST3[0]: "so so good", TEST3[1]: "never again"})
    # Without --retry-failed, failed rows stay failed and the record says they had no text.
    same = extract(cfg(models["text"], corpus, tmp_path, name="minilm", transcripts=table))
    assert same.computed == 0 and same.failed == 2 and same.text_sources["none"] == 2
    # A record deleted since: nothing says which text the written rows hold, so the rerun is refused.
    kept = record_path(before.store).read_bytes()
    record_path(before.store).unlink()
    with pytest.raises(ExtractError, match=r"its transcript record minilm.transcripts.csv is missing.*12 written row"):
        extract(cfg(models["text"], corpus, tmp_path, name="minilm", transcripts=table, retry_failed=True))
    record_path(before.store).write_bytes(kept)
    r = extract(cfg(models["text"], corpus, tmp_path, name="minilm", transcripts=table, retry_failed=True))
    assert r.computed == 2 and r.failed == 0 and r.written == 14
    _, feats, written = read(r.store)
    assert written.all()
    np.testing.assert_array_equal(feats[written0], feats0[written0])  # byte-identical
    record = text_record(r.store)
    from_table = {uid: row["source"] for uid, row in record.items() if row["source"] != "corpus"}
    assert from_table == dict.fromkeys(TEST3, "table")
    assert record[TEST3[1]]["text_sha1"] == sha1("never again")
    attrs = FeatureStore.open(r.store).attrs
    assert attrs["transcripts"]["rows"] == {"corpus": 12, "table": 2, "none": 0} and attrs["complete"] is True
    assert not report_path(r.store).exists()
    shown = CliRunner().invoke(app, ["info", str(r.store)], terminal_width=200)
    assert shown.exit_code == 0, shown.output
    assert "12 from the corpus, 2 from the table, 0 with none" in shown.output
    assert f"{ASR['model_id']} @ {ASR['revision']}" in shown.output


@pytest.mark.slow
def test_a_rerun_that_would_change_the_text_of_written_rows_is_refused(models, corpus, tmp_path):
    without_test3_text(corpus)
    first = asr_table(tmp_path / "first.csv", {TEST3[0]: "first words", TEST3[1]: "second words"})
    r = extract(cfg(models["text"], corpus, tmp_path, name="minilm", transcripts=first))
    assert r.written == 14
    _, feats0, _ = read(r.store)
    other = asr_table(tmp_path / "other.csv", {TEST3[0]: "first words", TEST3[1]: "other words"})
    with pytest.raises(ExtractError, match=rf"1 row\(s\) already written were encoded from other text .*"
                                           rf"--transcripts {other}\): {TEST3[1]}; .*--overwrite to rebuild"):
        extract(cfg(models["text"], corpus, tmp_path, name="minilm", transcripts=other, retry_failed=True))
    with pytest.raises(ExtractError, match=r"2 row\(s\) already written .*\(no --transcripts\)"):
        extract(cfg(models["text"], corpus, tmp_path, name="minilm"))
    # The same text from another file (one more row, unused) is the same input: accepted, nothing recomputed.
    again = asr_table(tmp_path / "again.csv", {TEST3[0]: "first words", TEST3[1]: "second words", "x.wav": "unused"},
                      sidecar=False)
    same = extract(cfg(models["text"], corpus, tmp_path, name="minilm", transcripts=again))
    assert same.computed == 0 and FeatureStore.open(r.store).attrs["transcripts"]["asr"] is None
    # Corpus transcripts edited since: the first 5 rows named, and how many more.
    edited = sorted(u.id for u in load_corpus(corpus) if u.id not in TEST3)[:7]
    for uid in edited:
        (corpus / "Transcripts" / uid.replace(".wav", ".txt")).write_text("edited afterwards\n")
    with pytest.raises(ExtractError, match=rf"7 row\(s\) already written .*: {', '.join(edited[:5])} and 2 more"):
        extract(cfg(models["text"], corpus, tmp_path, name="minilm", transcripts=first))
    np.testing.assert_array_equal(read(r.store)[1], feats0)  # refusals leave the store as it was
    rebuilt = extract(cfg(models["text"], corpus, tmp_path, name="minilm", transcripts=other, overwrite=True))
    assert rebuilt.computed == 14 and text_record(rebuilt.store)[TEST3[1]]["text_sha1"] == sha1("other words")
    assert text_record(rebuilt.store)[edited[0]]["text_sha1"] == sha1("edited afterwards")


@pytest.mark.slow
def test_prefer_transcripts_changes_the_fingerprint(models, corpus, tmp_path):
    everything = {u.id: f"asr says {i}" for i, u in enumerate(load_corpus(corpus)) if i % 2 == 0}
    table = asr_table(tmp_path / "asr.csv", everything)
    plain = extract(cfg(models["text"], corpus, tmp_path, name="minilm", transcripts=table))
    assert plain.text_sources == {"corpus": 14, "table": 0, "none": 0}
    plain_fingerprint = FeatureStore.open(plain.store).fingerprint
    with pytest.raises(ExtractError,
                       match=r"other settings \(prefer_transcripts: store has None, this run True\).*--overwrite"):
        extract(cfg(models["text"], corpus, tmp_path, name="minilm", transcripts=table, prefer_transcripts=True))
    r = extract(cfg(models["text"], corpus, tmp_path, name="minilm", transcripts=table, prefer_transcripts=True,
                    overwrite=True))
    s = FeatureStore.open(r.store)
    assert s.fingerprint != plain_fingerprint
    assert s.attrs["settings"]["prefer_transcripts"] is True and s.attrs["transcripts"]["prefer"] is True
    assert r.text_sources == {"corpus": 7, "table": 7, "none": 0}
    record = text_record(r.store)
    assert all(record[uid]["text_sha1"] == sha1(text) and record[uid]["source"] == "table"
               for uid, text in everything.items())


def test_transcript_options_are_checked(models, corpus, tmp_path):
    table = asr_table(tmp_path / "asr.csv", {TEST3[0]: "hello"})
    with pytest.raises(ExtractError, match=r"--transcripts .*asr.csv: model .* is a whisper \(audio\) encoder; "
                                           r"transcripts feed text encoders only"):
        extract(cfg(models["whisper"], corpus, tmp_path, transcripts=table))
    assert not (tmp_path / "whisper-tiny.zarr").exists()
    with pytest.raises(ExtractError, match=r"--prefer-transcripts: give the table with --transcripts FILE"):
        extract(cfg(models["text"], corpus, tmp_path, prefer_transcripts=True))
    bad = tmp_path / "bad.csv"
    bad.write_text("FileName,words\nx.wav,hi\n")
    with pytest.raises(ExtractError, match=rf"{bad}, line 1: expected columns FileName \(or id\) and text"):
        extract(cfg(models["text"], corpus, tmp_path, transcripts=bad))


def test_layers_of_a_pooled_store_are_slices_of_an_all_layers_store(models, corpus, tmp_path):
    """WavLM (pooled default: every state, 0-2) and Whisper (default: the last), same corpus and batches."""
    announced = []
    every = read(extract(cfg(models["wavlm"], corpus, tmp_path, name="w-all", chunk_rows=4),
                         announce=announced.append).store)[1]
    some = FeatureStore.open(extract(cfg(models["wavlm"], corpus, tmp_path, name="w-12", layers="1-2",
                                         chunk_rows=4)).store)
    last = FeatureStore.open(extract(cfg(models["wavlm"], corpus, tmp_path, name="w-last", layers="last",
                                         chunk_rows=4)).store)
    assert every.shape[1:] == (3, 32) and some.feature_shape == (2, 32) and last.feature_shape == (32,)
    assert some.attrs["settings"]["layer"] == [1, 2] and last.attrs["settings"]["layer"] == "last"
    np.testing.assert_array_equal(some.read()[1], every[:, [1, 2]])
    np.testing.assert_array_equal(last.read()[1], every[:, 2])
    (e,) = announced  # pooled: exactly N × L × D × 2 bytes
    assert e.layers == 3 and e.bytes == every.nbytes and not e.frame_level
    short = dict(window="trimmed", max_seconds=2.0)
    w_all = read(extract(cfg(models["whisper"], corpus, tmp_path, name="x-all", layers="all", **short)).store)[1]
    w_last = FeatureStore.open(extract(cfg(models["whisper"], corpus, tmp_path, name="x-last", **short)).store)
    assert w_all.shape[1:] == (3, 32) and w_last.attrs["settings"]["layer"] == "last"
    np.testing.assert_array_equal(w_last.read()[1], w_all[:, 2])
