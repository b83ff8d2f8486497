"""The Python API (ser_cache.api): docs/python.md's examples, run exactly as written, give what the commands give.

A module fixture builds what the examples' paths name, on a tiny MSP-Podcast-layout corpus: the
stores with extract (tiny Whisper, pooled and frames; MiniLM text), a heads run on the audio and
text stores, and a short fine-tuned WavLM run. The docs' first Python block, which sets those
paths, is replaced by the fixture's paths; every other block runs in order in one namespace.
"""

from __future__ import annotations

import ast
import csv
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ser_cache import Dataset, Predictor, Store, load_features, open_store
from ser_cache.cli.app import app
from ser_cache.features.errors import StoreError
from ser_cache.features.extract import ExtractConfig, extract
from ser_cache.finetune.loop import finetune_wavlm
from ser_cache.finetune.options import FinetuneConfig
from ser_cache.runs.prediction_file import GENDER_PROB_PREFIX, read_predictions

from factories import msp_corpus
from synthetic import train

DOC = Path(__file__).resolve().parents[1] / "docs" / "python.md"
AVD = ["arousal", "valence", "dominance"]
N_LABELLED_TRAIN_DEV = 10  # msp_corpus(n=12): Train, Train, Train, Development, Test1 in turn


def doc_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)


@pytest.fixture(scope="module")
def built(tmp_path_factory, models):
    """The paths of docs/python.md's first block, made real (and small)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("python-api")
    corpus = msp_corpus(root / "corpus")

    def store(model, name, pooling="mean"):
        cfg = ExtractConfig(model=str(model), data=corpus, out=root / "features", name=name, pooling=pooling,
                            device="cpu", workers=0, progress=False)
        return extract(cfg).store

    # Named as the docs' stores are, since the examples index ds.features by store name.
    audio = store(models["whisper"], "whisper-large-v3")
    text = store(models["text"], "roberta-large")
    frames = store(models["whisper"], "whisper-large-v3-frames", pooling="frames")
    heads, _ = train(root, corpus, [audio, text], name="whisper-roberta", epochs=2, lr=1e-3, batch_size=4,
                     select="ccc")
    finetuned = root / "wavlm"
    finetune_wavlm(FinetuneConfig(data=corpus, out=finetuned, model=str(models["wavlm"]), epochs=1, lr_encoder=1e-3,
                                  lr_heads=1e-3, batch_seconds=6, select="ccc", gender_weight=1.0, device="cpu",
                                  threads=1, progress=False))
    yield {"data": str(corpus), "audio_store": str(audio), "text_store": str(text), "frames_store": str(frames),
           "run": str(heads.run_dir), "finetuned_run": str(finetuned)}
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def notebook(built):
    """The namespace after running every example of docs/python.md, top to bottom."""
    paths, *examples = doc_blocks()
    assigned = {t.id for node in ast.parse(paths).body if isinstance(node, ast.Assign) for t in node.targets}
    assert assigned == set(built), "docs/python.md's first block must set exactly the paths the test provides"
    ns = dict(built)
    for i, block in enumerate(examples, start=2):
        exec(compile(block, f"docs/python.md, python block {i}", "exec"), ns)  # noqa: S102 - the docs, run as written
    return ns


def cli_predict(tmp_path: Path, run: str, clips, texts=None) -> tuple[list[str], np.ndarray, dict]:
    """`ser-cache predict RUN FILE... --with-gender` (with the texts as a --transcripts table): ids, avd, gender
    columns."""
    args = ["predict", run, *map(str, clips), "--out", str(tmp_path / "cli.csv"), "--device", "cpu", "--with-gender"]
    if texts is not None:
        table = tmp_path / "texts.csv"
        with open(table, "w", newline="") as f:
            csv.writer(f).writerows([["FileName", "text"], *([Path(c).name, t] for c, t in zip(clips, texts))])
        args += ["--transcripts", str(table)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    ids, avd = read_predictions(tmp_path / "cli.csv")
    assert ids == [Path(c).name for c in clips]
    with open(tmp_path / "cli.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return ids, avd, {k: [r[k] for r in rows] for k in rows[0] if k == "Gender" or k.startswith(GENDER_PROB_PREFIX)}


def assert_same_as_cli(out: dict, cli: tuple, labels: list[str]) -> None:
    _, avd, gender = cli
    np.testing.assert_allclose(np.column_stack([out[a] for a in AVD]), avd, atol=1e-5)
    assert list(out["gender"]) == gender["Gender"]
    for label in labels:
        np.testing.assert_allclose(out[f"gender_prob_{label}"], np.array(gender[GENDER_PROB_PREFIX + label], float),
                                   atol=1e-5)


# --------------------------------------------------------------------------- the documented examples


def test_documented_store_examples(notebook, built):
    store, frame_store = notebook["store"], notebook["frame_store"]
    assert isinstance(store, Store) and not store.is_frames and frame_store.is_frames
    assert len(store.ids) == 14 and store.ids.dtype.kind == "U"  # every file of the corpus, Test3 included
    assert notebook["X"].dtype == np.float16 and notebook["X"].shape == (int(store.written.sum()), *store.shape)
    assert notebook["model_id"] == str(notebook["store"].attrs["model_id"])
    frames = notebook["frames"]
    assert len(frames) == 14 and notebook["first"].shape == (frames.lengths[0], frame_store.shape[1])
    assert notebook["pooled"].shape == (14, frame_store.shape[1])
    with pytest.raises(AttributeError, match="a frame store; its rows are in .frames"):
        frame_store.features  # noqa: B018


def test_documented_join_examples(notebook):
    ds = notebook["ds"]
    assert isinstance(ds, Dataset) and len(ds) == N_LABELLED_TRAIN_DEV
    assert ds.counts == {"corpus_rows": N_LABELLED_TRAIN_DEV, "not_written[whisper-large-v3]": 0,
                         "not_written[roberta-large]": 0, "unlabelled": 0, "kept_rows": N_LABELLED_TRAIN_DEV}
    assert ds.avd.shape == (len(ds), 3) and ds.avd.dtype == np.float32
    assert set(ds.splits) == {"Train", "Development"} and list(ds.ids) == sorted(ds.ids)
    assert notebook["audio"].shape == (len(ds), 32) and ds.features["roberta-large"].shape == (len(ds), 384)
    # The rows are the store's rows of those ids, and the labels the corpus's.
    store = notebook["store"]
    row = {u: i for i, u in enumerate(store.ids)}
    np.testing.assert_array_equal(notebook["audio"], store.features[[row[u] for u in ds.ids]])
    assert set(notebook["scores"]) == {*AVD, "mean"}
    lengths = notebook["lengths"]
    dev = notebook["dev"]
    assert list(notebook["dev_frames"].ids) == list(dev.ids)
    np.testing.assert_array_equal(lengths, notebook["frames"].lengths[[row[u] for u in dev.ids]])


def test_documented_predictions_are_those_of_ser_cache_predict(notebook, built, tmp_path):
    predictor, out, clips, texts = notebook["predictor"], notebook["out"], notebook["clips"], notebook["texts"]
    labels = predictor.gender_labels
    assert labels and list(out) == [*AVD, "gender", *(f"gender_prob_{g}" for g in labels)]
    assert all(len(v) == len(clips) == 4 for v in out.values())
    assert_same_as_cli(out, cli_predict(tmp_path, built["run"], clips, texts), labels)
    # The waveform read from clips[0] gives clips[0]'s prediction.
    for name, column in notebook["one"].items():
        assert column.shape == (1,)
        if column.dtype == object:
            assert column[0] == out[name][0]
        else:
            np.testing.assert_allclose(column[0], out[name][0], atol=1e-5)
    # scores and history are the run's files.
    assert notebook["dev_ccc"] == predictor.scores["ccc"]["mean"] and len(notebook["curve"]) == 2
    assert isinstance(predictor.history[0]["epoch"], int)


def test_documented_finetuned_run_predicts_as_ser_cache_predict(notebook, built, tmp_path):
    wavlm, out = notebook["wavlm"], notebook["out_wavlm"]
    assert list(out)[:3] == AVD and "gender" in out
    assert_same_as_cli(out, cli_predict(tmp_path, built["finetuned_run"], notebook["clips"]), wavlm.gender_labels)


# --------------------------------------------------------------------------- beyond the examples


def test_a_frame_run_predicts_as_ser_cache_predict(built, tmp_path):
    result, _ = train(tmp_path, Path(built["data"]), [Path(built["frames_store"])], name="frames-run", epochs=2,
                      lr=1e-3, batch_size=4, select="ccc")
    clips = sorted(Path(built["data"], "Audios").glob("*.wav"))[-3:]  # Test3 among them: unlabelled audio
    predictor = Predictor.from_run(result.run_dir)
    out = predictor.predict([str(c) for c in clips])
    assert_same_as_cli(out, cli_predict(tmp_path, str(result.run_dir), clips), predictor.gender_labels)


def test_a_class_run_gives_its_codes_and_probabilities_as_ser_cache_predict(built, tmp_path):
    from ser_cache.runs.prediction_file import read_class_predictions

    result, _ = train(tmp_path, Path(built["data"]), [Path(built["audio_store"])], name="class-run", epochs=2,
                      lr=1e-3, batch_size=4, task="categorical", speaker_weight=0)
    clips = sorted(Path(built["data"], "Audios").glob("*.wav"))[-3:]
    predictor = Predictor.from_run(result.run_dir)
    out = predictor.predict([str(c) for c in clips])
    classes = predictor.classes
    assert len(classes) == 8 and not set(AVD) & set(out)  # a categorical run has no attribute heads
    runner = CliRunner().invoke(app, ["predict", str(result.run_dir), *map(str, clips), "--out",
                                      str(tmp_path / "cli.csv"), "--device", "cpu", "--with-probabilities"])
    assert runner.exit_code == 0, runner.output
    ids, codes, probs, order = read_class_predictions(tmp_path / "cli.csv")
    assert list(order) == classes and ids == [c.name for c in clips] and list(out["emotion"]) == codes
    np.testing.assert_allclose(np.column_stack([out[f"emotion_prob_{c}"] for c in classes]), probs, atol=1e-5)


def test_texts_are_required_by_a_text_run_and_refused_by_others(notebook):
    predictor, wavlm, clips = notebook["predictor"], notebook["wavlm"], notebook["clips"]
    with pytest.raises(ValueError, match="has the text input\\(s\\) roberta-large: pass texts="):
        predictor.predict(clips)
    with pytest.raises(ValueError, match="4 input\\(s\\) but 1 text"):
        predictor.predict(clips, texts=["only one"])
    with pytest.raises(ValueError, match="texts\\[1\\] is empty"):
        predictor.predict(clips[:2], texts=["fine", "  "])
    with pytest.raises(ValueError, match="has no text input .*leave texts out"):
        wavlm.predict(clips, texts=["a"] * 4)
    with pytest.raises(ValueError, match="an array of shape \\(2, 3\\)"):
        wavlm.predict(np.zeros((2, 3), np.float32))
    with pytest.raises(FileNotFoundError, match="no such audio file"):
        wavlm.predict(["missing.wav"])


def test_load_features_over_other_splits(built):
    test3 = load_features(built["audio_store"], built["data"], splits=["Test3"], labelled=False)
    assert len(test3) == 2 and np.isnan(test3.avd).all() and test3.counts["unlabelled"] == 2
    assert len(load_features(built["audio_store"], built["data"], splits=["Test3"])) == 0
    assert set(load_features([built["audio_store"]], built["data"], splits=["test1"]).splits) == {"Test1"}


def test_load_features_drops_rows_a_store_has_not_written(built, tmp_path):
    from synthetic import make_store

    ds = load_features(built["audio_store"], built["data"])
    written = np.ones(len(ds), bool)
    written[[0, 3]] = False
    partial = make_store(tmp_path / "partial.zarr", ds.ids, np.ones((len(ds), 4), np.float32), written=written)
    joined = load_features([built["audio_store"], partial], built["data"])
    assert joined.counts["not_written[partial]"] == 2 and list(joined.ids) == list(ds.ids[written])
    lacking = make_store(tmp_path / "lacking.zarr", ds.ids[1:], np.ones((len(ds) - 1, 4), np.float32))
    with pytest.raises(StoreError,
                       match=f"lacks 1 utterance\\(s\\) of the corpus: {ds.ids[0]}; extract it over split\\(s\\) "
                             "Train, Development"):
        load_features([lacking], built["data"])
    assert open_store(partial).written.sum() == len(ds) - 2


def test_importing_ser_cache_loads_neither_torch_nor_zarr():
    code = ("import sys, ser_cache; ser_cache.open_store; "
            "print(sorted(m for m in ('torch', 'zarr', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_a_predictor_loads_each_encoder_once(built, monkeypatch):
    """In a notebook loop over clips, the run's encoders are loaded on the first call only."""
    from ser_cache import Predictor
    from ser_cache.runs import gather

    calls = []
    load = gather._load_encoder
    monkeypatch.setattr(gather, "_load_encoder", lambda *a, **k: calls.append(a[0]["name"]) or load(*a, **k))
    predictor = Predictor.from_run(built["run"])
    clip = next((Path(built["data"]) / "Audios").glob("*.wav"))
    texts = ["a plain day"]
    first = predictor.predict([clip], texts=texts)
    second = predictor.predict([clip], texts=texts)
    assert sorted(calls) == sorted(predictor.input_names)  # once each, not twice
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
