"""`extract --pooling frames`: frame-level stores, checked against the stock models run one clip at a time."""

import csv
import json
import os
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ser_cache.cli.app import app
from ser_cache.data import audio
from ser_cache.data.corpus import load_corpus
from ser_cache.encoders import EncoderError, load_encoder
from ser_cache.features.encode import compute_features, encoder_for_store
from ser_cache.features.errors import ExtractError
from ser_cache.features.extract import ExtractConfig, extract
from ser_cache.features.frames import Frames
from ser_cache.features.report import report_path
from ser_cache.features.store import FeatureStore

from factories import msp_corpus, tone, write_wav

# What the stored fp16 rows may differ from an fp32 reference by: float16 rounding.
FP16 = dict(rtol=2e-3, atol=2e-3)


def cfg(model, data, out, **kw):
    base = dict(model=str(model), data=data, out=out, device="cpu", workers=0, progress=False, pooling="frames")
    base.update(kw)
    return ExtractConfig(**base)


def winner_count(n_samples: int) -> int:
    """The challenge winner's frame count for a 16-kHz clip of n samples (whole mel frames, then stride 2)."""
    return (n_samples // 160 - 1) // 2 + 1


def clips(data):
    """{id: the waveform extract encodes} (decoded, mono, 16 kHz, cut to 15 s)."""
    return {u.id: audio.load(u.path) for u in load_corpus(data)}


def stock_whisper_15s(model_dir):
    """transformers' own WhisperEncoder built for a 15-s input (750 positions), with the
    checkpoint's weights and the first 750 rows of its positional table, and the stock feature
    extractor padding to 15 s: the computation the window mode claims to be."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    full = WhisperForConditionalGeneration.from_pretrained(model_dir).model.encoder
    config = WhisperConfig.from_pretrained(model_dir)
    config.max_source_positions = 750
    stock = WhisperEncoder(config).eval()
    state = full.state_dict()
    state["embed_positions.weight"] = state["embed_positions.weight"][:750]
    stock.load_state_dict(state)
    fe = WhisperFeatureExtractor(feature_size=config.num_mel_bins, chunk_length=15)

    def run(wave):
        mel = fe(wave, sampling_rate=16_000, return_tensors="pt").input_features
        with torch.no_grad():
            return stock(mel).last_hidden_state[0].numpy()

    return run


@pytest.mark.slow
def test_whisper_window_rows_are_the_stock_encoders_valid_frames(models, corpus, tmp_path):
    r = extract(cfg(models["whisper"], corpus, tmp_path, chunk_rows=4))
    assert r.store.name == "whisper-tiny-frames.zarr" and r.failed == 0
    s = FeatureStore.open(r.store)
    assert s.is_frames and s.feature_shape == (750, 32) and s.attrs["pooling"] == "frames"
    ids, feats, written = s.read()
    counts = s.frame_counts()
    waves = clips(corpus)
    assert written.all() and counts.tolist() == [winner_count(len(waves[i])) for i in ids]
    for i, n in enumerate(counts):
        assert not feats[i, n:].any(), f"row {i}: padding must be zeros"
    run = stock_whisper_15s(models["whisper"])
    for i in (0, 5, len(ids) - 1):
        ref = run(waves[ids[i]])
        np.testing.assert_allclose(feats[i, : counts[i]].astype(np.float32), ref[: counts[i]], **FP16,
                                   err_msg=f"row {i}")
    # The pooled store of the same model keeps its own name and its own frame rule, beside it.
    pooled = extract(cfg(models["whisper"], corpus, tmp_path, pooling="mean"))
    assert pooled.store.name == "whisper-tiny.zarr"
    assert FeatureStore.open(pooled.store).fingerprint != s.fingerprint


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
@pytest.mark.slow
def test_wavlm_rows_are_the_stock_models_last_hidden_state(models, corpus, tmp_path):
    from transformers import WavLMModel

    r = extract(cfg(models["wavlm"], corpus, tmp_path, chunk_rows=4))
    s = FeatureStore.open(r.store)
    stock = WavLMModel.from_pretrained(models["wavlm"]).eval()
    t_max = int(stock._get_feat_extract_output_lengths(torch.tensor(15 * 16_000)))
    assert r.store.name == "wavlm-tiny-frames.zarr" and s.feature_shape == (t_max, 32)
    settings = s.attrs["settings"]
    assert (settings["pooling"] == "frames" and settings["layer"] == "last"
            and settings["last_state"] == "after-final-layer-norm")
    ids, feats, written = s.read()
    counts = s.frame_counts()
    waves = clips(corpus)
    assert written.all()
    for i, uid in enumerate(ids):
        w = waves[uid]
        assert counts[i] == int(stock._get_feat_extract_output_lengths(torch.tensor(len(w))))
        assert not feats[i, counts[i]:].any()
    for i in (0, 7, len(ids) - 1):
        w = waves[ids[i]]
        x = torch.from_numpy((w - w.mean()) / np.sqrt(w.var() + 1e-7))[None]
        with torch.no_grad():  # alone, unpadded: every output frame is a valid one
            ref = stock(x, attention_mask=torch.ones_like(x, dtype=torch.long)).last_hidden_state[0].numpy()
        assert ref.shape[0] == counts[i]
        np.testing.assert_allclose(feats[i, : counts[i]].astype(np.float32), ref, **FP16, err_msg=f"row {i}")


def test_whisper_trimmed_frames_are_batch_independent_and_capped(models, corpus, tmp_path):
    r = extract(cfg(models["whisper"], corpus, tmp_path, window="trimmed", max_seconds=3.0, chunk_rows=4))
    s = FeatureStore.open(r.store)
    assert s.feature_shape == (150, 32)  # 3 s at one position per 20 ms
    ids, feats, _ = s.read()
    counts = s.frame_counts()
    waves = {u.id: audio.load(u.path, max_seconds=3.0) for u in load_corpus(corpus)}
    assert counts.tolist() == [winner_count(len(waves[i])) for i in ids]
    assert counts.max() == 150 and counts.min() < 150  # clips longer than 3 s fill the store's rows exactly
    enc = load_encoder(str(models["whisper"]), device="cpu", precision="fp32", window="trimmed", max_seconds=3.0,
                       pooling="frames")
    for i in (0, 4, len(ids) - 1):
        alone = enc.encode([waves[ids[i]]]).numpy()[0]
        np.testing.assert_allclose(feats[i].astype(np.float32), alone, **FP16, err_msg=f"row {i}")


@pytest.mark.slow
def test_frame_counts_and_shapes_of_the_encoders(models):
    w = load_encoder(str(models["whisper"]), device="cpu", pooling="frames")
    n = np.array([0, 159, 160, 480, 88_000, 240_000, 300_000])
    assert w.frame_counts(n).tolist() == [0, 0, 1, 2, 275, 750, 750]  # longer clips are cut to the 15-s window
    assert w.frame_counts(n).dtype == np.int64 and w.frame_level and w.feature_shape == (750, 32)
    t = load_encoder(str(models["whisper"]), device="cpu", pooling="frames", window="trimmed", max_seconds=5.5)
    assert t.feature_shape == (275, 32) and t.frame_counts(np.array([88_000, 88_319])).tolist() == [275, 275]
    v = load_encoder(str(models["wavlm"]), device="cpu", pooling="frames", max_seconds=2.0)
    assert v.feature_shape == (99, 32) and v.frame_counts(np.array([16_000, 32_000, 64_000])).tolist() == [49, 99, 99]
    pooled = load_encoder(str(models["whisper"]), device="cpu")
    assert not pooled.frame_level
    with pytest.raises(EncoderError, match="--pooling frames"):
        pooled.frame_counts(n)
    # Rows come back padded with zeros past their valid frames, whatever the batch.
    waves = [tone(1.3, seed=1), tone(0.4, seed=2)]
    for enc in (w, t, v):
        out = enc.encode(waves).numpy()
        counts = enc.frame_counts(np.array([len(x) for x in waves]))
        assert out.shape == (2, *enc.feature_shape)
        for b in range(2):
            assert not out[b, counts[b]:].any() and np.abs(out[b, : counts[b]]).sum(1).min() > 0


def test_text_and_xvector_encoders_refuse_frames(models, corpus, tmp_path):
    message = r"--pooling frames: .*only audio encoders with hidden states \(whisper, wavlm, hubert, "
    with pytest.raises(EncoderError, match=message):
        load_encoder(str(models["xvector"]), device="cpu", pooling="frames")
    with pytest.raises(EncoderError, match=message):
        load_encoder("roberta-large", device="cpu", pooling="frames")  # refused before any download
    r = CliRunner().invoke(app, ["extract", "--model", str(models["xvector"]), "--data", str(corpus), "--out",
                                 str(tmp_path), "--pooling", "frames", "--device", "cpu", "--workers", "0"])
    assert r.exit_code == 2 and "only audio encoders" in r.output and "Traceback" not in r.output
    assert not list(tmp_path.glob("*.zarr"))


@pytest.mark.slow
def test_pooled_and_frame_stores_refuse_each_other(models, corpus, tmp_path):
    extract(cfg(models["whisper"], corpus, tmp_path, name="s", pooling="mean"))
    with pytest.raises(ExtractError, match=r"pooling: store has 'mean', this run 'frames'.*--overwrite"):
        extract(cfg(models["whisper"], corpus, tmp_path, name="s"))
    extract(cfg(models["whisper"], corpus, tmp_path, name="f"))
    with pytest.raises(ExtractError, match=r"pooling: store has 'frames', this run 'mean\+std'"):
        extract(cfg(models["whisper"], corpus, tmp_path, name="f", pooling="mean+std"))
    with pytest.raises(ExtractError, match=r"window: store has 'window', this run 'trimmed'"):
        extract(cfg(models["whisper"], corpus, tmp_path, name="f", window="trimmed"))
    again = extract(cfg(models["whisper"], corpus, tmp_path, name="f"))
    assert again.computed == 0 and again.skipped == again.rows


def bad_corpus(tmp_path):
    data = msp_corpus(tmp_path / "c", n=8, unlabeled=0)
    names = sorted(p.name for p in (data / "Audios").iterdir())
    (data / "Audios" / names[1]).write_bytes(b"RIFF....WAVEnot really audio")
    (data / "Audios" / names[6]).unlink()
    write_wav(data / "Audios" / names[3], tone(2.0, sr=44_100, channels=2), sr=44_100)
    return data, names


@pytest.mark.slow
def test_compute_features_returns_the_store_rows_as_frames(models, tmp_path):
    data, names = bad_corpus(tmp_path)
    utts = load_corpus(data)
    for kind, tol in (("whisper", {}), ("wavlm", FP16)):
        r = extract(cfg(models[kind], data, tmp_path / "f", chunk_rows=4))
        s = FeatureStore.open(r.store)
        assert r.failed == 2 and s.frame_counts()[[1, 6]].tolist() == [0, 0]
        with open(report_path(r.store), newline="") as f:
            assert sorted(row["id"] for row in csv.DictReader(f)) == [names[1], names[6]]
        enc = encoder_for_store(s.attrs, device="cpu")
        assert enc.frame_level and type(enc) is type(load_encoder(str(models[kind]), device="cpu", pooling="frames"))
        assert {k: v for k, v in s.attrs["settings"].items() if k in enc.settings()} == enc.settings()
        got, errors = compute_features(enc, utts)
        assert isinstance(got, Frames) and got.data.dtype == np.float16
        assert sorted(errors) == [names[1], names[6]]
        ids, stored, _ = s.read_frames()
        assert ids.tolist() == [u.id for u in utts]
        np.testing.assert_array_equal(got.lengths, stored.lengths)
        if tol:  # WavLM's rows move by float noise with their batch's padding
            np.testing.assert_allclose(got.data.astype(np.float32), stored.data.astype(np.float32), **tol)
        else:  # Whisper's window pads every clip to 15 s: the same numbers, bit for bit
            np.testing.assert_array_equal(got.data, stored.data)


@pytest.mark.slow
@pytest.mark.parametrize("layers", [None, "0,2"], ids=["last", "layered"])
def test_resume_after_kill_9_gives_identical_features_and_frames(models, tmp_path, layers):
    """A real SIGKILL inside the third chunk write, after its features and counts, before its flags;
    for a last-layer frame store in the 15-s window, and one of two hidden states ((T, 2, D) rows) of
    trimmed clips, whose batches (by length) must be planned the same in the resumed run."""
    data = msp_corpus(tmp_path / "c", n=16, unlabeled=0)
    out = tmp_path / "run"
    args = ["extract", "--model", str(models["whisper"]), "--data", str(data), "--out", str(out), "--pooling",
            "frames", "--chunk-rows", "4", "--device", "cpu", "--workers", "0", "--no-progress",
            *(["--layers", layers, "--window", "trimmed"] if layers else [])]
    script = tmp_path / "killer.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, sys
        import zarr
        from ser_cache.features.store import FeatureStore
        original_write, original_set = FeatureStore.write_chunk, zarr.Array.__setitem__
        state = {{"chunk_writes": 0, "sets": 0}}
        def write_chunk(self, *args, **kwargs):
            state["chunk_writes"] += 1
            state["sets"] = 0
            return original_write(self, *args, **kwargs)
        def setitem(self, key, value):
            if state["chunk_writes"] == 3:
                state["sets"] += 1
                if state["sets"] == 3:  # features and frame counts are on disk, the flags are not
                    os.kill(os.getpid(), signal.SIGKILL)
            return original_set(self, key, value)
        FeatureStore.write_chunk = write_chunk
        zarr.Array.__setitem__ = setitem
        from ser_cache.cli.app import main
        sys.argv = ["ser-cache", *{args!r}]
        main()
    """))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == -9, p.stderr
    store = out / "whisper-tiny-frames.zarr"
    partial = FeatureStore.open(store)
    assert partial.flags()[0].sum() == 8 and partial.frame_counts()[8:12].any()  # chunk 3's counts, not trusted
    again = CliRunner().invoke(app, args)  # the same command, in this process (a second one costs its imports)
    assert again.exit_code == 0, again.output
    ref = FeatureStore.open(extract(cfg(models["whisper"], data, tmp_path / "ref", chunk_rows=4, layers=layers,
                                        **({"window": "trimmed"} if layers else {}))).store)
    done = FeatureStore.open(store)
    assert done.feature_shape[1:] == ref.feature_shape[1:] == ((2, 32) if layers else (32,))
    assert done.feature_shape == ref.feature_shape
    for x, y in zip(ref.read(), done.read()):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(ref.frame_counts(), done.frame_counts())
    assert done.attrs["complete"] is True


@pytest.mark.slow
def test_info_and_export_show_and_carry_the_frames(models, corpus, tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["extract", "--model", str(models["whisper"]), "--data", str(corpus), "--out", str(tmp_path),
                            "--pooling", "frames", "--device", "cpu", "--workers", "0", "--no-progress"])
    assert r.exit_code == 0, r.output
    store = tmp_path / "whisper-tiny-frames.zarr"
    s = FeatureStore.open(store)
    counts = s.frame_counts()
    r = runner.invoke(app, ["info", str(store), "--json"])
    assert r.exit_code == 0, r.output
    f = json.loads(r.output)["frames"]
    assert f["rows_written"] == s.n_rows and f["frames_max"] == counts.max() and f["max_frames_per_row"] == 750
    assert f["frames_mean"] == pytest.approx(counts.mean()) and f["frames_bytes"] == counts.sum() * 32 * 2
    table = runner.invoke(app, ["info", str(store)])
    assert table.exit_code == 0 and "frames per row" in table.output and "per row" in table.output
    assert runner.invoke(app, ["export", str(store)]).exit_code == 0
    with h5py.File(store.with_suffix(".h5")) as h:
        np.testing.assert_array_equal(h["frames"][:], counts)
        np.testing.assert_array_equal(h["features"][:], s.read()[1])
    help_text = runner.invoke(app, ["extract", "--help"]).output
    assert "frames" in help_text


def test_units_of_frame_rows_are_bounded_in_memory():
    from ser_cache.features.encode import UNIT_BYTES, UNIT_ROWS, _unit_rows, _units

    whisper_large_frames = 750 * 1280 * 2
    rows = _unit_rows(whisper_large_frames)
    assert rows * whisper_large_frames <= UNIT_BYTES and rows >= 500
    assert _unit_rows(1280 * 2) == UNIT_ROWS  # pooled rows: unchanged
    units = _units(list(range(200)), 16, 1, rows)
    assert max(len(u) for u in units) * 16 <= rows and sum(len(u) for u in units) == 200


# --------------------------------------------------------------------------- --layers: frame stores of several states


def test_layers_of_a_frame_store_are_slices_of_an_all_layers_store(models, corpus, tmp_path):
    """Tiny Whisper (2 layers: states 0-2), trimmed to 3 s: every state, two of them, the last; the same
    batches (same corpus, chunking and batch plan), so the same numbers, bit for bit."""
    from ser_cache.cli.stage_one import estimate_text

    announced = []
    kw = dict(window="trimmed", max_seconds=3.0, chunk_rows=4)
    every = FeatureStore.open(extract(cfg(models["whisper"], corpus, tmp_path, name="all", layers="all", **kw),
                                      announce=announced.append).store)
    two = FeatureStore.open(extract(cfg(models["whisper"], corpus, tmp_path, name="two", layers="0,2", **kw)).store)
    last = FeatureStore.open(extract(cfg(models["whisper"], corpus, tmp_path, name="last", **kw)).store)
    assert every.feature_shape == (150, 3, 32) and two.feature_shape == (150, 2, 32) and last.feature_shape == (150, 32)
    assert every.attrs["settings"]["layer"] == "all" and two.attrs["settings"]["layer"] == [0, 2]
    assert last.attrs["settings"]["layer"] == "last" and every.attrs["encoder"]["layers"] == [0, 1, 2]
    assert two.attrs["encoder"]["layers"] == [0, 2] and last.attrs["encoder"]["layers"] == [2]
    _, f_all, written = every.read_frames()
    _, f_two, _ = two.read_frames()
    _, f_last, _ = last.read_frames()
    assert written.all() and f_all.frame_shape == (3, 32)
    np.testing.assert_array_equal(f_all.lengths, f_last.lengths)
    np.testing.assert_array_equal(f_two.data, f_all.data[:, [0, 2]])
    np.testing.assert_array_equal(f_last.data, f_all.data[:, 2])
    np.testing.assert_array_equal(every.read_frames(layer=1)[1].data, f_all.data[:, 1])
    # Told before the run: the valid frames (from the clips' durations) × 3 states × 32 × 2 bytes.
    (e,) = announced
    assert e.layers == 3 and e.sampled == every.n_rows and e.frames == int(f_all.lengths.sum())
    assert e.bytes == f_all.data.nbytes
    assert "3× a last-layer frame store" in estimate_text(e)


def test_a_store_of_other_layers_is_refused_by_its_fingerprint(models, corpus, tmp_path):
    kw = dict(window="trimmed", max_seconds=2.0, name="f")
    extract(cfg(models["whisper"], corpus, tmp_path, layers="1-2", **kw))
    refused = r"layer: store has \[1, 2\], this run 'all' \(the hidden states kept: --layers\).*--overwrite.*--name"
    with pytest.raises(ExtractError, match=refused):
        extract(cfg(models["whisper"], corpus, tmp_path, layers="all", **kw))
    with pytest.raises(ExtractError, match=r"layer: store has \[1, 2\], this run 'last'"):
        extract(cfg(models["whisper"], corpus, tmp_path, **kw))
    again = extract(cfg(models["whisper"], corpus, tmp_path, layers="2,1", **kw))  # the same choice, written otherwise
    assert again.computed == 0 and again.skipped == again.rows


def test_info_shows_the_layers_of_a_layered_frame_store(models, corpus, tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["extract", "--model", str(models["whisper"]), "--data", str(corpus), "--out",
                            str(tmp_path), "--pooling", "frames", "--layers", "0,2", "--window", "trimmed",
                            "--max-seconds", "2", "--device", "cpu", "--workers", "0", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "2× a last-layer frame store" in r.output and "--layers" in r.output
    store = tmp_path / "whisper-tiny-frames.zarr"
    table = " ".join(runner.invoke(app, ["info", str(store)]).output.split())
    assert "encoder.layers │ 0,2: 2 held of 3 states (0-2)" in table
    assert "layers per frame │ 2" in table and "encoder.frame_rate │ 50 Hz" in table
    assert "encoder.family" not in table  # the kind row says it: whisper
    info = json.loads(runner.invoke(app, ["info", str(store), "--json"]).output)
    assert info["frames"]["layers"] == 2 and info["encoder"]["layers"] == [0, 2]
    assert info["feature_shape"] == [100, 2, 32]
