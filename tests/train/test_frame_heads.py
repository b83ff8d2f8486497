"""Frame heads: ConvPool and FeatureModel against a re-statement, train-heads on frame stores (held
and streamed), the run directory, predict/evaluate/ensemble on frame runs, old runs unchanged."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from ser_cache.features.frames import Frames
from ser_cache.features.store import FeatureStore
from ser_cache.runs import layout, prediction_file, rundir
from ser_cache.system.model import ConvPool, FeatureModel

from synthetic import check_multimodal, make_frame_corpus, make_frame_store, make_store, train

# --------------------------------------------------------------------------- a corpus whose arousal lives in frames


@pytest.fixture(scope="module")
def frame_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("frame-corpus")
    manifest, ids, frames, text = make_frame_corpus(root / "corpus")
    stores = {"frames": make_frame_store(root / "features" / "audio-frames.zarr", ids, frames, chunk_rows=16),
              "text": make_store(root / "features" / "text.zarr", ids, text, kind="text", modality="text")}
    means = np.stack([f.astype(np.float16).astype(np.float32).mean(0) for f in frames])
    stores["means"] = make_store(root / "features" / "audio-means.zarr", ids, means)
    return manifest, ids, frames, text, stores


FAST = dict(epochs=12, lr=3e-3, batch_size=32, undersample=False, select="ccc", speaker_weight=0)


@pytest.fixture(scope="module")
def frame_run(tmp_path_factory, frame_corpus):
    manifest, _, _, _, stores = frame_corpus
    root = tmp_path_factory.mktemp("frame-run")
    result, cfg = train(root, manifest, [stores["frames"], stores["text"]], name="mm", **FAST)
    return result, cfg


# --------------------------------------------------------------------------- ConvPool and FeatureModel


def reference_pool(pool: ConvPool, x: np.ndarray, lengths) -> np.ndarray:
    """The authors' stack restated: per frame h = W1 x + b1, ReLU, W2 h + b2, ReLU, W3 h + b3 (no ReLU
    after it), then the mean over each row's first lengths[b] frames; float64 matrix products."""
    convs = [m for m in pool.convs if isinstance(m, torch.nn.Conv1d)]
    weights = [(c.weight.detach().double().numpy()[:, :, 0], c.bias.detach().double().numpy()) for c in convs]
    out = []
    for b, t in enumerate(lengths):
        h = x[b, :t].astype(np.float64)
        for k, (w, bias) in enumerate(weights):
            h = h @ w.T + bias
            if k < len(weights) - 1:
                h = np.maximum(h, 0)
        out.append(h.mean(0))
    return np.stack(out)


def test_conv_pool_is_the_authors_stack_and_a_masked_mean():
    torch.manual_seed(0)
    pool = ConvPool(12, dim=8).eval()
    rng = np.random.default_rng(0)
    lengths = [5, 1, 9, 3]
    x = rng.standard_normal((4, 9, 12)).astype(np.float32)
    got = pool(torch.from_numpy(x), torch.tensor(lengths)).detach().numpy()
    np.testing.assert_allclose(got, reference_pool(pool, x, lengths), atol=1e-5)
    # The layout: Conv1d, ReLU, Dropout, Conv1d, ReLU, Dropout, Conv1d, and nothing after the last.
    kinds = [type(m).__name__ for m in pool.convs]
    assert kinds == ["Conv1d", "ReLU", "Dropout", "Conv1d", "ReLU", "Dropout", "Conv1d"]
    # No ReLU at the end: with the last bias pushed down, the pooled vector goes negative.
    with torch.no_grad():
        pool.convs[-1].bias.fill_(-100.0)
    assert (pool(torch.from_numpy(x), torch.tensor(lengths)) < 0).all()

    # Frames past a row's length change nothing, whatever they hold.
    garbage = x.copy()
    for b, t in enumerate(lengths):
        garbage[b, t:] = 1e3 * rng.standard_normal((9 - t, 12))
    longer = np.concatenate([garbage, 7 * np.ones((4, 5, 12), np.float32)], axis=1)
    a = pool(torch.from_numpy(x), torch.tensor(lengths))
    b = pool(torch.from_numpy(longer), torch.tensor(lengths))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-6)
    # Each row alone, unpadded, gives its row of the batch.
    for i, t in enumerate(lengths):
        torch.testing.assert_close(pool(torch.from_numpy(x[i:i + 1, :t]), torch.tensor([t]))[0], a[i],
                                   atol=1e-4, rtol=1e-6)


def _heads(input_dims, **kw):
    from ser_cache.system.heads import MultitaskHeads

    return MultitaskHeads(input_dims, hidden=8, dropout=0.0, label_min=[1, 1, 1], label_max=[7, 7, 7], **kw)


def test_feature_model_concatenates_the_pooled_frames_with_the_vectors():
    torch.manual_seed(0)
    model = FeatureModel(_heads({"f": (8,), "text": (5,)}, n_genders=2), {"f": {"in_dim": 12, "dim": 8}}).eval()
    assert set(k.split(".")[0] for k in model.state_dict()) == {"heads", "pools"}
    assert model.config() == {"f": {"in_dim": 12, "dim": 8, "layers": 3, "dropout": 0.1}}
    x, lengths = torch.randn(3, 6, 12), torch.tensor([6, 2, 4])
    text = torch.randn(3, 5)
    out = model({"f": (x, lengths), "text": text})
    pooled = model.pools[0](x, lengths)
    expected = model.heads({"f": pooled, "text": text})
    torch.testing.assert_close(out["avd"], expected["avd"])
    assert out["gender_logits"].shape == (3, 2)
    # Without frame inputs it is the heads, weights under "heads." as every run has them.
    plain = FeatureModel(_heads({"text": (5,)}))
    assert all(k.startswith("heads.") for k in plain.state_dict())
    torch.testing.assert_close(plain({"text": text})["avd"], plain.heads({"text": text})["avd"])


def test_packed_gather_equals_frames_take():
    from ser_cache.system.inputs import take_packed

    rng = np.random.default_rng(0)
    f = Frames.from_padded(rng.standard_normal((5, 7, 3)).astype(np.float16), [7, 2, 0, 5, 1])
    for idx in ([0, 1, 2, 3, 4], [3, 1], [2], [4, 2, 0]):
        want = f.take(idx)
        got = take_packed(torch.from_numpy(f.data), f.offsets, np.array(idx))
        assert got[0].dtype == torch.float16
        torch.testing.assert_close(got[0], want[0], atol=0, rtol=0)
        assert got[1].tolist() == want[1].tolist()


# --------------------------------------------------------------------------- training


def test_frame_heads_learn_what_a_mean_of_the_frames_cannot(tmp_path, frame_corpus, frame_run):
    manifest, ids, frames, text, stores = frame_corpus
    result, cfg = frame_run
    means, _ = train(tmp_path, manifest, [stores["means"], stores["text"]], name="means", **FAST)
    got, base = result.metrics["ccc"], means.metrics["ccc"]
    print(f"\nframes+text {got}\nmeans+text {base}")
    assert got["arousal"] > 0.8 and got["valence"] > 0.6 and got["mean"] > 0.7, got
    assert got["arousal"] > base["arousal"] + 0.3, (got, base)

    config = json.loads((result.run_dir / layout.CONFIG).read_text())
    assert config["frame_inputs"] == {"audio-frames": {"in_dim": 16, "dim": 256, "layers": 3, "dropout": 0.1}}
    assert config["heads"]["input_dims"] == {"audio-frames": [256], "text": [16]}
    assert config["heads"]["dropout"] == 0.0 and config["train"]["dropout"] == 0.0
    assert config["format_version"] == layout.FRAME_RUN_FORMAT_VERSION
    assert config["memory"]["frames"] == "held"
    frame_record = next(i for i in config["inputs"] if i["name"] == "audio-frames")
    assert frame_record["feature_shape"] == [max(len(f) for f in frames) + 3, 16]
    from safetensors.torch import load_file

    keys = set(load_file(str(result.run_dir / layout.WEIGHTS)))
    assert {k.split(".")[0] for k in keys} == {"heads", "pools"}
    assert "pools.0.convs.0.weight" in keys and "pools.0.convs.6.weight" in keys
    # A pooled-only run keeps the old layout: no frame inputs, version 1.
    means_config = json.loads((means.run_dir / layout.CONFIG).read_text())
    assert means_config["frame_inputs"] == {} and means_config["format_version"] == layout.POOLED_RUN_FORMAT_VERSION


def test_frame_store_rows_read_once_per_chunk_for_kept_rows_only(tmp_path, frame_corpus, monkeypatch):
    """load_rows reads a frame store with read_frames, for the kept rows only (unwritten and
    unlabelled rows left out), never row by row."""
    from ser_cache.system import errors, rows as rows_mod

    manifest, ids, frames, text, _ = frame_corpus
    written = np.ones(len(ids), dtype=bool)
    written[[3, 40]] = False
    store = make_frame_store(tmp_path / "f.zarr", ids, frames, chunk_rows=32, written=written)
    calls = []
    original = FeatureStore.read_frames

    def spy(self, rows=None):
        calls.append(None if rows is None else np.asarray(rows).copy())
        return original(self, rows)

    monkeypatch.setattr(FeatureStore, "read_frames", spy)
    data = rows_mod.load_rows(manifest, "Train", "Development", [store], speaker_weight=0, frames=True)
    assert len(calls) == 1 and calls[0] is not None
    kept = [ids.index(u) for u in data.ids]
    assert 3 not in kept and 40 not in kept and all(ids.index(u) < 0.85 * len(ids) for u in data.ids)
    assert sorted(calls[0].tolist()) == sorted(kept)
    (f,) = data.frame_inputs
    x, lengths = data.batch(np.array([0, 5, 2]))["f"]
    for b, i in enumerate([0, 5, 2]):
        want = frames[kept[i]].astype(np.float16)
        assert int(lengths[b]) == len(want)
        np.testing.assert_array_equal(x[b, : len(want)].numpy(), want)
        assert not x[b, len(want):].any()
    assert data.memory["frames"] == "held" and not data.streamed
    # Pooled-only commands (finetune) refuse a frame store with a message, not a crash later.
    with pytest.raises(errors.TrainError, match="a frame store"):
        rows_mod.load_rows(manifest, "Train", "Development", [store], speaker_weight=0)


@pytest.mark.slow
def test_streamed_frames_train_and_see_each_epoch_row_once(tmp_path, frame_corpus, monkeypatch):
    from ser_cache.system import setup
    from ser_cache.system.inputs import FrameInput
    from ser_cache.system.rows import TrainingData
    from ser_cache.system.sampling import EpochSampler
    from ser_cache.train import fit, recipe
    from ser_cache.train.options import TrainHeadsConfig

    manifest, ids, frames, text, stores = frame_corpus
    seen: list[list[np.ndarray]] = []
    holds: list[int] = []
    orders: list[np.ndarray] = []
    epoch_blocks = fit.epoch_blocks
    batch = TrainingData.batch
    hold = FrameInput.hold

    def spy_blocks(jobs, data, epoch_orders, epoch, device):  # the training batches of one epoch, block by block
        orders.append(epoch_orders[0].copy())
        seen.append([])
        holds.append(0)
        data._recording = True
        try:
            yield from epoch_blocks(jobs, data, epoch_orders, epoch, device)
        finally:
            data._recording = False

    def spy_batch(self, idx, host_idx=None):
        if getattr(self, "_recording", False):
            seen[-1].append(np.asarray(idx).copy())
        return batch(self, idx, host_idx)

    def spy_hold(self, store_rows):
        if holds:
            holds[-1] += 1
        return hold(self, store_rows)

    monkeypatch.setattr(fit, "epoch_blocks", spy_blocks)
    monkeypatch.setattr(TrainingData, "batch", spy_batch)
    monkeypatch.setattr(FrameInput, "hold", spy_hold)
    options = {**FAST, "epochs": 4, "undersample": True}
    result, _ = train(tmp_path, manifest, [stores["frames"], stores["text"]], name="streamed",
                      memory_budget_gb=1e-5, **options)
    config = json.loads((result.run_dir / layout.CONFIG).read_text())
    assert config["memory"]["frames"] == "streamed"
    data = recipe.load_training_data(TrainHeadsConfig(features=(stores["frames"], stores["text"]),
                                                                 data=manifest, out=tmp_path / "x"))
    train_idx, _ = setup.select_rows(TrainHeadsConfig(features=(), data=manifest, out=tmp_path), data)
    sampler = EpochSampler(data.emotions[train_idx], undersample=True, seed=0)
    assert len(orders) == 4
    for epoch, (order, batches) in enumerate(zip(orders, seen), start=1):
        sampler.set_epoch(epoch)
        np.testing.assert_array_equal(order, train_idx[sampler.epoch_indices()])
        visited = np.concatenate(batches)
        assert len(visited) == len(order) == config["data"]["rows_per_epoch"]  # each row once
        assert sorted(visited.tolist()) == sorted(order.tolist())
    # Blocks of single 16-row chunks (the budget holds less than one), in another order each epoch.
    assert min(holds) > 3
    assert not all(np.array_equal(np.concatenate(seen[0]), np.concatenate(s)) for s in seen[1:])
    assert result.metrics["ccc"]["mean"] > 0.3, result.metrics["ccc"]


def test_streamed_and_held_frames_score_development_alike(tmp_path, frame_corpus):
    from ser_cache.system.rows import load_rows
    from ser_cache.train.fit import infer_stack
    from ser_cache.train.stack import stack_of

    manifest, ids, frames, text, stores = frame_corpus
    kwargs = dict(speaker_weight=0, frames=True)
    held = load_rows(manifest, "Train", "Development", [stores["frames"], stores["text"]], **kwargs)
    streamed = load_rows(manifest, "Train", "Development", [stores["frames"], stores["text"]],
                         memory_budget_gb=2e-5, **kwargs)
    assert not held.streamed and streamed.streamed
    torch.manual_seed(0)
    model = FeatureModel(_heads({"audio-frames": (8,), "text": (16,)}, n_genders=2),
                         {"audio-frames": {"in_dim": 16, "dim": 8}})
    dev = np.flatnonzero(held.splits == "Development")[::-1].copy()
    one = stack_of([model], [None])
    (a,), (pa,) = infer_stack(one, held, dev, torch.device("cpu"))
    (b,), (pb,) = infer_stack(one, streamed, dev, torch.device("cpu"))
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(pa, pb, atol=1e-5)
    assert all(s.data is None for s in streamed.frame_inputs)  # nothing left held after the pass


def test_frame_options_are_checked():
    from ser_cache.system.errors import TrainError
    from ser_cache.train.options import TrainHeadsConfig

    cfg = TrainHeadsConfig(features=(Path("a.zarr"),), data=Path("."), out=Path("r"), conv_dim=0, conv_dropout=1.0,
                           memory_budget_gb=0)
    with pytest.raises(TrainError) as info:
        cfg.verify()
    for option in ("--conv-dim", "--conv-dropout", "--memory-budget"):
        assert option in str(info.value)
    assert TrainHeadsConfig(features=(), data=Path("."), out=Path("r")).dropout == 0.0


# --------------------------------------------------------------------------- predict, evaluate, ensemble


@pytest.mark.slow
def test_predicting_a_frame_run_from_the_store_equals_the_model_on_the_frames(tmp_path, frame_corpus, frame_run):
    from ser_cache.runs.predict import evaluate, predict

    manifest, ids, frames, text, stores = frame_corpus
    result, _ = frame_run
    run = result.run_dir
    # Development from the store reproduces the run's own Development predictions.
    dev = predict(run, data=manifest, splits=["Development"], out=tmp_path / "dev.csv", device="cpu")
    assert dev.sources["audio-frames"].startswith("store ")
    np.testing.assert_allclose(prediction_file.read_predictions(dev.out)[1],
                               prediction_file.read_predictions(run / layout.DEV_PREDICTIONS)[1], atol=1e-5)
    scored = evaluate(run, manifest, "Development", out=tmp_path / "dev.json", device="cpu")
    assert scored["ccc"]["mean"] == pytest.approx(result.metrics["ccc"]["mean"], abs=1e-5)

    # A Test1 row equals the FeatureModel run by hand on that row's frames (float16, as stored).
    test1 = predict(run, data=manifest, splits=["Test1"], out=tmp_path / "t.csv", device="cpu")
    got_ids, got = prediction_file.read_predictions(test1.out)
    model, _ = rundir.load_run(run)
    for k in (0, len(got_ids) // 2, len(got_ids) - 1):
        i = ids.index(got_ids[k])
        x = torch.from_numpy(frames[i].astype(np.float16))[None]
        with torch.no_grad():
            out = model({"audio-frames": (x, torch.tensor([len(frames[i])])),
                         "text": torch.from_numpy(text[i:i + 1].astype(np.float16))})["avd"]
        np.testing.assert_allclose(got[k], out[0].double().numpy(), atol=2e-6)

    # Ensemble of the frame run with a pooled run: the plain average of the two.
    from ser_cache.runs.ensemble import ensemble

    pooled, _ = train(tmp_path, manifest, [stores["means"], stores["text"]], name="pooled", **{**FAST, "epochs": 2})
    other = predict(pooled.run_dir, data=manifest, splits=["Test1"], out=tmp_path / "p.csv", device="cpu")
    mixed = ensemble([test1.out, other.out], out=tmp_path / "e.csv", data=manifest, split="Test1")
    np.testing.assert_allclose(prediction_file.read_predictions(mixed.out)[1],
                               (got + prediction_file.read_predictions(other.out)[1]) / 2, atol=2e-6)


def test_a_frame_run_refuses_a_pooled_store_in_place_of_its_frames(tmp_path, frame_corpus, frame_run):
    from ser_cache.runs.predict import PredictError, predict

    manifest, ids, frames, text, stores = frame_corpus
    result, _ = frame_run
    moved = tmp_path / "moved"
    moved.mkdir()
    config = json.loads((result.run_dir / layout.CONFIG).read_text())
    rec = next(i for i in config["inputs"] if i["name"] == "audio-frames")
    # A pooled store with the frame store's name and settings: refused, it holds no frames.
    means = np.stack([f.mean(0) for f in frames])
    make_store(moved / Path(rec["path"]).name, ids, means, settings=rec["settings"])
    make_store(moved / "text.zarr", ids, text, kind="text", modality="text")
    with pytest.raises(PredictError, match="pooled store.*--pooling frames"):
        predict(result.run_dir, data=manifest, splits=["Test1"], out=tmp_path / "x.csv", device="cpu",
                features_dir=moved)


@pytest.mark.slow
def test_an_old_run_without_frame_inputs_loads_and_predicts_the_same(tmp_path, frame_corpus):
    from ser_cache.runs.predict import predict
    from ser_cache.system.heads import MultitaskHeads

    manifest, ids, frames, text, stores = frame_corpus
    result, _ = train(tmp_path, manifest, [stores["means"], stores["text"]], name="old", **{**FAST, "epochs": 3})
    run = result.run_dir
    # Make it what a run written before frame inputs looks like: no "frame_inputs", version 1,
    # weights saved from the bare heads.
    config = json.loads((run / layout.CONFIG).read_text())
    config.pop("frame_inputs")
    config["format_version"] = 1
    (run / layout.CONFIG).write_text(json.dumps(config))
    model, _ = rundir.load_run(run)
    heads = MultitaskHeads.from_config(config["heads"])
    heads.load_state_dict(model.heads.state_dict())
    rundir.save_weights(run, heads)
    from safetensors.torch import load_file

    assert all(k.startswith("heads.") for k in load_file(str(run / layout.WEIGHTS)))
    reloaded, _ = rundir.load_run(run)
    assert isinstance(reloaded, FeatureModel) and not reloaded.frame_names
    out = predict(run, data=manifest, splits=["Development"], out=tmp_path / "dev.csv", device="cpu")
    np.testing.assert_allclose(prediction_file.read_predictions(out.out)[1],
                               prediction_file.read_predictions(run / layout.DEV_PREDICTIONS)[1], atol=1e-6)


@pytest.mark.slow
def test_cli_train_heads_takes_frame_options(tmp_path, frame_corpus):
    from typer.testing import CliRunner

    from ser_cache.cli.app import app

    manifest, ids, frames, text, stores = frame_corpus
    r = CliRunner().invoke(app, [str(a) for a in (
        "train-heads", "--features", stores["frames"], "--features", stores["text"], "--data", manifest,
        "--out", tmp_path / "cli", "--epochs", 2, "--lr", 3e-3, "--no-undersample", "--device", "cpu",
        "--threads", 1, "--no-progress", "--conv-dim", 32, "--conv-dropout", 0.2, "--memory-budget", 1e-5,
        "--speaker-weight", 0)])
    assert r.exit_code == 0, r.output
    config = json.loads((tmp_path / "cli" / layout.CONFIG).read_text())
    assert config["frame_inputs"]["audio-frames"] == {"in_dim": 16, "dim": 32, "layers": 3, "dropout": 0.2}
    assert config["train"]["memory_budget_gb"] == 1e-5 and config["memory"]["frames"] == "streamed"
    help_text = re.sub(r"[│\s]+", " ", CliRunner().invoke(app, ["train-heads", "--help"]).output)
    assert "--memory-budget" in help_text and "half the physical memory" in help_text


# --------------------------------------------------------------------------- end to end on mini-podcast


@pytest.mark.slow
def test_frame_heads_on_mini_podcast_multimodal_beats_each_modality(tmp_path, mini_podcast, models, one_torch_thread):
    """Tiny Whisper frames (extract --pooling frames) + MiniLM text, then train-heads on frames +
    text, frames alone and text alone (Development mean CCC); and a frame run's prediction from
    the store equals the same model on frames the encoder computes from the audio there and then."""
    import time

    from ser_cache.features.encode import compute_features, encoder_for_store
    from ser_cache.features.extract import ExtractConfig, extract
    from ser_cache.runs.ensemble import ensemble
    from ser_cache.runs.predict import evaluate, predict

    t0 = time.perf_counter()
    stores = {}
    for name, model, pooling in (("frames", models["whisper"], "frames"), ("text", models["text"], "mean")):
        cfg = ExtractConfig(model=str(model), data=mini_podcast, out=tmp_path / "features", name=name,
                            pooling=pooling, window="trimmed" if name == "frames" else None, device="cpu", workers=0,
                            progress=False)
        stores[name] = extract(cfg).store
    assert FeatureStore.open(stores["frames"]).is_frames
    t_extract = time.perf_counter() - t0
    # As in test_training's multimodal test: a few hundred rows want a larger learning rate than the
    # paper's and no undersampling. A 64-wide ConvPool (the authors': 256) keeps this test to seconds.
    # 20 epochs: the three runs keep epochs 19, 11 and 15, the scores of 30 epochs.
    options = dict(epochs=20, lr=1e-3, batch_size=32, undersample=False, select="ccc", conv_dim=64)
    scores, results = {}, {}
    for name, features in (("frames", [stores["frames"]]), ("text", [stores["text"]]),
                           ("frames+text", [stores["frames"], stores["text"]])):
        results[name], _ = train(tmp_path, mini_podcast, features, name=name, **options)
        scores[name] = results[name].metrics["ccc"]
    wall = time.perf_counter() - t0
    check_multimodal(scores, "frames", "text", "frames+text", f"extract {t_extract:.1f} s, total {wall:.1f} s")

    # evaluate and ensemble take the frame run like any other.
    mm = results["frames+text"].run_dir
    scored = evaluate(mm, mini_podcast, "Development", out=tmp_path / "dev.json", device="cpu")
    assert scored["ccc"]["mean"] == pytest.approx(scores["frames+text"]["mean"], abs=1e-5)
    test1 = [predict(results[k].run_dir, data=mini_podcast, splits=["Test1"], out=tmp_path / f"{k}.csv",
                     device="cpu") for k in ("frames+text", "text")]
    assert ensemble([t.out for t in test1], out=tmp_path / "e.csv", data=mini_podcast, split="Test1").rows == 98

    # Online: the run's encoder on the audio of three Test1 clips, then the model by hand, against
    # `predict` on those files (frames computed there) and `predict` from the store.
    from ser_cache.data.corpus import load_corpus

    run = results["frames"].run_dir
    model, config = rundir.load_run(run)
    utts = load_corpus(mini_podcast, ["Test1"])[:3]
    frames, errors = compute_features(encoder_for_store(config["inputs"][0], device="cpu"), utts, device="cpu")
    assert not errors and isinstance(frames, Frames)
    with torch.no_grad():
        online = model({"frames": frames.take(range(3))})["avd"].double().numpy()
    files = predict(run, files=[u.path for u in utts], out=tmp_path / "files.csv", device="cpu")
    assert files.sources["frames"].startswith("encoder ")
    np.testing.assert_allclose(prediction_file.read_predictions(files.out)[1], online, atol=1e-6)
    from_store = predict(run, data=mini_podcast, splits=["Test1"], out=tmp_path / "store.csv", device="cpu")
    ids, stored = prediction_file.read_predictions(from_store.out)
    at = [ids.index(u.id) for u in utts]
    # Recomputed frames equal stored ones to float16 rounding (batching differs), so nearly equal here.
    np.testing.assert_allclose(stored[at], online, atol=2e-3)
