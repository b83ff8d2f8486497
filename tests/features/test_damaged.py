"""Damaged stores and runs: every one is refused with one line naming the file and the remedy, never
read as zeros, never a traceback. Each test builds its own damage (a deleted or overwritten chunk
file, an edited zarr.json or config.json, a truncated weights file, a held extraction lock)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ser_cache.cli.app import app
from ser_cache.features import store as store_mod
from ser_cache.features.errors import ExtractError, StoreError
from ser_cache.features.export import export_hdf5
from ser_cache.features.extract import ExtractConfig, extract
from ser_cache.features.store import FeatureStore
from ser_cache.features.store_lock import StoreLock
from ser_cache.runs import layout, rundir
from ser_cache.runs.predict import PredictError, predict
from ser_cache.system.rows import load_rows

from factories import msp_corpus
from synthetic import make_corpus, make_store, train

runner = CliRunner()
N, DIM, ROWS = 40, 3, 8  # 5 chunks of 8 rows


def written_store(tmp_path: Path, *, frames: bool = False, name: str = "s.zarr") -> FeatureStore:
    """A store with every row written: row i's features are all i + 1 (never zero)."""
    ids = [f"u{i:02d}" for i in range(N)]
    shape = (4, DIM) if frames else (DIM,)
    s = FeatureStore.create(tmp_path / name, ids, shape, {"fingerprint": "f", "settings": {}}, chunk_rows=ROWS,
                            frames=frames)
    for c in range(s.n_chunks):
        start, end = s.chunk_bounds(c)
        x = np.broadcast_to(np.arange(start + 1, end + 1, dtype=np.float32).reshape(-1, *[1] * len(shape)),
                            (end - start, *shape))
        s.write_chunk(c, x, np.ones(end - start, bool), np.zeros(end - start, bool),
                      frames=np.full(end - start, 3) if frames else None)
    return s


def garble(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 200, dtype=np.uint8).tobytes())


# --------------------------------------------------------------------------- checksums and verify


def test_new_stores_checksum_every_chunk_and_a_flipped_byte_is_caught(tmp_path):
    s = written_store(tmp_path)
    for name in ("ids", "features", "written", "failed"):
        codecs = json.loads((s.path / name / "zarr.json").read_text())["codecs"]
        assert codecs[-1]["name"] == "crc32c", name
    assert s.verify(deep=True) == []
    chunk = s.path / "features" / "c" / "2" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one bit: zstd alone would not notice every such flip
    chunk.write_bytes(bytes(raw))
    problems = FeatureStore.open(s.path).verify(deep=True)
    assert [(p.array, p.chunk, p.first, p.last, p.missing) for p in problems] == [("features", 2, 16, 23, False)]
    assert "cannot be read" in str(problems[0]) and "features/c/2/0" in str(problems[0])


def test_old_stores_without_checksums_still_read(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "_codecs", lambda: {})  # as stores were created before checksums
    s = written_store(tmp_path)
    assert "crc32c" not in (s.path / "features" / "zarr.json").read_text()
    monkeypatch.undo()
    s = FeatureStore.open(s.path)
    assert s.verify(deep=True) == [] and s.read()[2].all()
    assert s.read()[1][9, 0] == 10


def test_missing_features_chunk_is_found_and_refused_before_training(tmp_path):
    manifest, ids, feats = make_corpus(tmp_path / "corpus", 48)
    path = tmp_path / "audio.zarr"
    s = FeatureStore.create(path, ids, (24,), {"fingerprint": "a", "settings": {}}, chunk_rows=16)
    for c in range(s.n_chunks):
        s.write_chunk(c, feats["audio"][c * 16:(c + 1) * 16], np.ones(16, bool), np.zeros(16, bool))
    (path / "features" / "c" / "1" / "0").unlink()
    problems = s.verify(deep=False)
    assert [(p.array, p.chunk, p.first, p.last, p.missing) for p in problems] == [("features", 1, 16, 31, True)]
    with pytest.raises(StoreError) as exc:
        load_rows(manifest, "Train", "Development", [path], speaker_weight=0.0)
    msg = str(exc.value)
    assert str(path) in msg and "written rows 16–31 have no features chunk on disk" in msg
    assert "run `ser-cache extract` with the same options again" in msg and "\n" not in msg
    # `info --verify` lists it and exits 1; a sound store says OK.
    r = runner.invoke(app, ["info", "--verify", str(path)])
    assert r.exit_code == 1 and "written rows 16–31" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["info", str(path)])
    assert r.exit_code == 0 and "warning" in r.output and "--verify" in r.output
    r = runner.invoke(app, ["info", "--verify", str(written_store(tmp_path).path)])
    assert r.exit_code == 0 and "OK" in r.output


def test_missing_frames_chunk_of_a_frame_store_is_found(tmp_path):
    s = written_store(tmp_path, frames=True)
    assert (s.path / "features" / "c" / "3" / "0" / "0").is_file()  # nested keys of (N, T, D) chunks
    (s.path / "features" / "c" / "3" / "0" / "0").unlink()
    (s.path / "frames" / "c" / "4").unlink()
    problems = s.verify(deep=False)
    assert [(p.array, p.chunk) for p in problems] == [("features", 3), ("frames", 4)]
    with pytest.raises(StoreError, match=r"written rows 24–31 have no features chunk on disk \(chunk 3, "
                                         r"features/c/3/0/0\) \(and 1 more"):
        s.check_readable()


# --------------------------------------------------------------------------- garbage in a chunk


def test_garbage_in_a_chunk_is_a_store_error_naming_store_array_and_chunk(tmp_path):
    s = written_store(tmp_path)
    garble(s.path / "features" / "c" / "3" / "0")
    for read in (s.read, lambda: export_hdf5(s, tmp_path / "s.h5")):
        with pytest.raises(StoreError) as exc:
            read()
        msg = str(exc.value)
        assert str(s.path) in msg and "chunk 3 of array 'features' (rows 24–31, file features/c/3/0)" in msg
        assert "ser-cache info --verify" in msg and "delete the damaged chunk" in msg and "--overwrite" in msg
    assert not (tmp_path / "s.h5").exists()
    r = runner.invoke(app, ["export", str(s.path)])
    assert r.exit_code == 2 and "chunk 3 of array 'features'" in r.output and "Traceback" not in r.output
    garble(s.path / "written" / "c" / "1")
    with pytest.raises(StoreError, match="chunk 1 of array 'written'"):
        s.flags()
    f = written_store(tmp_path, frames=True, name="f.zarr")
    garble(f.path / "features" / "c" / "2" / "0" / "0")
    with pytest.raises(StoreError, match="chunk 2 of array 'features'"):
        f.read_frames()
    garble(f.path / "ids" / "c" / "0")
    with pytest.raises(StoreError, match=r"array 'ids'.*extract cannot recompute them.*--overwrite"):
        f.ids()


# --------------------------------------------------------------------------- metadata


def test_a_shape_edited_in_zarr_json_is_refused_at_open(tmp_path):
    s = written_store(tmp_path)
    meta = s.path / "features" / "zarr.json"
    original = meta.read_text()
    edited = json.loads(original)
    edited["shape"] = [N - 8, DIM]
    meta.write_text(json.dumps(edited))
    with pytest.raises(StoreError, match=rf"{s.path}: array 'features' has shape \(32, 3\), but 'ids' has 40 rows"):
        FeatureStore.open(s.path)
    edited["shape"] = [N, DIM + 1]
    edited["chunk_grid"]["configuration"]["chunk_shape"] = [ROWS, DIM + 1]
    meta.write_text(json.dumps(edited))
    with pytest.raises(StoreError, match=r"rows of shape \(4,\), but the store's attribute feature_shape is \(3,\)"):
        FeatureStore.open(s.path)
    meta.write_text(original)
    assert FeatureStore.open(s.path).read()[2].all()


def test_info_on_an_array_inside_a_store_names_the_store(tmp_path):
    s = written_store(tmp_path)
    r = runner.invoke(app, ["info", str(s.path / "features")])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "an array ('features') of the feature store at" in r.output and str(s.path.resolve()) in r.output


def test_missing_ids_chunk_is_damage_not_duplicate_ids(tmp_path):
    manifest, ids, feats = make_corpus(tmp_path / "corpus", 48)
    path = make_store(tmp_path / "audio.zarr", ids, feats["audio"])
    (path / "ids" / "c" / "0").unlink()
    with pytest.raises(StoreError) as exc:
        load_rows(manifest, "Train", "Development", [path], speaker_weight=0.0)
    msg = str(exc.value)
    assert ("rows 0–47 have no ids chunk on disk" in msg
            and "rebuild the store with `ser-cache extract --overwrite`" in msg)
    assert "appears twice" not in msg
    with pytest.raises(StoreError, match="array 'ids' is damaged: 48 row"):
        FeatureStore.open(path).ids()


# --------------------------------------------------------------------------- a store being written


def test_a_store_being_extracted_is_refused_by_readers(tmp_path):
    manifest, ids, feats = make_corpus(tmp_path / "corpus", 48)
    path = make_store(tmp_path / "audio.zarr", ids, feats["audio"])
    with StoreLock(path):
        with pytest.raises(StoreError,
                           match=r"audio.zarr: is being written by another extract \(pid \d+.*wait for it to finish"):
            load_rows(manifest, "Train", "Development", [path], speaker_weight=0.0)
    assert load_rows(manifest, "Train", "Development", [path], speaker_weight=0.0).ids.size > 0
    with StoreLock(path):  # readers leave extract's own locking as it was
        with pytest.raises(StoreError, match="another extraction"):
            StoreLock(path).acquire()


# --------------------------------------------------------------------------- extract repairs


def test_extract_recomputes_deleted_and_damaged_chunks(models, tmp_path, caplog):
    data = msp_corpus(tmp_path / "c", n=12, unlabeled=0)
    cfg = ExtractConfig(model=str(models["whisper"]), data=data, out=tmp_path / "f", device="cpu", workers=0,
                        progress=False, chunk_rows=4)
    ref = extract(cfg)
    before = FeatureStore.open(ref.store).read()
    (ref.store / "features" / "c" / "1" / "0").unlink()
    with caplog.at_level(logging.WARNING, logger="ser_cache.features.extract"):
        r = extract(cfg)
    assert r.computed == 4 and r.skipped == 8
    assert "written rows 4–7 have no features chunk on disk" in caplog.text and "recomputing chunk 1" in caplog.text
    for x, y in zip(before, FeatureStore.open(r.store).read()):
        np.testing.assert_array_equal(x, y)
    # A damaged chunk: reads name it; deleting it and running extract again repairs it.
    garble(ref.store / "features" / "c" / "2" / "0")
    with pytest.raises(StoreError, match="chunk 2 of array 'features'"):
        FeatureStore.open(r.store).read()
    (ref.store / "features" / "c" / "2" / "0").unlink()
    assert extract(cfg).computed == 4
    for x, y in zip(before, FeatureStore.open(r.store).read()):
        np.testing.assert_array_equal(x, y)
    assert FeatureStore.open(r.store).verify(deep=True) == []
    # Lost ids: extract refuses to resume, and --overwrite rebuilds the store.
    (ref.store / "ids" / "c" / "0").unlink()
    with pytest.raises(ExtractError, match="array 'ids' is damaged.*--overwrite"):
        extract(cfg)
    r = extract(ExtractConfig(**{**cfg.__dict__, "overwrite": True}))
    assert r.computed == 12
    for x, y in zip(before, FeatureStore.open(r.store).read()):
        np.testing.assert_array_equal(x, y)


# --------------------------------------------------------------------------- runs and predict


@pytest.fixture
def small_run(tmp_path):
    manifest, ids, feats = make_corpus(tmp_path / "corpus", 120)
    store = make_store(tmp_path / "features" / "audio.zarr", ids, feats["audio"])
    result, _ = train(tmp_path, manifest, [store], epochs=2)
    return result.run_dir, manifest, store


@pytest.mark.slow
def test_predict_refuses_damaged_or_busy_stores(tmp_path, small_run):
    run, manifest, store = small_run
    with StoreLock(store):
        with pytest.raises(PredictError, match="is being written by another extract"):
            predict(run, data=manifest, splits=["Development"], out=tmp_path / "p.csv", device="cpu")
    garble(store / "features" / "c" / "0" / "0")
    with pytest.raises(PredictError, match=rf"{store}: chunk 0 of array 'features'"):
        predict(run, data=manifest, splits=["Development"], out=tmp_path / "p.csv", device="cpu")
    (store / "features" / "c" / "0" / "0").unlink()
    with pytest.raises(PredictError, match="written rows 0–119 have no features chunk on disk"):
        predict(run, data=manifest, splits=["Development"], out=tmp_path / "p.csv", device="cpu")
    assert not (tmp_path / "p.csv").exists()


def test_damaged_run_files_are_run_errors_naming_the_file(tmp_path, small_run):
    run, _, _ = small_run
    weights = run / layout.WEIGHTS
    good = weights.read_bytes()
    weights.write_bytes(good[:20])
    with pytest.raises(layout.RunError, match=rf"{weights}: not a readable safetensors file .*truncated or damaged"):
        rundir.load_run(run)
    weights.write_bytes(good)
    config = json.loads((run / layout.CONFIG).read_text())
    (run / layout.CONFIG).write_text(json.dumps({**config, "heads": "banana"}))
    with pytest.raises(layout.RunError, match=rf"{run / layout.CONFIG}: \"heads\" must be an object, found 'banana'"):
        rundir.load_run(run)
    (run / layout.CONFIG).write_text(json.dumps({**config, "heads": {**config["heads"], "bogus": 1}}))
    with pytest.raises(layout.RunError, match="do not describe a model"):
        rundir.load_run(run)
    (run / layout.CONFIG).write_text(json.dumps(config))
    assert rundir.load_run(run)[1]["heads"] == config["heads"]


def test_load_finetuned_names_the_damaged_file(tmp_path):
    from ser_cache.runs.finetuned_run import load_finetuned

    run = tmp_path / "ft"
    run.mkdir()
    (run / layout.WEIGHTS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")  # truncated header
    with pytest.raises(layout.RunError, match=r"config.json: the encoder entry or \"heads\" do not describe a model"):
        load_finetuned(run, {"wavlm": "banana", "heads": {}})
    with pytest.raises(layout.RunError, match=r"config.json: the encoder entry or \"heads\" do not describe a model"):
        load_finetuned(run, {"system": "finetuned-wavlm", "wavlm": "banana", "heads": {}})
    with pytest.raises(layout.RunError, match="not a readable safetensors file"):
        rundir.read_weights(run / layout.WEIGHTS)
    shutil.rmtree(run)
