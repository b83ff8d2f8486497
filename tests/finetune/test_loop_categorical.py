"""`finetune wavlm --task categorical|both` (issue 19): the class head on the fine-tuned WavLM, with
train-heads' class targets, loss, selection and run files, on a tiny random WavLM and self-made
audio whose classes follow the pitch (finetune_support.learnable_corpus, learnable_classes)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sklearn.metrics import f1_score

from ser_cache.finetune.loop import finetune_wavlm
from ser_cache.runs import layout, prediction_file, rundir
from ser_cache.runs.checkpoint_file import CHECKPOINT
from ser_cache.system.errors import TrainError
from ser_cache.system.finetuned import AUDIO_INPUT
from ser_cache.system.losses import class_weights
from ser_cache.system.tasks import CLASSES_8

from finetune_support import base_config, cli_args, interrupted_run, learnable_corpus


@pytest.fixture(scope="module")
def corpus_cls(tmp_path_factory) -> Path:
    return learnable_corpus(tmp_path_factory.mktemp("ftc") / "corpus", learnable_classes=True)


def _labels(corpus: Path, split: str) -> dict[str, str]:
    lines = (corpus / "Labels" / "labels_consensus.csv").read_text().splitlines()[1:]
    return {p[0]: p[1] for p in (line.split(",") for line in lines) if p[-1] == split}


@pytest.fixture(scope="module")
def categorical(corpus_cls, models, tmp_path_factory):
    cfg = base_config(corpus_cls, models["wavlm"], tmp_path_factory.mktemp("ftc-run") / "run", epochs=4,
                      task="categorical", select="balanced", undersample=False)
    return cfg, finetune_wavlm(cfg)


def test_a_categorical_run_records_the_class_metrics_and_files_of_a_train_heads_class_run(categorical, corpus_cls):
    cfg, result = categorical
    run = result.run_dir
    assert sorted(p.name for p in run.iterdir()) == sorted(
        [layout.CONFIG, layout.WEIGHTS, layout.METRICS, layout.HISTORY, layout.DEV_CLASS_PREDICTIONS])
    config = rundir.read_config(run)
    assert config["system"] == "finetuned-wavlm"
    assert config["train"]["task"] == "categorical" and config["train"]["classes"] == 8
    assert config["heads"]["n_classes"] == 8 and config["heads"]["attributes"] is False
    assert config["heads"]["input_dims"] == {AUDIO_INPUT: [256]}
    # The baseline's weights over the training rows with a class (no undersampling): X rows count nothing.
    train = [c for c in _labels(corpus_cls, "Train").values() if c != "X"]
    expected = class_weights([train.count(c) for c in CLASSES_8])
    assert config["categorical"] == {"task": "categorical", "classes": list(CLASSES_8),
                                     "class_weights": pytest.approx(expected)}
    assert config["data"]["no_class_target[train]"] == 2 and config["data"]["no_class_target[dev]"] == 2

    history = result.history
    assert len(history) == cfg.epochs
    assert {"loss_total", "loss_class", "dev_macro_f1", "dev_accuracy", "dev_balanced_accuracy"} <= set(history[0])
    assert not any(k.startswith(("loss_ccc", "dev_ccc")) for k in history[0])
    f1 = [h["dev_macro_f1"] for h in history]
    assert result.best_epoch == int(np.argmax(f1)) + 1  # kept by Development macro-F1 (first best)
    metrics = result.metrics
    assert metrics["categorical"]["macro_f1"] == pytest.approx(f1[result.best_epoch - 1])
    assert "ccc" not in metrics

    # The Development rows with a class (X left out), scored as scikit-learn scores the written file.
    dev = {k: c for k, c in _labels(corpus_cls, "Development").items() if c != "X"}
    ids, codes, probs, classes = prediction_file.read_class_predictions(run / layout.DEV_CLASS_PREDICTIONS)
    assert sorted(ids) == sorted(dev) and tuple(classes) == CLASSES_8
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-4)
    ours = f1_score([dev[i] for i in ids], codes, average="macro", labels=list(CLASSES_8), zero_division=0)
    assert metrics["categorical"]["macro_f1"] == pytest.approx(ours)


def test_the_class_loss_trains_the_model(categorical):
    """The weighted cross-entropy falls (a tiny random WavLM on 24 clips learns too unsteadily for a
    macro-F1 bound; learning the classes is train-heads' test on the same loss and head)."""
    _, result = categorical
    history = result.history
    assert history[-1]["loss_class"] < history[0]["loss_class"] - 0.3
    assert history[-1]["loss_total"] == pytest.approx(history[-1]["loss_class"] + history[-1]["loss_gender"]
                                                      + 0.1 * history[-1]["loss_speaker"], rel=1e-5)


def test_both_trains_the_class_head_beside_the_attribute_heads(corpus_cls, models, tmp_path):
    cfg = base_config(corpus_cls, models["wavlm"], tmp_path / "both", epochs=2, task="both", undersample=False,
                      class_loss_weight=0.5)
    result = finetune_wavlm(cfg)
    run = result.run_dir
    names = {p.name for p in run.iterdir()}
    assert {layout.DEV_PREDICTIONS, layout.DEV_CLASS_PREDICTIONS, "curves.png"} <= names
    config = rundir.read_config(run)
    assert config["heads"]["n_classes"] == 8 and "attributes" not in config["heads"]
    assert config["categorical"]["task"] == "both" and config["train"]["class_loss_weight"] == 0.5
    history = result.history
    assert {"loss_ccc", "loss_class", "dev_ccc_mean", "dev_macro_f1"} <= set(history[0])
    # --select ccc under both: the mean of the mean CCC and the macro-F1.
    score = [(h["dev_ccc_mean"] + h["dev_macro_f1"]) / 2 for h in history]
    assert result.best_epoch == int(np.argmax(score)) + 1
    # X rows stay in the run (scored for CCC, given a class as train-heads' both runs do); the class
    # metrics leave them out.
    ids, _ = prediction_file.read_predictions(run / layout.DEV_PREDICTIONS)
    class_ids = prediction_file.read_class_predictions(run / layout.DEV_CLASS_PREDICTIONS)[0]
    assert len(ids) == len(class_ids) == 12
    assert result.metrics["categorical"]["rows"] == 10
    weights = load_file(str(run / layout.WEIGHTS))
    assert any(k.startswith("heads.classifier.") for k in weights)
    assert any(k.startswith("heads.regressors.") for k in weights)


def test_a_categorical_run_cannot_be_kept_by_ccc(corpus_cls, models, tmp_path):
    cfg = base_config(corpus_cls, models["wavlm"], tmp_path / "r", task="categorical", select="ccc")
    with pytest.raises(TrainError, match="--select ccc"):
        finetune_wavlm(cfg)


@pytest.mark.slow
def test_a_stopped_categorical_run_resumes_to_the_uninterrupted_one(categorical, tmp_path):
    cfg, whole = categorical
    out = interrupted_run(replace(cfg, out=tmp_path / "run"), after_epoch=2)
    resumed = finetune_wavlm(replace(cfg, out=out, resume=True))
    assert [h["epoch"] for h in resumed.history] == list(range(1, cfg.epochs + 1))
    assert resumed.best_epoch == whole.best_epoch and resumed.metrics == whole.metrics
    a, b = load_file(str(whole.run_dir / layout.WEIGHTS)), load_file(str(out / layout.WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical
    written = layout.DEV_CLASS_PREDICTIONS
    assert (out / written).read_bytes() == (whole.run_dir / written).read_bytes()
    assert rundir.read_config(out)["categorical"] == rundir.read_config(whole.run_dir)["categorical"]
    assert not (out / CHECKPOINT).exists() and layout.is_run_dir(out)


def test_a_resumed_class_run_refuses_another_task(categorical, tmp_path):
    cfg, _ = categorical
    out = interrupted_run(replace(cfg, out=tmp_path / "run", epochs=2), after_epoch=1)
    with pytest.raises(TrainError, match="task"):
        finetune_wavlm(replace(cfg, out=out, epochs=2, resume=True, task="both"))


def test_a_class_run_starts_from_an_attribute_runs_weights(corpus_cls, models, tmp_path, caplog):
    """--init-from a run without a class head (the authors' dimensional model, say): the encoder is
    taken over, the class head starts afresh, and a categorical run leaves the A/V/D heads out."""
    source = finetune_wavlm(base_config(corpus_cls, models["wavlm"], tmp_path / "attributes", epochs=1)).run_dir
    cfg = base_config(corpus_cls, models["wavlm"], tmp_path / "cat", epochs=1, task="categorical",
                      select="balanced", init_from=source, lr_encoder=1e-12, lr_heads=1e-12)
    with caplog.at_level("INFO", logger="ser_cache.finetune.checkpoint"):
        run = finetune_wavlm(cfg).run_dir
    assert "classifier start afresh" in caplog.text
    theirs, ours = load_file(str(source / layout.WEIGHTS)), load_file(str(run / layout.WEIGHTS))
    assert not any(k.startswith("heads.regressors.") for k in ours)
    key = "wavlm.encoder.layers.0.attention.q_proj.weight"
    torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=0)


def test_the_command_takes_the_task_and_prints_the_class_table(corpus_cls, models, tmp_path):
    from typer.testing import CliRunner

    from ser_cache.cli.app import app

    cfg = base_config(corpus_cls, models["wavlm"], tmp_path / "cli", epochs=1, select="balanced")
    res = CliRunner().invoke(app, [*cli_args(cfg), "--task", "categorical", "--classes", "9",
                                   "--class-weights", "none"])
    assert res.exit_code == 0, res.output[-3000:]
    assert "macro-F1" in res.output
    config = rundir.read_config(cfg.out)
    assert config["categorical"] == {"task": "categorical", "classes": [*CLASSES_8, "O"], "class_weights": [1.0] * 9}
    assert config["train"]["class_weights"] == "none" and config["heads"]["n_classes"] == 9
