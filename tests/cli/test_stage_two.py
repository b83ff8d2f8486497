"""The stage-two commands through the real app: train-heads, evaluate, predict, ensemble."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from ser_cache.cli.app import app
from ser_cache.runs import layout, prediction_file

from synthetic import make_corpus, make_store

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.slow
def test_train_evaluate_predict_ensemble(tmp_path):
    manifest, ids, feats = make_corpus(tmp_path / "corpus", 240)
    audio = make_store(tmp_path / "f" / "audio.zarr", ids, feats["audio"])
    text = make_store(tmp_path / "f" / "text.zarr", ids, feats["text"], kind="text", modality="text")
    common = ["--data", manifest, "--epochs", 6, "--lr", 3e-3, "--batch-size", 32, "--no-undersample",
              "--device", "cpu", "--threads", 1, "--no-progress"]

    r = invoke("train-heads", "--features", audio, "--features", text, "--out", tmp_path / "mm", *common,
               "--gender-weight", 0.5, "--speaker-weight", 0, "--select", "ccc", "--seed", 3)
    assert r.exit_code == 0, r.output
    assert "arousal" in r.output and "mean" in r.output and "gender accuracy" in r.output
    config = json.loads((tmp_path / "mm" / layout.CONFIG).read_text())
    train = config["train"]
    assert (train["epochs"], train["batch_size"], train["undersample"], train["gender_weight"], train["speaker_weight"],
            train["select"], train["seed"]) == (6, 32, False, 0.5, 0.0, "ccc", 3)

    r = invoke("train-heads", "--features", audio, "--out", tmp_path / "mm", *common)
    assert r.exit_code == 2 and "already exists" in r.output and "--overwrite" in r.output
    r = invoke("train-heads", "--features", audio, "--out", tmp_path / "audio", *common, "--ox", "train+dev",
               "--aam-margin", 0.3, "--aam-scale", 20)
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "audio" / layout.CONFIG).read_text())["heads"]["aam_margin"] == 0.3

    assert (tmp_path / "mm" / "curves.png").is_file()  # drawn with the run, inside it
    r = invoke("evaluate", tmp_path / "mm", "--data", manifest, "--split", "Test1", "--device", "cpu",
               "--plots", tmp_path / "figs")
    assert r.exit_code == 0, r.output
    assert "Test1" in r.output and "balanced CCC" in r.output
    scores = json.loads((tmp_path / "mm" / "eval_Test1.json").read_text())
    assert -1 <= scores["ccc"]["mean"] <= 1
    # predicted vs true, CCC per emotion class, and the gender head's confusion matrix
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["ccc_per_class.png", "gender_confusion.png",
                                                                     "scatter.png"]

    outputs = []
    for run in ("mm", "audio"):
        dest = tmp_path / f"{run}_test1.csv"
        r = invoke("predict", tmp_path / run, "--data", manifest, "--split", "Test1", "--out", dest, "--device", "cpu")
        assert r.exit_code == 0, r.output
        outputs.append(dest)
    test1 = [r.split(",")[1] for r in manifest.read_text().splitlines()[1:] if r.split(",")[2] == "Test1"]
    assert prediction_file.read_predictions(outputs[0])[0] == prediction_file.read_predictions(outputs[1])[0] == test1

    r = invoke("ensemble", *outputs, "--out", tmp_path / "final.csv", "--weights", "0.7,0.3", "--data", manifest,
               "--split", "Test1", "--plots", tmp_path / "figs")
    assert r.exit_code == 0, r.output
    assert "ensemble" in r.output and "mean" in r.output
    # each member's CCC beside the ensemble's, as evaluate gives them
    member = prediction_file.read_predictions(outputs[1])
    from ser_cache.runs.ensemble import score_predictions

    assert f"{score_predictions(*member, manifest, 'Test1')['ccc']['mean']:.4f}" in r.output
    assert "audio_test1" in r.output and (tmp_path / "figs" / "ensemble.png").is_file()
    a, b = prediction_file.read_predictions(outputs[0])[1], prediction_file.read_predictions(outputs[1])[1]
    np.testing.assert_allclose(prediction_file.read_predictions(tmp_path / "final.csv")[1], 0.7 * a + 0.3 * b,
                               atol=1e-5)

    r = invoke("ensemble", *outputs, "--out", tmp_path / "x.csv", "--weights", "a,b")
    assert r.exit_code == 2 and "--weights" in r.output


def test_errors_are_one_line_with_exit_code_2(tmp_path):
    manifest, ids, feats = make_corpus(tmp_path / "corpus", 60)
    short = make_store(tmp_path / "short.zarr", ids[1:], feats["audio"][1:])
    r = invoke("train-heads", "--features", short, "--data", manifest, "--out", tmp_path / "r", "--no-progress")
    assert r.exit_code == 2 and ids[0] in r.output and "Traceback" not in r.output
    r = invoke("train-heads", "--features", short, "--data", manifest, "--out", tmp_path / "r", "--batch-size", 1,
               "--epochs", 0)
    assert r.exit_code == 2 and "--batch-size 1" in r.output and "--epochs 0" in r.output
    # --ox has fixed choices: click refuses another before any work, listing them.
    r = invoke("train-heads", "--features", short, "--data", manifest, "--out", tmp_path / "r", "--ox", "sometimes")
    assert r.exit_code == 2 and "'sometimes' is not one of 'keep', 'drop', 'only'" in r.output
    r = invoke("predict", tmp_path / "nothing", "--out", tmp_path / "p.csv", "--data", manifest, "--split", "Test1")
    assert r.exit_code == 2 and "not a run directory" in r.output
    r = invoke("ensemble", tmp_path / "a.csv", tmp_path / "b.csv", "--out", tmp_path / "e.csv")
    assert r.exit_code == 2 and "no such prediction file" in r.output


def test_help_is_the_docstring():
    for command, words in (("train-heads", "Train arousal/valence/dominance heads"), ("evaluate", "Score a run"),
                           ("predict", "challenge's CSV format"), ("ensemble", "Average the")):
        r = invoke(command, "--help")
        assert r.exit_code == 0 and words in " ".join(r.output.split()), (command, r.output)


def test_a_class_run_through_the_app_prints_its_class_table_and_refuses_attribute_options(tmp_path):
    from synthetic import make_class_corpus

    manifest, ids, feats, _ = make_class_corpus(tmp_path / "corpus", 240)
    audio = make_store(tmp_path / "f" / "audio.zarr", ids, feats["audio"])
    text = make_store(tmp_path / "f" / "text.zarr", ids, feats["text"])
    r = invoke("train-heads", "--features", audio, "--features", text, "--out", tmp_path / "cat", "--data", manifest,
               "--task", "categorical", "--epochs", 3, "--lr", 3e-3, "--batch-size", 32, "--no-undersample",
               "--speaker-weight", 0, "--device", "cpu", "--threads", 1, "--no-progress")
    assert r.exit_code == 0, r.output
    r = invoke("evaluate", tmp_path / "cat", "--data", manifest, "--split", "Test1", "--device", "cpu",
               "--plots", tmp_path / "figs")
    assert r.exit_code == 0, r.output
    assert "macro-F1" in r.output and "balanced accuracy" in r.output and "CCC" not in r.output
    assert (tmp_path / "figs" / "class_confusion.png").is_file() and (tmp_path / "figs" / "f1_per_class.png").is_file()
    saved = json.loads((tmp_path / "cat" / "eval_Test1.json").read_text())
    assert saved["categorical"]["rows"] + saved["no_class_target"] == sum(
        1 for line in manifest.read_text().splitlines()[1:] if ",Test1," in line)
    r = invoke("predict", tmp_path / "cat", "--data", manifest, "--split", "Test1", "--task", "attributes",
               "--out", tmp_path / "x.csv", "--device", "cpu")
    assert r.exit_code == 2 and "--task attributes" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "x.csv").exists()
    r = invoke("predict", tmp_path / "cat", "--data", manifest, "--split", "Test1", "--with-probabilities",
               "--out", tmp_path / "p.csv", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "p.csv").read_text().splitlines()[0].startswith("FileName,EmoClass,prob_A,")
