"""Stage two on layered stores: train-heads --layer (one hidden state) equals heads on a store of that
state alone, the learned weighting's record (metrics.json, layer_weights.png, `plot run`), and
`probe-layers` end to end (its members equal the train-heads --layer runs; run again, it reuses them)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from safetensors.torch import load_file
from typer.testing import CliRunner

from ser_cache.cli.app import app
from ser_cache.runs import layout, prediction_file, rundir
from ser_cache.runs.predict import evaluate
from ser_cache.system.errors import TrainError
from ser_cache.train.options import TrainHeadsConfig
from ser_cache.train.probe import ProbeConfig, probe_layers
from ser_cache.train.sweep import parse_variant

from synthetic import make_corpus, make_store, train

HELD = [1, 3, 5, 7]  # the hidden states the layered store holds (a --layers list)
OPTIONS = dict(epochs=3, speaker_weight=0.0)
CLI_OPTIONS = ["--epochs", "3", "--lr", "3e-3", "--batch-size", "32", "--no-undersample", "--speaker-weight", "0",
               "--device", "cpu", "--threads", "1", "--no-progress", "--resamples", "50"]


def settings(layer) -> dict:
    return {"kind": "wavlm", "model_id": "fake/wavlm", "revision": "r1", "pooling": "mean", "layer": layer}


@pytest.fixture(scope="module")
def layered(tmp_path_factory):
    """A corpus whose arousal lives in the 'audio' features, a store of four hidden states (each a
    noisier copy of them), the store of state 5 alone (N, D) under the same name, and a flat store."""
    tmp = tmp_path_factory.mktemp("layers")
    manifest, ids, feats = make_corpus(tmp / "corpus", 120)
    rng = np.random.default_rng(1)
    states = np.stack([feats["audio"] * (0.3 + i / 3) + 0.4 * rng.standard_normal(feats["audio"].shape)
                       for i in range(len(HELD))], axis=1).astype(np.float32)  # (N, 4, 24)
    store = make_store(tmp / "features" / "wavlm.zarr", ids, states, kind="wavlm", settings=settings(HELD))
    alone = make_store(tmp / "state5" / "wavlm.zarr", ids, states[:, HELD.index(5)], kind="wavlm",
                       settings=settings(5))
    flat = make_store(tmp / "features" / "text.zarr", ids, feats["text"], kind="text", modality="text")
    return {"tmp": tmp, "manifest": manifest, "store": store, "alone": alone, "flat": flat}


@pytest.fixture(scope="module")
def layer5(layered):
    """train-heads --layer 5 on the layered store, and the same heads on the store of state 5 alone."""
    tmp, manifest = layered["tmp"], layered["manifest"]
    picked, _ = train(tmp, manifest, [layered["store"]], name="layer5", layer=("5",), **OPTIONS)
    alone, _ = train(tmp, manifest, [layered["alone"]], name="alone", **OPTIONS)
    return picked.run_dir, alone.run_dir


@pytest.fixture(scope="module")
def probe(layered):
    """probe-layers through the CLI: every held state alone and the learned weighting, one seed."""
    out = layered["tmp"] / "probe"
    r = CliRunner().invoke(app, ["probe-layers", str(layered["store"]), "-d", str(layered["manifest"]),
                                 "-o", str(out), *CLI_OPTIONS], terminal_width=80)
    assert r.exit_code == 0, r.output
    return out, r.stdout


def check_png(path) -> None:
    """Not blank: more than one colour, and many."""
    pixels = imread(path)[..., :3].reshape(-1, 3)
    assert pixels.std() > 0 and len(np.unique(pixels, axis=0)) > 10


def test_layer_k_equals_heads_on_a_store_of_that_state_alone(layered, layer5):
    picked, alone = layer5
    assert (picked / layout.DEV_PREDICTIONS).read_text() == (alone / layout.DEV_PREDICTIONS).read_text()
    w_picked, w_alone = load_file(picked / "model.safetensors"), load_file(alone / "model.safetensors")
    assert w_picked.keys() == w_alone.keys()
    assert all(torch.equal(w_picked[k], w_alone[k]) for k in w_alone)
    config = rundir.read_config(picked)
    assert config["train"]["layer"] == ["5"] and config["heads"]["layer_picks"] == {"wavlm": HELD.index(5)}
    assert config["heads"]["input_dims"] == {"wavlm": [len(HELD), 24]}  # the store as it is: evaluate reads it so
    assert "layer" not in rundir.read_config(alone)["train"] and "layer_picks" not in rundir.read_config(alone)["heads"]
    assert "layer_weights" not in json.loads((picked / layout.METRICS).read_text())
    # evaluate reads the layered store and the run picks state 5 again: the scores of the run on state 5 alone
    scores = [evaluate(run, layered["manifest"], "Development", out=layered["tmp"] / f"{run.name}.json",
                       device="cpu")["ccc"] for run in (picked, alone)]
    assert scores[0] == scores[1]


def test_layer_choices_are_checked_against_the_stores(layered):
    tmp, manifest, store, flat = layered["tmp"], layered["manifest"], layered["store"], layered["flat"]
    cases = [([store], ("4",), "holds hidden states 1,3,5,7; choose one of them"),
             ([store, flat], ("text=1",), "has no layer axis"),
             ([store], ("nope=3",), "no input is named nope; the inputs are wavlm"),
             ([flat], ("3",), "no input has a layer axis (text: one vector per utterance)"),
             ([store], ("3", "5"), "--layer is given twice")]
    for stores, layer, message in cases:
        with pytest.raises(TrainError, match="--layer") as err:
            train(tmp, manifest, stores, name="refused", layer=layer, **OPTIONS)
        assert message in str(err.value)
    assert not (tmp / "refused").exists()


def test_a_sweep_variant_sets_the_layer():
    assert parse_variant("mid: layer=6").options == {"layer": ("6",)}
    assert parse_variant("mid: layer=wavlm=6, lr=1e-3").options == {"layer": ("wavlm=6",), "lr": 1e-3}


def test_probe_table_figure_and_the_weighted_member(layered, probe):
    out, stdout = probe
    with open(out / "probe.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["layer"] for r in rows] == [*map(str, HELD), "weighted"]
    summary = json.loads((out / "sweep.json").read_text())
    for row in rows:  # the table is the members' Development CCC
        variant = "base" if row["layer"] == "weighted" else f"layer-{int(row['layer']):02d}"
        (member,) = summary["variants"][variant]["members"]
        metrics = json.loads((out / variant / "seed-0" / layout.METRICS).read_text())
        assert member["ccc"] == metrics["ccc"]
        assert float(row["ccc_mean"]) == pytest.approx(metrics["ccc"]["mean"], abs=1e-6)
    record = json.loads((out / "probe.json").read_text())
    low, high = record["weighted_interval"]["ccc_mean"]
    assert low <= float(rows[-1]["ccc_mean"]) <= high and low < high
    check_png(out / "probe.png")
    assert "weighted" in stdout and max(len(line) for line in stdout.splitlines()) <= 80
    # The weighted member learned a softmax over the four states: recorded, drawn, and `plot run` draws it again.
    base = out / "base" / "seed-0"
    weights = json.loads((base / layout.METRICS).read_text())["layer_weights"]["wavlm"]
    logits = load_file(base / "model.safetensors")["heads.layer_weightings.0.logits"]
    assert weights["layers"] == HELD
    assert weights["weights"] == pytest.approx(torch.softmax(logits, 0).tolist(), abs=1e-6)
    check_png(base / "layer_weights.png")
    r = CliRunner().invoke(app, ["plot", "run", str(base), "--out", str(layered["tmp"] / "figures")])
    assert r.exit_code == 0, r.output
    check_png(layered["tmp"] / "figures" / "layer_weights.png")


def test_probe_members_equal_train_heads_layer_runs_and_a_probe_resumes(layered, layer5, probe):
    out, _ = probe
    picked, _ = layer5
    member = out / "layer-05" / "seed-0"
    config = rundir.read_config(member)
    assert config["train"]["layer"] == ["wavlm=5"] and config["heads"]["layer_picks"] == {"wavlm": HELD.index(5)}
    ids, pred = prediction_file.read_predictions(member / layout.DEV_PREDICTIONS)
    own_ids, own = prediction_file.read_predictions(picked / layout.DEV_PREDICTIONS)
    assert ids == own_ids and np.abs(pred - own).max() < 1e-4
    assert (json.loads((member / layout.METRICS).read_text())["best_epoch"]
            == json.loads((picked / layout.METRICS).read_text())["best_epoch"])
    # Run again: every member is reused, nothing trained.
    cfg = TrainHeadsConfig(features=(layered["store"],), data=layered["manifest"], out=out, epochs=3, lr=3e-3,
                           batch_size=32, undersample=False, speaker_weight=0.0, device="cpu", progress=False)
    again = probe_layers(ProbeConfig(store=layered["store"], base=cfg, resamples=50))
    assert (again.trained, again.reused) == (0, len(HELD) + 1)
    assert [r["layer"] for r in again.table] == [*HELD, "weighted"]


def test_probe_refuses_a_store_without_layers_and_its_own_layer_option(layered):
    r = CliRunner().invoke(app, ["probe-layers", str(layered["flat"]), "-d", str(layered["manifest"]),
                                 "-o", str(layered["tmp"] / "flat-probe"), *CLI_OPTIONS])
    assert r.exit_code == 2 and "no layer axis to probe" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["probe-layers", str(layered["store"]), "-d", str(layered["manifest"]),
                                 "-o", str(layered["store"] / "inside"), *CLI_OPTIONS])
    assert r.exit_code == 2 and "Traceback" not in r.output


@pytest.mark.slow
def test_probe_on_mini_podcast(tmp_path, mini_podcast, models, one_torch_thread):
    """The layer-analysis figure on mini-podcast: every hidden state of a tiny Whisper-shaped encoder
    (mean+std, --layers all) alone and their weighting, from a real extract. Arousal lives in the
    voice, so every state carries it; the member of the last state equals train-heads --layer 2."""
    from ser_cache.features.extract import ExtractConfig, extract

    cfg = ExtractConfig(model=str(models["whisper"]), data=mini_podcast, out=tmp_path / "features", name="audio",
                        window="trimmed", pooling="mean+std", layers="all", device="cpu", workers=0, progress=False)
    store = extract(cfg).store
    options = ["--epochs", "8", "--lr", "3e-3", "--batch-size", "32", "--no-undersample", "--speaker-weight", "0",
               "--device", "cpu", "--threads", "1", "--no-progress"]
    out = tmp_path / "probe"
    r = CliRunner().invoke(app, ["probe-layers", str(store), "--data", str(mini_podcast), "--out", str(out),
                                 "--resamples", "100", *options])
    assert r.exit_code == 0, r.output
    with open(out / "probe.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["layer"] for r in rows] == ["0", "1", "2", "weighted"]  # 2 layers: 3 hidden states
    for row in rows:
        assert float(row["ccc_arousal"]) > 0.3, rows
    check_png(out / "probe.png")
    r = CliRunner().invoke(app, ["train-heads", "-f", str(store), "-d", str(mini_podcast), "-o", str(tmp_path / "l2"),
                                 "--layer", "2", *options])
    assert r.exit_code == 0, r.output
    ids, pred = prediction_file.read_predictions(out / "layer-02" / "seed-0" / layout.DEV_PREDICTIONS)
    own_ids, own = prediction_file.read_predictions(tmp_path / "l2" / layout.DEV_PREDICTIONS)
    assert ids == own_ids and np.abs(pred - own).max() < 1e-4
