"""ser-cache sweep: members trained together equal train-heads runs, the stack, the summary, reuse, the CLI."""

from __future__ import annotations

import copy
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ser_cache.cli.app import app
from ser_cache.runs import layout, prediction_file, rundir
from ser_cache.system.heads import MultitaskHeads
from ser_cache.system.losses import AAMSoftmax
from ser_cache.system.metrics import ccc_table
from ser_cache.system.model import FeatureModel
from ser_cache.train.options import TrainHeadsConfig
from ser_cache.train.recipe import train_heads
from ser_cache.train.stack import MemberStack, OneMember, StackedAdamW, stack_of
from ser_cache.train.sweep import SweepConfig, TrainError, parse_variant, sweep

from synthetic import make_corpus, make_frame_corpus, make_frame_store, make_store

OPTIONS = dict(epochs=4, lr=3e-3, batch_size=32, undersample=False, progress=False, device="cpu", threads=1,
               speaker_weight=0.0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    manifest, ids, feats = make_corpus(tmp / "corpus", 200)
    stores = [make_store(tmp / "features" / f"{name}.zarr", ids, x, kind="text" if name == "text" else "whisper",
                         modality="text" if name == "text" else "audio") for name, x in feats.items()]
    return manifest, stores


def base_config(corpus, out: Path, **kw) -> TrainHeadsConfig:
    manifest, stores = corpus
    return TrainHeadsConfig(**{"features": tuple(stores), "data": manifest, "out": out, **OPTIONS, **kw})


# --------------------------------------------------------------------------- variants


def test_parse_variant_reads_options_and_names_what_is_wrong():
    v = parse_variant("no-ox: ox=drop, lr=1e-3 undersample=no --gender_weight=0 inputs=a+b")
    assert v.name == "no-ox"
    assert v.options == {"ox": "drop", "lr": 1e-3, "undersample": False, "gender_weight": 0.0, "inputs": "a+b"}
    with pytest.raises(TrainError, match="expected 'NAME: option=value"):
        parse_variant("ox=drop")
    with pytest.raises(TrainError, match="'epochs=3' is not option=value"):
        parse_variant("x: epochs=3")
    with pytest.raises(TrainError, match="batch-size=big: expected an integer"):
        parse_variant("x: batch-size=big")
    with pytest.raises(TrainError, match="undersample=maybe: expected yes or no"):
        parse_variant("x: undersample=maybe")
    with pytest.raises(TrainError, match="changes no option"):
        parse_variant("x:")


def test_sweep_options_are_checked_before_any_work(corpus, tmp_path):
    cfg = SweepConfig(base_config(corpus, tmp_path / "s"), seeds=0, variants=(parse_variant("base: lr=1"),
                      parse_variant("bad: ox=sideways")), reference="nope")
    with pytest.raises(TrainError) as e:
        sweep(cfg)
    message = str(e.value)
    for part in ("--seeds 0", "--variant base", "--reference nope", "--variant bad: --ox sideways"):
        assert part in message, message
    assert not (tmp_path / "s").exists()


# --------------------------------------------------------------------------- the stack


def _member(seed: int, frames: bool):
    """A model with frame input "a" (through a ConvPool) or vector input "a", and its AAM."""
    torch.manual_seed(seed)
    heads = MultitaskHeads({"a": (16,), "b": (8,)}, hidden=8, dropout=0.0, label_min=[1, 1, 1],
                           label_max=[7, 6 + seed, 7], n_genders=2, n_speakers=5)
    return FeatureModel(heads, {"a": {"in_dim": 6, "dim": 16, "dropout": 0.0}} if frames else None), AAMSoftmax(256, 5)


def _inputs(k: int, frames: bool, batch: int = 10):
    if frames:
        return {"a": (torch.randn(k, batch, 7, 6), torch.randint(1, 8, (k, batch))), "b": torch.randn(k, batch, 8)}
    return {"a": torch.randn(k, batch, 16), "b": torch.randn(k, batch, 8)}


def _take(inputs, k):
    return {n: (v[0][k], v[1][k]) if isinstance(v, tuple) else v[k] for n, v in inputs.items()}


@pytest.mark.parametrize(("frames", "k"), [(False, 3), (True, 3), (True, 1)])
def test_stack_member_computes_what_its_own_model_computes(frames, k):
    members = [_member(s, frames) for s in range(k)]
    stack = MemberStack([m for m, _ in members], [a for _, a in members])
    stack.eval()
    x = _inputs(k, frames)
    out = stack.forward(x)
    for i, (model, _) in enumerate(members):
        ref = model.eval()(_take(x, i))
        for key in ("avd", "gender_logits", "speaker_embedding"):
            assert torch.allclose(out[key][i], ref[key], atol=1e-5), key
        state, _ = stack.member_state(i)
        assert all(torch.equal(state[n], v) for n, v in model.state_dict().items())
    shared = stack.forward(_take(x, 0), shared=True)  # the same rows for every member
    for i, (model, _) in enumerate(members):
        assert torch.allclose(shared["avd"][i], model(_take(x, 0))["avd"], atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 3])
def test_stacked_adamw_steps_each_member_as_its_own_adamw(k):
    members = [_member(s, True) for s in range(k)]
    own = copy.deepcopy(members)
    stack = MemberStack([m for m, _ in members], [a for _, a in members])
    lrs, decays = [1e-2, 1e-2, 3e-3][:k], [0.01, 0.0, 0.01][:k]
    optimizer = StackedAdamW(stack.parameters(), lrs, decays)
    optimizers = [torch.optim.AdamW([*m.parameters(), *a.parameters()], lr=lr, weight_decay=wd)
                  for (m, a), lr, wd in zip(own, lrs, decays)]
    torch.manual_seed(0)
    for step in range(5):
        x, y, spk = _inputs(k, True), torch.rand(k, 10, 3) * 6 + 1, torch.randint(0, 5, (k, 10))
        active = [True, step < 3, True][:k]  # member 1 has run out of batches after three steps
        out = stack.forward(x)
        loss = sum(((out["avd"][i] - y[i]) ** 2).mean() + stack.speaker_loss(i, out["speaker_embedding"][i], spk[i])
                   for i in range(k) if active[i])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step(active)
        for i, ((model, aam), opt) in enumerate(zip(own, optimizers)):
            if active[i]:
                o = model(_take(x, i))
                own_loss = ((o["avd"] - y[i]) ** 2).mean() + aam(o["speaker_embedding"], spk[i])
                opt.zero_grad()
                own_loss.backward()
                opt.step()
    for i, (model, aam) in enumerate(own):
        state, aam_state = stack.member_state(i)
        for name, value in model.state_dict().items():
            assert torch.allclose(state[name], value, atol=1e-6), (i, name)
        assert torch.allclose(aam_state["weight"], aam.weight, atol=1e-6)
    assert not torch.equal(stack.member_state(0)[0]["heads.regressors.arousal.mlp.0.weight"],
                           members[0][0].state_dict()["heads.regressors.arousal.mlp.0.weight"])


def test_one_member_is_the_model_itself_and_trains_in_place():
    """train-heads is fit() with one job: the model itself, its own parameters, torch's AdamW."""
    (model, aam), other = _member(0, True), _member(1, True)
    assert isinstance(stack_of([model, other[0]], [aam, other[1]]), MemberStack)
    one = stack_of([model], [aam])
    assert isinstance(one, OneMember)
    x = _inputs(1, True)
    model.eval()
    assert torch.equal(one.forward(x)["avd"][0], model(_take(x, 0))["avd"])
    before = copy.deepcopy(model.state_dict())
    own = copy.deepcopy(model)
    one.train()
    optimizer = one.optimizer([1e-2], [0.01], fused=False)
    own_optimizer = torch.optim.AdamW(own.parameters(), lr=1e-2, weight_decay=0.01)
    torch.manual_seed(0)
    for _ in range(3):
        y = torch.rand(10, 3) * 6 + 1
        x = _inputs(1, True)
        loss = ((one.forward(x)["avd"][0] - y) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step([True])
        own_loss = ((own(_take(x, 0))["avd"] - y) ** 2).mean()
        own_optimizer.zero_grad()
        own_loss.backward()
        own_optimizer.step()
    state, _ = one.member_state(0)
    assert all(torch.equal(state[n], v) for n, v in own.state_dict().items())
    assert not torch.equal(state["heads.regressors.arousal.mlp.0.weight"],
                           before["heads.regressors.arousal.mlp.0.weight"])


# --------------------------------------------------------------------------- members equal train-heads runs


@pytest.mark.slow
def test_members_equal_the_train_heads_runs_of_their_options(corpus, tmp_path):
    """Members of one stack differ in seed, O/X selection, undersampling and learning rate: each one
    ends where train-heads with its options ends, and its run directory is an ordinary run."""
    variants = (parse_variant("drop: ox=drop"), parse_variant("us: undersample=yes lr=1e-3"),
                parse_variant("text: inputs=text"))
    result = sweep(SweepConfig(base_config(corpus, tmp_path / "sweep", gender_weight=1.0), seeds=2,
                               variants=variants, resamples=50))
    assert result.trained == 8 and result.reused == 0
    for name, seed, kw in (("base", 1, {}), ("drop", 0, {"ox": "drop"}), ("us", 1, {"undersample": True, "lr": 1e-3}),
                           ("text", 0, {"features": (corpus[1][1],)})):
        own = train_heads(base_config(corpus, tmp_path / f"own-{name}", gender_weight=1.0, seed=seed, **kw))
        member = tmp_path / "sweep" / name / f"seed-{seed}"
        metrics = json.loads((member / layout.METRICS).read_text())
        assert metrics["best_epoch"] == own.best_epoch
        assert metrics["ccc"]["mean"] == pytest.approx(own.metrics["ccc"]["mean"], abs=1e-5), name
        config = rundir.read_config(member)
        assert config["sweep"]["variant"] == name and config["sweep"]["seed"] == seed
        assert config["train"]["seed"] == seed and [i["name"] for i in config["inputs"]] == \
            [i["name"] for i in rundir.read_config(own.run_dir)["inputs"]]
        ids, pred = prediction_file.read_predictions(member / layout.DEV_PREDICTIONS)
        own_ids, own_pred = prediction_file.read_predictions(own.run_dir / layout.DEV_PREDICTIONS)
        assert ids == own_ids and np.abs(pred - own_pred).max() < 1e-4


@pytest.mark.slow
def test_frame_members_equal_train_heads_runs(tmp_path):
    manifest, ids, frames, text = make_frame_corpus(tmp_path / "corpus", 160)
    stores = (make_frame_store(tmp_path / "f" / "frames.zarr", ids, frames),
              make_store(tmp_path / "f" / "text.zarr", ids, text, kind="text", modality="text"))
    base = TrainHeadsConfig(features=stores, data=manifest, out=tmp_path / "sweep", **{**OPTIONS, "epochs": 3},
                            conv_dropout=0.0, conv_dim=16, hidden=16)
    result = sweep(SweepConfig(base, seeds=2, variants=(parse_variant("lr: lr=1e-3"),), resamples=20))
    assert result.trained == 4 and not (tmp_path / "sweep" / "lr" / "seed-1" / "curves.png").exists()
    own = train_heads(TrainHeadsConfig(features=stores, data=manifest, out=tmp_path / "own",
                                       **{**OPTIONS, "epochs": 3, "lr": 1e-3, "seed": 1}, conv_dropout=0.0,
                                       conv_dim=16, hidden=16))
    metrics = json.loads((tmp_path / "sweep" / "lr" / "seed-1" / layout.METRICS).read_text())
    assert metrics["best_epoch"] == own.best_epoch
    assert metrics["ccc"]["mean"] == pytest.approx(own.metrics["ccc"]["mean"], abs=1e-4)
    assert rundir.read_config(tmp_path / "sweep" / "lr" / "seed-1")["frame_inputs"]


# --------------------------------------------------------------------------- the summary, reuse, refusals


def test_summary_mean_std_and_bootstrap_come_from_the_member_runs(corpus, tmp_path):
    cfg = SweepConfig(base_config(corpus, tmp_path / "sweep"), seeds=3,
                      variants=(parse_variant("drop: ox=drop"), parse_variant("slow: lr=3e-4")), resamples=200)
    summary = sweep(cfg).summary
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["reference"] == "base" and summary["seeds"] == [0, 1, 2]
    assert set(summary["comparisons"]) == {"drop", "slow"}
    means = {}
    for name in ("base", "drop", "slow"):
        scores = [json.loads((tmp_path / "sweep" / name / f"seed-{s}" / layout.METRICS).read_text())["ccc"]["mean"]
                  for s in range(3)]
        assert summary["variants"][name]["mean"]["ccc_mean"] == pytest.approx(np.mean(scores))
        assert summary["variants"][name]["std"]["ccc_mean"] == pytest.approx(np.std(scores, ddof=1))
        means[name] = np.mean(scores)
    # Every member is scored on all Development rows here, so the observed difference is the
    # difference of the variants' mean CCCs; the slower learning rate is clearly worse.
    for name in ("drop", "slow"):
        c = summary["comparisons"][name]
        assert c["difference"] == pytest.approx(means[name] - means["base"], abs=1e-6)  # the CSV rounds
        assert c["ci_low"] <= c["difference"] <= c["ci_high"] and c["resamples"] == 200
    slow = summary["comparisons"]["slow"]
    assert slow["ci_high"] < 0 and slow["share_positive"] == 0.0


def test_comparisons_use_the_rows_both_variants_were_scored_on(corpus, tmp_path):
    """--ox train+dev moves Development's O/X rows into training: the comparison leaves them out."""
    cfg = SweepConfig(base_config(corpus, tmp_path / "sweep"), seeds=1, variants=(parse_variant("oxv: ox=train+dev"),),
                      resamples=20)
    summary = sweep(cfg).summary
    ids_b, pred_b = prediction_file.read_predictions(tmp_path / "sweep" / "base" / "seed-0" / layout.DEV_PREDICTIONS)
    ids_v, pred_v = prediction_file.read_predictions(tmp_path / "sweep" / "oxv" / "seed-0" / layout.DEV_PREDICTIONS)
    assert len(ids_v) < len(ids_b) and summary["comparisons"]["oxv"]["rows"] == len(ids_v)
    keep = np.isin(ids_b, ids_v)
    import csv

    with open(corpus[0], newline="") as f:
        truth = {r["id"]: [float(r[a]) for a in ("arousal", "valence", "dominance")] for r in csv.DictReader(f)}
    t = np.array([truth[i] for i in ids_v])
    expected = ccc_table(pred_v, t)["mean"] - ccc_table(pred_b[keep], t)["mean"]
    assert summary["comparisons"]["oxv"]["difference"] == pytest.approx(expected, abs=1e-6)


def test_a_sweep_run_again_reuses_its_members_and_refuses_changed_ones(corpus, tmp_path):
    cfg = SweepConfig(base_config(corpus, tmp_path / "sweep", epochs=2), seeds=2, resamples=10)
    first = sweep(cfg)
    weights = tmp_path / "sweep" / "base" / "seed-0" / layout.WEIGHTS
    stamp = weights.stat().st_mtime_ns
    again = sweep(cfg)
    assert (again.trained, again.reused) == (0, 2) and weights.stat().st_mtime_ns == stamp
    assert again.summary["variants"] == first.summary["variants"]
    wider = SweepConfig(base_config(corpus, tmp_path / "sweep", epochs=2), seeds=3, resamples=10)
    assert (sweep(wider).trained, len(wider.all_variants())) == (1, 1)  # only seed 2 is new
    changed = SweepConfig(base_config(corpus, tmp_path / "sweep", epochs=2, lr=1e-2), seeds=2, resamples=10)
    with pytest.raises(TrainError, match=r"seed-0: a run written with other options \(lr: 0.003, this sweep: 0.01\)"):
        sweep(changed)
    redone = sweep(SweepConfig(base_config(corpus, tmp_path / "sweep", epochs=2, lr=1e-2, overwrite=True), seeds=2,
                               resamples=10))
    assert redone.trained == 2 and rundir.read_config(weights.parent)["train"]["lr"] == 1e-2


def test_variants_take_the_base_inputs_unless_they_name_their_own(corpus, tmp_path):
    cfg = SweepConfig(base_config(corpus, tmp_path / "s", epochs=1), seeds=1, inputs="audio", resamples=10,
                      variants=(parse_variant("lr: lr=1e-3"), parse_variant("both: inputs=all")))
    sweep(cfg)
    inputs = {v: [i["name"] for i in rundir.read_config(tmp_path / "s" / v / "seed-0")["inputs"]]
              for v in ("base", "lr", "both")}
    assert inputs == {"base": ["audio"], "lr": ["audio"], "both": ["audio", "text"]}
    assert [s["name"] for s in rundir.read_config(tmp_path / "s" / "lr" / "seed-0")["excluded_stores"]] == ["text"]


def test_unknown_inputs_and_streamed_frames_are_refused(corpus, tmp_path):
    cfg = SweepConfig(base_config(corpus, tmp_path / "s"), seeds=1, variants=(parse_variant("x: inputs=audio+nope"),))
    with pytest.raises(TrainError, match="--variant x: inputs=audio\\+nope: nope is not a loaded store; "
                                         "the stores are audio, text"):
        sweep(cfg)
    manifest, ids, frames, _ = make_frame_corpus(tmp_path / "fc", 60)
    store = make_frame_store(tmp_path / "f" / "frames.zarr", ids, frames, chunk_rows=10)
    base = TrainHeadsConfig(features=(store,), data=manifest, out=tmp_path / "fs", **OPTIONS, memory_budget_gb=1e-6)
    with pytest.raises(TrainError, match="would be streamed"):
        sweep(SweepConfig(base, seeds=2))


@pytest.mark.slow
def test_tensorboard_gets_one_folder_per_member(corpus, tmp_path, monkeypatch):
    """With a stand-in SummaryWriter (the real one needs the tensorboard package)."""
    logged: dict[str, list] = {}

    class Writer:
        def __init__(self, log_dir):
            self.dir = log_dir
            logged[log_dir] = []

        def add_scalar(self, tag, value, step):
            logged[self.dir].append((tag, step))

        def flush(self):
            pass

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    cfg = SweepConfig(base_config(corpus, tmp_path / "s", epochs=2, tensorboard=tmp_path / "tb"), seeds=2,
                      variants=(parse_variant("drop: ox=drop"),), resamples=10)
    sweep(cfg)
    assert set(logged) == {str(tmp_path / "tb" / v / f"seed-{s}") for v in ("base", "drop") for s in (0, 1)}
    for tags in logged.values():
        assert ("dev_ccc_mean", 1) in tags and ("loss_total", 2) in tags


# --------------------------------------------------------------------------- the command


@pytest.mark.slow
def test_sweep_command_prints_the_table_in_80_columns(corpus, tmp_path):
    manifest, stores = corpus
    args = ["sweep", "-f", str(stores[0]), "-f", str(stores[1]), "-d", str(manifest), "-o", str(tmp_path / "s"),
            "--seeds", "2", "--epochs", "2", "--lr", "3e-3", "--batch-size", "32", "--no-undersample", "--device",
            "cpu", "--threads", "1", "--no-progress", "--speaker-weight", "0", "--resamples", "20",
            "--curves", "-V", "drop: ox=drop", "-V", "audio-only: inputs=audio"]
    r = CliRunner().invoke(app, args, terminal_width=80)
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, r.stdout
    rows = {line.split()[0]: line for line in lines if line.split() and line.split()[0] in ("base", "drop",
                                                                                            "audio-only")}
    assert set(rows) == {"base", "drop", "audio-only"} and "ref." in rows["base"] and "…" in rows["drop"]
    assert (tmp_path / "s" / "drop" / "seed-1" / "curves.png").is_file()
    bad = CliRunner().invoke(app, [*args[:-4], "-V", "x: epochs=3"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output and "'epochs=3' is not option=value" in bad.output


# --------------------------------------------------------------------------- the categorical task (--task)


@pytest.fixture(scope="module")
def class_corpus(tmp_path_factory):
    from synthetic import make_class_corpus

    tmp = tmp_path_factory.mktemp("class-sweep")
    manifest, ids, feats, codes = make_class_corpus(tmp / "corpus", 300)
    stores = [make_store(tmp / "features" / f"{name}.zarr", ids, x, kind="text" if name == "text" else "whisper",
                         modality="text" if name == "text" else "audio") for name, x in feats.items()]
    return manifest, stores, dict(zip(ids, codes))


def class_config(class_corpus, out: Path, **kw) -> TrainHeadsConfig:
    manifest, stores, _ = class_corpus
    return TrainHeadsConfig(**{"features": tuple(stores), "data": manifest, "out": out, **OPTIONS,
                               "task": "categorical", **kw})


def test_categorical_members_equal_train_heads_runs(class_corpus, tmp_path):
    """Each member of a categorical sweep is the train-heads run with its options: the same kept
    epoch, the same Development classes and probabilities, the same class scores."""
    variants = (parse_variant("plain: class-weights=none lr=1e-3"), parse_variant("audio: inputs=audio"))
    result = sweep(SweepConfig(class_config(class_corpus, tmp_path / "sweep"), seeds=2, variants=variants,
                               resamples=20))
    assert result.trained == 6
    for name, seed, kw in (("base", 1, {}), ("plain", 0, {"class_weights": "none", "lr": 1e-3}),
                           ("audio", 1, {"features": (class_corpus[1][0],)})):
        own = train_heads(class_config(class_corpus, tmp_path / f"own-{name}", seed=seed, **kw))
        member = tmp_path / "sweep" / name / f"seed-{seed}"
        metrics = json.loads((member / layout.METRICS).read_text())
        assert metrics["best_epoch"] == own.best_epoch, name
        assert metrics["categorical"] == own.metrics["categorical"], name
        assert "ccc" not in metrics and not (member / layout.DEV_PREDICTIONS).exists()
        ids, codes, probs, classes = prediction_file.read_class_predictions(member / layout.DEV_CLASS_PREDICTIONS)
        own_ids, own_codes, own_probs, own_classes = prediction_file.read_class_predictions(
            own.run_dir / layout.DEV_CLASS_PREDICTIONS)
        assert (ids, codes, classes) == (own_ids, own_codes, own_classes) and np.abs(probs - own_probs).max() < 1e-4
        config, own_config = rundir.read_config(member), rundir.read_config(own.run_dir)
        assert config["categorical"] == own_config["categorical"] and config["train"]["task"] == "categorical"
        assert config["sweep"]["variant"] == name


def test_a_categorical_summary_reports_macro_f1_and_its_paired_bootstrap(class_corpus, tmp_path):
    from ser_cache.system.metrics import class_metrics
    from ser_cache.system.tasks import CLASSES_8

    cfg = SweepConfig(class_config(class_corpus, tmp_path / "sweep", epochs=3), seeds=3, resamples=200,
                      variants=(parse_variant("slow: lr=1e-5"),))
    summary = sweep(cfg).summary
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["task"] == "categorical" and summary["classes"] == list(CLASSES_8)
    assert "comparisons" not in summary and set(summary["macro_f1_comparisons"]) == {"slow"}
    truth = class_corpus[2]
    f1 = {}
    for name in ("base", "slow"):
        v = summary["variants"][name]
        runs = [tmp_path / "sweep" / name / f"seed-{s}" for s in range(3)]
        scores = [json.loads((r / layout.METRICS).read_text())["categorical"] for r in runs]
        for key in ("macro_f1", "accuracy", "balanced_accuracy"):
            assert v["mean"][key] == pytest.approx(np.mean([c[key] for c in scores]))
            assert v["std"][key] == pytest.approx(np.std([c[key] for c in scores], ddof=1))
        assert "ccc_mean" not in v["mean"] and v["class_rows"] == scores[0]["rows"]
        # The macro-F1 of each member recomputed from its predictions_dev_categorical.csv.
        f1[name] = []
        for r in runs:
            ids, codes, _, _ = prediction_file.read_class_predictions(r / layout.DEV_CLASS_PREDICTIONS)
            f1[name].append(class_metrics([CLASSES_8.index(truth[i]) for i in ids],
                                          [CLASSES_8.index(c) for c in codes], CLASSES_8)["macro_f1"])
        assert f1[name] == pytest.approx([c["macro_f1"] for c in scores], abs=1e-12)
    c = summary["macro_f1_comparisons"]["slow"]
    assert c["difference"] == pytest.approx(np.mean(f1["slow"]) - np.mean(f1["base"]), abs=1e-12)
    assert c["ci_low"] <= c["difference"] <= c["ci_high"] and c["resamples"] == 200
    assert c["rows"] == summary["variants"]["base"]["class_rows"]
    assert c["ci_high"] < 0 and c["share_positive"] == 0.0  # lr 1e-5 barely moves in 3 epochs


def test_a_both_sweep_compares_ccc_and_macro_f1_on_the_rows_with_a_class(class_corpus, tmp_path):
    cfg = SweepConfig(class_config(class_corpus, tmp_path / "sweep", epochs=2, task="both"), seeds=1, resamples=20,
                      variants=(parse_variant("light: class-loss-weight=0.1"),))
    summary = sweep(cfg).summary
    assert set(summary["comparisons"]) == set(summary["macro_f1_comparisons"]) == {"light"}
    base = summary["variants"]["base"]
    assert {"ccc_mean", "macro_f1"} <= set(base["mean"])
    # Under both, O/X rows are scored for CCC but have no class: the macro-F1 is compared on fewer.
    assert summary["macro_f1_comparisons"]["light"]["rows"] == base["class_rows"] < base["rows"]
    assert summary["comparisons"]["light"]["rows"] == base["rows"]
    assert rundir.read_config(tmp_path / "sweep" / "light" / "seed-0")["train"]["class_loss_weight"] == 0.1


def test_task_options_are_the_sweeps_and_reuse_compares_them(class_corpus, tmp_path):
    for text in ("x: task=categorical", "x: classes=9"):
        with pytest.raises(TrainError, match=r"--variant x: (task|classes) is the sweep's, not a variant's"):
            parse_variant(text)
    attributes = SweepConfig(class_config(class_corpus, tmp_path / "s", task="attributes", epochs=1), seeds=1,
                             variants=(parse_variant("w: class-weights=none"),))
    with pytest.raises(TrainError, match="--variant w: class-weights is an option of a class task"):
        sweep(attributes)
    with pytest.raises(TrainError, match="--variant w: --class-weights inverse"):
        sweep(SweepConfig(class_config(class_corpus, tmp_path / "s", epochs=1), seeds=1,
                          variants=(parse_variant("w: class-weights=inverse"),)))
    assert not (tmp_path / "s").exists()
    first = sweep(SweepConfig(class_config(class_corpus, tmp_path / "s", epochs=1), seeds=1, resamples=10))
    assert (first.trained, sweep(SweepConfig(class_config(class_corpus, tmp_path / "s", epochs=1), seeds=1,
                                             resamples=10)).reused) == (1, 1)
    for kw, message in (({"task": "attributes"}, "task: 'categorical', this sweep: 'attributes'"),
                        ({"classes": 9}, "classes: 8, this sweep: 9"),
                        ({"class_weights": "none"}, "class_weights: 'balanced', this sweep: 'none'")):
        with pytest.raises(TrainError, match=f"seed-0: a run written with other options \\({message}\\)"):
            sweep(SweepConfig(class_config(class_corpus, tmp_path / "s", epochs=1, **kw), seeds=1, resamples=10))
    # ... and an attribute member is not reused by a class sweep either.
    sweep(SweepConfig(class_config(class_corpus, tmp_path / "a", epochs=1, task="attributes"), seeds=1))
    with pytest.raises(TrainError, match=r"\(task: 'attributes', this sweep: 'both'\)"):
        sweep(SweepConfig(class_config(class_corpus, tmp_path / "a", epochs=1, task="both"), seeds=1))


def test_sweep_command_prints_the_class_table_in_80_columns(class_corpus, tmp_path):
    manifest, stores, _ = class_corpus
    args = ["sweep", "-f", str(stores[0]), "-f", str(stores[1]), "-d", str(manifest), "-o", str(tmp_path / "s"),
            "--seeds", "1", "--epochs", "2", "--lr", "3e-3", "--batch-size", "32", "--no-undersample", "--device",
            "cpu", "--threads", "1", "--no-progress", "--speaker-weight", "0", "--resamples", "20",
            "--task", "categorical", "--classes", "9", "--class-weights", "none", "-V", "audio: inputs=audio"]
    r = CliRunner().invoke(app, args, terminal_width=80)
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, r.stdout
    assert "macro-F1 over 1 seed(s); Δ against base (9 classes)" in r.stdout and "Δ F1" in r.stdout
    assert "CCC" not in r.stdout
    rows = {line.split()[0]: line for line in lines if line.split() and line.split()[0] in ("base", "audio")}
    assert "ref." in rows["base"] and "…" in rows["audio"]
    train = rundir.read_config(tmp_path / "s" / "base" / "seed-0")["train"]
    assert (train["task"], train["classes"], train["class_weights"]) == ("categorical", 9, "none")
    bad = CliRunner().invoke(app, [*args[:-2], "-V", "x: task=both"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output and "task is the sweep's" in bad.output
