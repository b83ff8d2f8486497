"""runs.gather on a run trained on a frame store of several hidden states: the store's (L, D) frames
read back, and new audio encoded again with the store's own choice of states, so both agree."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ser_cache.data.corpus import load_corpus
from ser_cache.features.extract import ExtractConfig, extract
from ser_cache.features.frames import Frames
from ser_cache.features.store import FeatureStore
from ser_cache.runs import layout, prediction_file, rundir
from ser_cache.runs.gather import gather_features
from ser_cache.runs.predict import predict

from factories import msp_corpus
from synthetic import train


@pytest.fixture(scope="module")
def layered_run(tmp_path_factory, models):
    """A tiny corpus, a Whisper frame store of two of its three states (0 and 2), and heads trained on it."""
    root = tmp_path_factory.mktemp("layered-run")
    data = msp_corpus(root / "corpus", n=12, unlabeled=0)
    store = extract(ExtractConfig(model=str(models["whisper"]), data=data, out=root / "f", pooling="frames",
                                  layers="0,2", device="cpu", workers=0, progress=False)).store
    result, _ = train(root, data, [store], name="run", epochs=2, conv_dim=16, hidden=16, speaker_weight=0,
                      gender_weight=0)
    return data, store, result


def test_a_run_on_layered_frames_trains_with_their_weighting(layered_run):
    _, store, result = layered_run
    config = json.loads((result.run_dir / layout.CONFIG).read_text())
    name = store.name.removesuffix(".zarr")
    assert config["frame_inputs"][name]["weighted_layers"] == 2
    (record,) = config["inputs"]
    assert record["feature_shape"] == [750, 2, 32] and record["settings"]["layer"] == [0, 2]
    model, _ = rundir.load_run(result.run_dir)
    weights = model.layer_weights()[name]
    assert weights.shape == (2,) and float(weights.sum()) == pytest.approx(1.0)


def test_new_audio_is_encoded_with_the_stores_layers_and_predicts_as_the_store(layered_run, tmp_path):
    data, store, result = layered_run
    config = json.loads((result.run_dir / layout.CONFIG).read_text())
    utts = [u for u in load_corpus(data) if u.split == "Development"]
    from_store, where = gather_features(config, utts, run_dir=result.run_dir, device="cpu")
    encoded, again = gather_features(config, utts, run_dir=result.run_dir, device="cpu", use_stores=False)
    (name,) = from_store
    assert where[name].startswith("store ") and again[name].startswith("encoder ")
    assert isinstance(encoded[name], Frames) and encoded[name].frame_shape == (2, 32)
    # Whisper's window pads every clip to 15 s: the same numbers as the store, bit for bit.
    np.testing.assert_array_equal(encoded[name].lengths, from_store[name].lengths)
    np.testing.assert_array_equal(encoded[name].data, from_store[name].data)
    s = FeatureStore.open(store)
    rows = [s.ids().tolist().index(u.id) for u in utts]
    np.testing.assert_array_equal(from_store[name].data, s.read_frames(np.array(rows))[1].data)
    # predict: the Development rows from the store, and the same files as bare audio.
    dev = predict(result.run_dir, data=data, splits=["Development"], out=tmp_path / "dev.csv", device="cpu")
    bare = predict(result.run_dir, files=[u.path for u in utts], out=tmp_path / "bare.csv", device="cpu")
    assert all(v.startswith("encoder ") for v in bare.sources.values())
    ids, got = prediction_file.read_predictions(dev.out)
    bare_ids, bare_got = prediction_file.read_predictions(bare.out)
    assert ids == bare_ids == [u.id for u in utts] and np.isfinite(got).all()
    np.testing.assert_allclose(bare_got, got, atol=1e-6)


def test_a_frame_input_trained_on_one_state_is_gathered_at_it(layered_run):
    """A run that kept one position of the axis (FrameInput.layer_pos, train-heads --layer) records it, and
    gather reads the store's frames, or encodes new audio, at that position."""
    from ser_cache.system.inputs import FrameInput

    data, store, result = layered_run
    s = FeatureStore.open(store)
    picked = FrameInput(name="f", path=store, attrs=s.attrs, shape=s.feature_shape, chunk_rows=s.chunk_rows,
                        counts=s.frame_counts(), rows=np.arange(s.n_rows), layer_pos=1)
    record = picked.record()
    assert record["layer_position"] == 1 and record["layer"] == 2  # the store holds states 0 and 2
    config = json.loads((result.run_dir / layout.CONFIG).read_text())
    config["inputs"] = [{**config["inputs"][0], "layer_position": 1}]
    utts = [u for u in load_corpus(data) if u.split == "Development"]
    (name,) = config["frame_inputs"]
    from_store, _ = gather_features(config, utts, run_dir=result.run_dir, device="cpu")
    encoded, _ = gather_features(config, utts, run_dir=result.run_dir, device="cpu", use_stores=False)
    rows = np.array([s.ids().tolist().index(u.id) for u in utts])
    want = s.read_frames(rows)[1].layer(1)
    for got in (from_store[name], encoded[name]):
        assert got.frame_shape == (32,)
        np.testing.assert_array_equal(got.lengths, want.lengths)
        np.testing.assert_array_equal(got.data, want.data)
