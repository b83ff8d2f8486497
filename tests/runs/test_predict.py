"""predict and evaluate: cached features vs recomputed ones, refusals, the challenge CSV, scores."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ser_cache.data.corpus import load_corpus
from ser_cache.features.extract import ExtractConfig, extract
from ser_cache.features.store_ref import ids_digest
from ser_cache.runs import layout, prediction_file
from ser_cache.runs.predict import PredictError, evaluate, predict

from synthetic import make_corpus, make_store, read_csv, train


def settings_for(name: str, ids, **extra) -> dict:
    return {"kind": "whisper", "model_id": f"fake/{name}", "revision": "r1", "pooling": "mean",
            "rows": ids_digest(ids), **extra}


@pytest.fixture
def trained(tmp_path):
    manifest, ids, feats = make_corpus(tmp_path / "corpus", 240)
    stores = [make_store(tmp_path / "features" / "audio.zarr", ids, feats["audio"],
                         settings=settings_for("audio", ids)),
              make_store(tmp_path / "features" / "text.zarr", ids, feats["text"], kind="text", modality="text",
                         settings=settings_for("text", ids, kind="text"))]
    result, _ = train(tmp_path, manifest, stores, epochs=4)
    return result.run_dir, manifest, ids, feats, stores


def values(path: Path) -> tuple[list[str], np.ndarray]:
    return prediction_file.read_predictions(path)


def test_predicting_development_from_stores_reproduces_the_runs_predictions(tmp_path, trained):
    run, manifest, *_ = trained
    result = predict(run, data=manifest, splits=["Development"], out=tmp_path / "dev.csv", device="cpu")
    ids, avd = values(result.out)
    ref_ids, ref = values(run / layout.DEV_PREDICTIONS)
    assert ids == ref_ids and result.rows == len(ids)
    np.testing.assert_allclose(avd, ref, atol=1e-6)
    assert all(s.startswith("store ") for s in result.sources.values())
    # By default exactly the challenge's Task 2 columns, though the run has a gender head.
    assert next(csv.reader(open(result.out))) == ["FileName", "EmoAct", "EmoVal", "EmoDom"]
    assert not list(tmp_path.glob(".dev.csv.tmp-*"))
    result = predict(run, data=manifest, splits=["Development"], out=tmp_path / "dev_g.csv", device="cpu",
                     with_gender=True)
    header = next(csv.reader(open(result.out)))
    assert header == ["FileName", "EmoAct", "EmoVal", "EmoDom", "Gender", "GenderProb_Female", "GenderProb_Male"]
    np.testing.assert_allclose(values(result.out)[1], avd, atol=0)
    rows = read_csv(result.out)
    assert all(r["Gender"] in ("Female", "Male") for r in rows)
    probs = np.array([[float(r["GenderProb_Female"]), float(r["GenderProb_Male"])] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_a_store_built_with_other_settings_is_refused_naming_them(tmp_path, trained):
    run, manifest, ids, feats, stores = trained
    shutil.rmtree(stores[0])
    make_store(stores[0], ids, feats["audio"], settings=settings_for("audio", ids, pooling="mean+std"))
    with pytest.raises(PredictError, match="pooling: run has 'mean', found 'mean\\+std'") as info:
        predict(run, data=manifest, splits=["Test1"], out=tmp_path / "t.csv", device="cpu")
    assert str(stores[0]) in str(info.value)
    assert not (tmp_path / "t.csv").exists()


@pytest.mark.slow
def test_a_store_reextracted_over_other_rows_with_the_same_settings_is_accepted(tmp_path, trained):
    run, manifest, ids, feats, stores = trained
    shutil.rmtree(stores[0])
    keep = ids[::-1]  # other order, same numbers per utterance: a different row digest and fingerprint
    make_store(stores[0], keep, feats["audio"][::-1], settings=settings_for("audio", keep))
    result = predict(run, data=manifest, splits=["Development"], out=tmp_path / "dev.csv", device="cpu")
    np.testing.assert_allclose(values(result.out)[1], values(run / layout.DEV_PREDICTIONS)[1], atol=1e-6)


@pytest.mark.slow
def test_features_dir_finds_moved_stores(tmp_path, trained):
    run, manifest, ids, _, stores = trained
    moved = tmp_path / "moved"
    moved.mkdir()
    for s in stores:
        shutil.move(str(s), moved / s.name)
    from ser_cache.encoders import EncoderError

    # Without the stores, the run's (made-up) encoders would have to run: a clear failure. The
    # text input's rows lack transcripts, which is found first, before any encoder is loaded.
    with pytest.raises(PredictError, match="no transcript for the text input 'text'"):
        predict(run, data=manifest, splits=["Development"], out=tmp_path / "a.csv", device="cpu")
    table = tmp_path / "t.csv"
    table.write_text("id,text\n" + "".join(f"{uid},some words\n" for uid in ids))
    with pytest.raises(EncoderError, match="fake/audio"):
        predict(run, data=manifest, splits=["Development"], transcripts=table, out=tmp_path / "a.csv", device="cpu")
    result = predict(run, data=manifest, splits=["Development"], out=tmp_path / "b.csv", device="cpu",
                     features_dir=moved)
    assert all(str(moved) in s for s in result.sources.values())


def test_evaluate_scores_like_training_and_writes_json(tmp_path, trained):
    run, manifest, *_ = trained
    result = evaluate(run, manifest, "Development", device="cpu")
    saved = json.loads((run / "eval_Development.json").read_text())
    metrics = json.loads((run / layout.METRICS).read_text())
    for key in ("arousal", "valence", "dominance", "mean"):
        assert saved["ccc"][key] == pytest.approx(metrics["ccc"][key], abs=1e-6)
        assert saved["balanced_ccc"][key] == pytest.approx(metrics["balanced_ccc"][key], abs=1e-6)
    assert saved["gender"]["accuracy"] == pytest.approx(metrics["gender"]["accuracy"])
    assert result["rows"] == metrics["rows"] == saved["rows"]
    other = evaluate(run, manifest, "Test1", out=tmp_path / "test1.json", device="cpu")
    assert json.loads((tmp_path / "test1.json").read_text())["ccc"] == other["ccc"]
    assert other["rows"] == sum(r["split"] == "Test1" for r in read_csv(manifest))


@pytest.mark.slow
def test_evaluate_leaves_out_development_rows_the_run_trained_on(tmp_path):
    manifest, ids, feats = make_corpus(tmp_path / "corpus", 240)
    store = make_store(tmp_path / "a.zarr", ids, feats["audio"])
    result, _ = train(tmp_path, manifest, [store], epochs=2, ox="train+dev")
    scored = evaluate(result.run_dir, manifest, "Development", device="cpu")
    dev = [r for r in read_csv(manifest) if r["split"] == "Development"]
    ox = sum(r["emotion"] in ("O", "X") for r in dev)
    assert ox > 0 and scored["trained_on_left_out"] == ox and scored["rows"] == len(dev) - ox


def test_predict_needs_something_to_predict(tmp_path, trained):
    run, manifest, *_ = trained
    with pytest.raises(PredictError, match="--split"):
        predict(run, data=manifest, out=tmp_path / "x.csv")
    with pytest.raises(PredictError, match="nothing to predict"):
        predict(run, out=tmp_path / "x.csv")
    with pytest.raises(PredictError, match="not a run directory"):
        predict(tmp_path, data=manifest, splits=["Test1"], out=tmp_path / "x.csv")


# --------------------------------------------------------------------------- class runs (Task 1)


def _class_run(root: Path, **kw) -> tuple[Path, Path, dict[str, str]]:
    from synthetic import make_class_corpus

    manifest, ids, feats, codes = make_class_corpus(root / "corpus", 300)
    stores = [make_store(root / "features" / f"{name}.zarr", ids, x, settings=settings_for(name, ids))
              for name, x in feats.items()]
    result, _ = train(root, manifest, stores, epochs=8, speaker_weight=0, **kw)
    return result.run_dir, manifest, dict(zip(ids, codes))


@pytest.fixture(scope="module")
def class_run(tmp_path_factory):
    return _class_run(tmp_path_factory.mktemp("class"), task="categorical")


@pytest.fixture(scope="module")
def both_run(tmp_path_factory):
    return _class_run(tmp_path_factory.mktemp("both"), task="both", classes=9)


def test_a_categorical_run_writes_task_1s_file_with_or_without_probabilities(tmp_path, class_run):
    from ser_cache.system.tasks import CLASSES_8

    run, manifest, truth = class_run
    dev = [r["id"] for r in read_csv(manifest) if r["split"] == "Development"]
    result = predict(run, data=manifest, splits=["Development"], out=tmp_path / "dev.csv", device="cpu")
    rows = read_csv(result.out)
    assert next(csv.reader(open(result.out))) == ["FileName", "EmoClass"]
    # Every utterance of the split gets one code of the run's classes, O/X rows too (no class target is
    # no reason to leave a file out of a submission).
    assert [r["FileName"] for r in rows] == dev and result.rows == len(dev)
    assert {"O", "X"} & {truth[u] for u in dev} and {r["EmoClass"] for r in rows} <= set(CLASSES_8)
    with_p = predict(run, data=manifest, splits=["Development"], out=tmp_path / "dev_p.csv", device="cpu",
                     with_probabilities=True)
    ids, codes, probs, classes = prediction_file.read_class_predictions(with_p.out)
    assert next(csv.reader(open(with_p.out))) == ["FileName", "EmoClass", *(f"prob_{c}" for c in CLASSES_8)]
    assert classes == CLASSES_8 and ids == dev and codes == [r["EmoClass"] for r in rows]
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-4)
    assert codes == [CLASSES_8[k] for k in probs.argmax(1)]
    # The run's own Development file (the rows with a class) holds the same probabilities.
    ref_ids, ref_codes, ref, _ = prediction_file.read_class_predictions(run / layout.DEV_CLASS_PREDICTIONS)
    at = {u: i for i, u in enumerate(ids)}
    np.testing.assert_allclose(probs[[at[u] for u in ref_ids]], ref, atol=2e-6)
    assert [codes[at[u]] for u in ref_ids] == ref_codes


def test_task_options_that_do_not_fit_the_run_are_refused_in_one_line(tmp_path, trained, class_run):
    attributes_run, manifest, *_ = trained
    run, class_manifest, _ = class_run
    out = tmp_path / "x.csv"
    with pytest.raises(PredictError, match=r"^--with-probabilities: run .* has no class head"):
        predict(attributes_run, data=manifest, splits=["Test1"], out=out, with_probabilities=True)
    with pytest.raises(PredictError, match=r"^--task categorical: run .* learned arousal/valence/dominance only"):
        predict(attributes_run, data=manifest, splits=["Test1"], out=out, task="categorical")
    with pytest.raises(PredictError, match=r"^--task attributes: run .* learned the emotion classes only"):
        predict(run, data=class_manifest, splits=["Test1"], out=out, task="attributes")
    with pytest.raises(PredictError, match=r"^--with-gender: Task 1's file \(FileName,EmoClass\) has no gender"):
        predict(run, data=class_manifest, splits=["Test1"], out=out, with_gender=True)
    assert not out.exists()
    # An attribute run given --task attributes writes what it always wrote.
    a = predict(attributes_run, data=manifest, splits=["Test1"], out=tmp_path / "a.csv", device="cpu")
    b = predict(attributes_run, data=manifest, splits=["Test1"], out=tmp_path / "b.csv", device="cpu",
                task="attributes")
    assert a.out.read_bytes() == b.out.read_bytes()


def test_a_both_run_predicts_either_file(tmp_path, both_run):
    from ser_cache.system.tasks import class_codes

    run, manifest, _ = both_run
    default = predict(run, data=manifest, splits=["Test1"], out=tmp_path / "a.csv", device="cpu")
    assert next(csv.reader(open(default.out))) == ["FileName", "EmoAct", "EmoVal", "EmoDom"]
    with pytest.raises(PredictError, match="--with-probabilities: .* give --task categorical"):
        predict(run, data=manifest, splits=["Test1"], out=tmp_path / "x.csv", with_probabilities=True)
    classes = predict(run, data=manifest, splits=["Test1"], out=tmp_path / "c.csv", device="cpu",
                      task="categorical", with_probabilities=True)
    ids, codes, probs, order = prediction_file.read_class_predictions(classes.out)
    assert order == class_codes(9) and ids == prediction_file.read_predictions(default.out)[0]
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-4)
    scored = evaluate(run, manifest, "Development", device="cpu")
    assert "ccc" in scored and scored["categorical"]["classes"] == list(class_codes(9))
    dev = [r for r in read_csv(manifest) if r["split"] == "Development"]
    # Under 9 classes only X has no class target.
    assert scored["no_class_target"] == sum(r["emotion"] == "X" for r in dev) > 0
    assert scored["categorical"]["rows"] == scored["rows"] - scored["no_class_target"]


def test_evaluate_scores_a_class_run_as_scikit_learn_does_and_draws_its_figures(tmp_path, class_run):
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score

    from ser_cache.runs.plots import CLASS_CONFUSION, CLASS_F1
    from ser_cache.system.tasks import CLASSES_8

    run, manifest, truth = class_run
    result = evaluate(run, manifest, "Test1", out=tmp_path / "t1.json", device="cpu", plots=tmp_path / "plots")
    saved = json.loads((tmp_path / "t1.json").read_text())
    c = saved["categorical"]
    # The same predictions as predict writes, scored by scikit-learn over the rows with a class.
    predicted = predict(run, data=manifest, splits=["Test1"], out=tmp_path / "t1.csv", device="cpu")
    rows = [r for r in read_csv(predicted.out) if truth[r["FileName"]] in CLASSES_8]
    y_true = [truth[r["FileName"]] for r in rows]
    y_pred = [r["EmoClass"] for r in rows]
    labels = list(CLASSES_8)
    assert c["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", labels=labels,
                                                   zero_division=0))
    assert c["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert c["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert c["confusion"] == confusion_matrix(y_true, y_pred, labels=labels).tolist()
    per = f1_score(y_true, y_pred, average=None, labels=labels, zero_division=0)
    assert [c["per_class"][k]["f1"] for k in labels] == pytest.approx(per.tolist())
    # O/X rows are left out of the class scores and counted.
    test1 = [r for r in read_csv(manifest) if r["split"] == "Test1"]
    no_class = sum(r["emotion"] in ("O", "X") for r in test1)
    assert no_class > 0 and saved["no_class_target"] == no_class and saved["rows"] == c["rows"] == len(rows)
    assert "ccc" not in saved and result["categorical"] == c
    assert sorted(Path(p).name for p in result["plots"]) == sorted([CLASS_CONFUSION, CLASS_F1])
    assert all(Path(p).stat().st_size > 0 for p in result["plots"])
    assert not list((tmp_path / "plots").glob("*.tmp*"))


# --------------------------------------------------------------------------- real encoders


def _extract(model, corpus, out, *, name, splits=(), pooling="mean"):
    cfg = ExtractConfig(model=str(model), data=corpus, out=out, name=name, splits=tuple(splits), pooling=pooling,
                        device="cpu", workers=0, progress=False)
    return extract(cfg).store


@pytest.mark.slow
def test_cached_and_recomputed_features_give_the_same_predictions(tmp_path, models, corpus, one_torch_thread):
    # Stores over Train and Development only: predicting Test1 must run the encoders.
    part = tmp_path / "part"
    audio = _extract(models["whisper"], corpus, part, name="audio", splits=("Train", "Development"))
    text = _extract(models["text"], corpus, part, name="text", splits=("Train", "Development"))
    result, _ = train(tmp_path, corpus, [audio, text], epochs=2, lr=1e-3, batch_size=4, select="ccc")
    run = result.run_dir

    recomputed = predict(run, data=corpus, splits=["Test1"], out=tmp_path / "recomputed.csv", device="cpu")
    assert all(s.startswith("encoder ") for s in recomputed.sources.values()), recomputed.sources

    full = tmp_path / "full"
    _extract(models["whisper"], corpus, full, name="audio")
    _extract(models["text"], corpus, full, name="text")
    cached = predict(run, data=corpus, splits=["Test1"], out=tmp_path / "cached.csv", device="cpu",
                     features_dir=full)
    assert all(s.startswith("store ") for s in cached.sources.values()), cached.sources

    ids, a = values(recomputed.out)
    ids2, b = values(cached.out)
    assert ids == ids2 and len(ids) == 2
    np.testing.assert_allclose(a, b, atol=2e-3)

    # Bare audio files: transcripts from a CSV (by file name), or a .txt beside the audio.
    utts = load_corpus(corpus, ["Test1"])
    table = tmp_path / "transcripts.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["FileName", "text"])
        for u in utts:
            w.writerow([u.id, u.read_text()])
    files = [u.path for u in utts]
    bare = predict(run, files=files, transcripts=table, out=tmp_path / "bare.csv", device="cpu")
    ids3, c = values(bare.out)
    assert ids3 == ids and all(s.startswith("encoder ") for s in bare.sources.values())
    np.testing.assert_allclose(c, b, atol=2e-3)

    with pytest.raises(PredictError, match=f"{utts[0].path.name}: no transcript for the text input 'text'"):
        predict(run, files=files, out=tmp_path / "no-text.csv", device="cpu")
    # A bare file is encoded from its own audio, even when a store holds an utterance of the same name.
    clips = tmp_path / "clips"
    clips.mkdir()
    namesake = load_corpus(corpus, ["Train"])[0].id
    shutil.copy(utts[0].path, clips / namesake)
    (clips / namesake).with_suffix(".txt").write_text(utts[0].read_text())
    side = predict(run, files=[clips / namesake], out=tmp_path / "side.csv", device="cpu")
    assert values(side.out)[0] == [namesake]
    np.testing.assert_allclose(values(side.out)[1][0], b[0], atol=2e-3)


# --------------------------------------------------------------------------- transcripts for corpus splits

TEST3 = ("MSP-PODCAST_test3_0001.wav", "MSP-PODCAST_test3_0002.wav")


@pytest.fixture(scope="module")
def audio_text_run(tmp_path_factory, models):
    """A run on Whisper (audio, first) and MiniLM (text) stores over Train and Development, and its corpus."""
    import torch

    from factories import msp_corpus

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("audio-text")
    corpus = msp_corpus(root / "corpus")
    audio = _extract(models["whisper"], corpus, root / "f", name="audio", splits=("Train", "Development"))
    text = _extract(models["text"], corpus, root / "f", name="text", splits=("Train", "Development"))
    result, _ = train(root, corpus, [audio, text], epochs=2, lr=1e-3, batch_size=4, select="ccc")
    yield result.run_dir, corpus
    torch.set_num_threads(threads)


def _copy(corpus: Path, dest: Path) -> Path:
    shutil.copytree(corpus, dest)
    return dest


def _table(path: Path, rows: dict[str, str]) -> Path:
    with open(path, "w", newline="", encoding="utf-8-sig") as f:  # as Excel saves it: with a BOM
        w = csv.writer(f)
        w.writerow(["FileName", "text"])
        w.writerows(rows.items())
    return path


@pytest.mark.slow
def test_predict_a_corpus_split_takes_the_table_where_the_corpus_has_no_text(tmp_path, audio_text_run):
    run, shared = audio_text_run
    corpus = _copy(shared, tmp_path / "corpus")
    own = {u.id: u.read_text() for u in load_corpus(corpus, ["Test3"])}
    ref = predict(run, data=corpus, splits=["Test3"], out=tmp_path / "ref.csv", device="cpu")
    (corpus / "Transcripts" / TEST3[0].replace(".wav", ".txt")).unlink()
    table = _table(tmp_path / "asr.csv", {TEST3[0]: own[TEST3[0]], TEST3[1]: "nothing like the corpus text at all"})
    result = predict(run, data=corpus, splits=["Test3"], transcripts=table, out=tmp_path / "t.csv", device="cpu")
    ids, avd = values(result.out)
    assert ids == list(TEST3) and result.sources["text"].startswith("encoder ")
    np.testing.assert_allclose(avd, values(ref.out)[1], atol=1e-6)  # the same text, wherever it came from
    preferred = predict(run, data=corpus, splits=["Test3"], transcripts=table, prefer_transcripts=True,
                        out=tmp_path / "p.csv", device="cpu")
    p = values(preferred.out)[1]
    np.testing.assert_allclose(p[0], avd[0], atol=1e-6)
    assert not np.allclose(p[1], avd[1], atol=1e-5)  # the table's other text for the second turn
    with pytest.raises(PredictError, match="--prefer-transcripts: give the table with --transcripts FILE"):
        predict(run, data=corpus, splits=["Test3"], prefer_transcripts=True, out=tmp_path / "x.csv", device="cpu")


@pytest.mark.slow
def test_a_missing_transcript_stops_predict_before_any_encoder_runs(tmp_path, audio_text_run, monkeypatch):
    from ser_cache.features import encode
    from ser_cache.runs import gather

    run, shared = audio_text_run
    corpus = _copy(shared, tmp_path / "corpus")
    for name in TEST3:
        (corpus / "Transcripts" / name.replace(".wav", ".txt")).unlink()
    calls = []
    load, compute = gather._load_encoder, encode.compute_features
    monkeypatch.setattr(gather, "_load_encoder",
                        lambda record, *a, **k: calls.append(record["name"]) or load(record, *a, **k))
    monkeypatch.setattr(encode, "compute_features", lambda *a, **k: calls.append("compute") or compute(*a, **k))
    with pytest.raises(PredictError, match=rf"{TEST3[0]}: no transcript for the text input 'text' \(and 1 more\); "
                                           r"give --transcripts FILE .* or write .*Transcripts"):
        predict(run, data=corpus, splits=["Test3"], out=tmp_path / "x.csv", device="cpu")
    half = _table(tmp_path / "half.csv", {TEST3[0]: "only the first"})
    with pytest.raises(PredictError, match=rf"{TEST3[1]}: no transcript for the text input 'text'; "):
        predict(run, data=corpus, splits=["Test3"], transcripts=half, out=tmp_path / "x.csv", device="cpu")
    bad = tmp_path / "bad.csv"
    bad.write_text("FileName,words\nx.wav,hi\n")
    with pytest.raises(PredictError, match=rf"{bad}, line 1: expected columns FileName \(or id\) and text"):
        predict(run, data=corpus, splits=["Test3"], transcripts=bad, out=tmp_path / "x.csv", device="cpu")
    assert calls == [] and not (tmp_path / "x.csv").exists()
    # Rows the text store holds need no text: Development is read from the stores alone.
    for u in load_corpus(corpus, ["Development"]):
        u.transcript.unlink()
    held = predict(run, data=corpus, splits=["Development"], out=tmp_path / "dev.csv", device="cpu")
    assert all(s.startswith("store ") for s in held.sources.values()) and calls == []
    # With the table filling the gaps, the same run goes through both encoders.
    full = _table(tmp_path / "full.csv", {TEST3[0]: "only the first", TEST3[1]: "and the second"})
    done = predict(run, data=corpus, splits=["Test3"], transcripts=full, out=tmp_path / "y.csv", device="cpu")
    assert done.rows == 2 and calls.count("compute") == 2
