"""`finetune wavlm` end to end on a tiny random WavLM and self-made, learnable audio.

One fine-tuning run (module fixture, ~2 s) serves the learning, run-directory, predict, evaluate,
ensemble and refusal tests; the resume test kills a subprocess of the same run and checks that
`--resume` ends with the very same weights.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ser_cache.data.batching import plan_batches, shard
from ser_cache.finetune.loop import finetune_wavlm
from ser_cache.finetune.options import FinetuneConfig
from ser_cache.infra import atomic
from ser_cache.runs import layout, prediction_file, rundir
from ser_cache.runs.checkpoint_file import CHECKPOINT
from ser_cache.system.errors import TrainError
from ser_cache.system.finetuned import AUDIO_INPUT

import factories
from finetune_support import base_config, cli_args, killed_run, learnable_corpus


@pytest.fixture(scope="module")
def corpus_ft(tmp_path_factory) -> Path:
    return learnable_corpus(tmp_path_factory.mktemp("ft") / "corpus")


@pytest.fixture(scope="module")
def trained(corpus_ft, models, tmp_path_factory):
    cfg = base_config(corpus_ft, models["wavlm"], tmp_path_factory.mktemp("ft-run") / "run")
    return cfg, finetune_wavlm(cfg)


# --------------------------------------------------------------------------- batches


def test_batch_plan_covers_the_order_once_and_does_not_depend_on_ranks():
    rng = np.random.default_rng(0)
    seconds = rng.uniform(1.5, 15, 200)
    order = rng.permutation(200)
    batches = plan_batches(order, seconds, 60.0, np.random.default_rng(1))
    assert sorted(np.concatenate(batches).tolist()) == list(range(200))
    assert min(b.size for b in batches) >= 2
    assert max(seconds[b].sum() for b in batches) <= 60.0 + 15  # a merged tail may exceed by one clip
    again = plan_batches(order, seconds, 60.0, np.random.default_rng(1))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    for b in batches:
        parts = [shard(b, seconds, r, 3) for r in range(3)]
        assert sorted(np.concatenate(parts).tolist()) == sorted(b.tolist())
        loads = [seconds[p].sum() for p in parts]
        assert max(loads) - min(loads) <= seconds[b].max()  # each rank every third clip by length


# --------------------------------------------------------------------------- training


def test_training_lowers_the_loss_and_raises_development_ccc(trained):
    cfg, result = trained
    history = result.history
    assert len(history) == cfg.epochs
    assert history[-1]["loss_total"] < history[0]["loss_total"]
    assert max(h["dev_ccc_mean"] for h in history[1:]) > history[0]["dev_ccc_mean"] + 0.05
    assert result.best_epoch > 1
    assert result.metrics["ccc"]["mean"] == pytest.approx(history[result.best_epoch - 1]["dev_ccc_mean"])


def test_run_directory_has_the_stage_two_format_and_the_whole_model(trained):
    cfg, result = trained
    run = result.run_dir
    assert layout.is_run_dir(run)
    assert sorted(p.name for p in run.iterdir()) == sorted(
        [layout.CONFIG, layout.WEIGHTS, layout.METRICS, layout.HISTORY, layout.DEV_PREDICTIONS, "curves.png"])
    config = rundir.read_config(run)
    assert config["system"] == "finetuned-wavlm"
    assert config["heads"]["input_dims"] == {AUDIO_INPUT: [256]}
    assert config["wavlm"]["config"]["hidden_size"] == 32 and config["wavlm"]["normalize"] is True
    assert config["gender_labels"] == ["Female", "Male"] and config["inputs"] == []
    keys = load_file(str(run / layout.WEIGHTS)).keys()
    assert any(k.startswith("wavlm.encoder.layers.") for k in keys)
    assert {"layer_weighting.logits", "pool.convs.0.weight", "pool.convs.6.weight"} <= set(keys)
    ids, _ = prediction_file.read_predictions(run / layout.DEV_PREDICTIONS)
    assert len(ids) == 12


@pytest.mark.slow
def test_evaluate_predict_and_ensemble_work_on_a_finetuned_run(trained, corpus_ft, tmp_path):
    from ser_cache.runs.ensemble import ensemble
    from ser_cache.runs.predict import evaluate, predict

    cfg, result = trained
    scores = evaluate(result.run_dir, corpus_ft, "Development", out=tmp_path / "eval.json", device="cpu")
    # The same model on the same audio: evaluate repeats the score the run kept.
    assert scores["ccc"]["mean"] == pytest.approx(result.metrics["ccc"]["mean"], abs=1e-6)
    assert "fine-tuned WavLM" in scores["sources"][AUDIO_INPUT]

    split = predict(result.run_dir, data=corpus_ft, splits=["Test1"], out=tmp_path / "test1.csv", device="cpu")
    assert split.rows == 4
    audio = sorted((corpus_ft / "Audios").glob("*.wav"))[-4:]  # the Test1 clips, as bare files
    files = predict(result.run_dir, files=audio, out=tmp_path / "files.csv", device="cpu")
    ids_s, avd_s = prediction_file.read_predictions(split.out)
    ids_f, avd_f = prediction_file.read_predictions(files.out)
    assert ids_s == ids_f == [p.name for p in audio]
    np.testing.assert_allclose(avd_f, avd_s, atol=1e-5)  # batching does not change a clip's prediction
    assert np.all((avd_s >= 1) & (avd_s <= 7))

    dev = predict(result.run_dir, data=corpus_ft, splits=["Development"], out=tmp_path / "dev.csv", device="cpu")
    ens = ensemble([dev.out, result.run_dir / layout.DEV_PREDICTIONS], out=tmp_path / "ens.csv", data=corpus_ft,
                   split="Development")
    assert ens.rows == 12
    assert ens.scores["ccc"]["mean"] == pytest.approx(result.metrics["ccc"]["mean"], abs=1e-5)


def test_an_existing_run_directory_is_refused(trained):
    from typer.testing import CliRunner

    from ser_cache.cli.app import app

    cfg, result = trained
    before = (result.run_dir / layout.WEIGHTS).stat().st_mtime_ns
    with pytest.raises(TrainError, match="--overwrite"):
        finetune_wavlm(cfg)
    with pytest.raises(TrainError, match="finished"):
        finetune_wavlm(replace(cfg, resume=True))
    res = CliRunner().invoke(app, cli_args(cfg))
    assert res.exit_code == 2 and "already exists" in res.output
    assert (result.run_dir / layout.WEIGHTS).stat().st_mtime_ns == before


def test_bad_options_are_listed_together(tmp_path):
    cfg = FinetuneConfig(data=tmp_path, out=tmp_path / "r", batch_seconds=0, grad_accum=0, precision="fp8",
                         resume=True, overwrite=True)
    with pytest.raises(TrainError) as err:
        finetune_wavlm(cfg)
    for option in ("--batch-seconds", "--grad-accum", "--precision", "--resume and --overwrite"):
        assert option in str(err.value)


def test_a_missing_model_is_a_clear_error(corpus_ft, tmp_path):
    from ser_cache.encoders import EncoderError

    with pytest.raises(EncoderError, match="hf download"):
        finetune_wavlm(base_config(corpus_ft, Path("no-such/wavlm-model"), tmp_path / "run"))


# --------------------------------------------------------------------------- resume


@pytest.mark.slow
def test_resume_after_kill_9_ends_where_an_uninterrupted_run_ends(trained, tmp_path):
    cfg, result = trained
    # SIGKILL mid-epoch 3, on its second loss computation: epoch 2's checkpoint is on disk and
    # epoch 3's progress must be thrown away and redone.
    out = killed_run(replace(cfg, out=tmp_path / "run"), tmp_path, after_saves=2)
    with pytest.raises(TrainError, match="--resume"):
        finetune_wavlm(replace(cfg, out=out))

    resumed = finetune_wavlm(replace(cfg, out=out, resume=True))
    assert [h["epoch"] for h in resumed.history] == list(range(1, cfg.epochs + 1))
    assert resumed.best_epoch == result.best_epoch
    assert resumed.metrics["ccc"] == pytest.approx(result.metrics["ccc"], abs=1e-6)
    a, b = load_file(str(result.run_dir / layout.WEIGHTS)), load_file(str(out / layout.WEIGHTS))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    assert not (out / CHECKPOINT).exists() and layout.is_run_dir(out)


# --------------------------------------------------------------------------- MMWavLM


@pytest.mark.slow
def test_mmwavlm_with_cached_text_features(corpus_ft, models, tmp_path):
    from ser_cache.features.extract import ExtractConfig, extract
    from ser_cache.runs.predict import predict

    store = extract(ExtractConfig(model=str(models["text"]), data=corpus_ft, out=tmp_path / "features",
                                  name="minilm", device="cpu", progress=False, workers=0)).store
    cfg = base_config(corpus_ft, models["wavlm"], tmp_path / "mm", epochs=2, text_features=store)
    result = finetune_wavlm(cfg)
    config = rundir.read_config(result.run_dir)
    assert [i["name"] for i in config["inputs"]] == ["minilm"]
    assert config["heads"]["input_dims"] == {AUDIO_INPUT: [256], "minilm": [384]}
    assert config["train"]["text_features"] == str(store)

    from_store = predict(result.run_dir, data=corpus_ft, splits=["Test1"], out=tmp_path / "t.csv", device="cpu")
    assert "store" in from_store.sources["minilm"]
    audio = sorted((corpus_ft / "Audios").glob("*.wav"))[-4:]
    transcripts = tmp_path / "transcripts.csv"
    transcripts.write_text("id,text\n" + "".join(
        f"{p.name},{(corpus_ft / 'Transcripts' / (p.stem + '.txt')).read_text().strip()}\n" for p in audio))
    bare = predict(result.run_dir, files=audio, transcripts=transcripts, out=tmp_path / "f.csv", device="cpu")
    assert "encoder" in bare.sources["minilm"]
    np.testing.assert_allclose(prediction_file.read_predictions(bare.out)[1],
                               prediction_file.read_predictions(from_store.out)[1],
                               atol=2e-3)  # text features recomputed, then rounded to float16 like the store


# --------------------------------------------------------------------------- the authors' WavLM


def _tiny_wavlm(models, **changes):
    from transformers import WavLMModel

    model = WavLMModel.from_pretrained(models["wavlm"], **changes)
    return model


@pytest.mark.slow
def test_encoder_states_are_those_of_transformers_4_in_eval(models):
    """Inputs of every layer, then the output after the final layer norm (what 4.46 returned)."""
    from ser_cache.system.finetuned import LEGACY_LAST_STATE, encoder_states

    wavlm = _tiny_wavlm(models).eval()
    audio = torch.from_numpy(factories.tone(0.7))[None]
    mask = torch.ones_like(audio, dtype=torch.long)
    with torch.no_grad():
        out = wavlm(audio, attention_mask=mask, output_hidden_states=True)
        ours = encoder_states(wavlm, audio, mask, layerdrop=0.5)  # eval: LayerDrop off
        legacy = encoder_states(wavlm, audio, mask, last_state=LEGACY_LAST_STATE)
    assert len(ours) == wavlm.config.num_hidden_layers + 1
    for a, b in zip(ours[:-1], out.hidden_states[:-1]):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(ours[-1], out.last_hidden_state)
    torch.testing.assert_close(ours[-1], wavlm.encoder.layer_norm(out.hidden_states[-1]))
    torch.testing.assert_close(legacy[-1], out.hidden_states[-1])


@pytest.mark.slow
def test_layerdrop_skips_layers_but_keeps_every_state_and_draws_alike(models):
    """A skipped layer passes its input on (its state repeats); layer 0 is never skipped; the same
    generator seed skips the same layers (as every rank does under torchrun)."""
    from ser_cache.system.finetuned import encoder_states

    wavlm = _tiny_wavlm(models, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                        feat_proj_dropout=0.0, mask_time_prob=0.0).train()
    audio = torch.from_numpy(factories.tone(0.7))[None]
    with torch.no_grad():
        all_dropped = encoder_states(wavlm, audio, None, layerdrop=0.999999, generator=torch.Generator().manual_seed(0))
        a = encoder_states(wavlm, audio, None, layerdrop=0.5, generator=torch.Generator().manual_seed(3))
        b = encoder_states(wavlm, audio, None, layerdrop=0.5, generator=torch.Generator().manual_seed(3))
    assert len(all_dropped) == wavlm.config.num_hidden_layers + 1
    assert not torch.equal(all_dropped[1], all_dropped[0])  # layer 0 ran
    # Layer 1 (the tiny model's last) was skipped: its input passed on, through the final layer norm.
    torch.testing.assert_close(all_dropped[2], wavlm.encoder.layer_norm(all_dropped[1]))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_the_fine_tuned_model_takes_the_checkpoints_layerdrop_and_trains_the_final_norm(trained):
    cfg, result = trained
    config = rundir.read_config(result.run_dir)
    arch = config["wavlm"]
    assert arch["layerdrop"] == pytest.approx(0.1)  # the tiny config's own, as WavLMConfig's default
    assert arch["last_state"] == "after-final-layer-norm" and arch["conv_final_activation"] is False
    assert config["heads"]["dropout"] == 0.0 and arch["conv_dropout"] == pytest.approx(0.1)
    weights = load_file(str(result.run_dir / layout.WEIGHTS))
    init = load_file(str(Path(cfg.model) / "model.safetensors"))
    # The final layer norm reaches the output now, so it was trained (not frozen as unused).
    assert not torch.equal(weights["wavlm.encoder.layer_norm.weight"], init["encoder.layer_norm.weight"])


def test_a_run_written_before_the_authors_architecture_loads_as_it_was_trained(trained, tmp_path):
    """Old fine-tuned runs: ReLU + dropout after the last conv, the last state before the final norm,
    weights under "convs.*". They must be rebuilt that way, never silently as the new model."""
    import shutil

    from safetensors.torch import save_file

    from ser_cache.runs.finetuned_run import load_finetuned
    from ser_cache.system.finetuned import LEGACY_LAST_STATE

    _, result = trained
    old = tmp_path / "old"
    shutil.copytree(result.run_dir, old)
    config = rundir.read_config(old)
    for key in ("last_state", "conv_final_activation", "conv_dropout", "layerdrop"):
        config["wavlm"].pop(key)
    atomic.write_json_atomic(old / layout.CONFIG, config)
    tensors = load_file(str(old / layout.WEIGHTS))
    save_file({k.removeprefix("pool."): v for k, v in tensors.items()}, str(old / layout.WEIGHTS))
    model = load_finetuned(old, config)
    assert model.last_state == LEGACY_LAST_STATE and model.pool.final_activation
    assert isinstance(model.pool.convs[-1], torch.nn.Dropout)
    new = load_finetuned(result.run_dir, rundir.read_config(result.run_dir))
    audio = torch.from_numpy(factories.tone(0.9))[None]
    lengths = torch.tensor([audio.shape[1]])
    with torch.no_grad():
        assert not torch.allclose(model(audio, lengths)["avd"], new(audio, lengths)["avd"])


def test_overwrite_through_a_symlinked_out_keeps_the_link(corpus_ft, models, tmp_path):
    """--overwrite onto a symlinked --out replaces the folder it points to and keeps the link (as train-heads)."""
    target = tmp_path / "disk" / "run"
    target.mkdir(parents=True)
    link = tmp_path / "run"
    link.symlink_to(target, target_is_directory=True)
    cfg = base_config(corpus_ft, models["wavlm"], link, epochs=1)
    finetune_wavlm(cfg)
    (target / "note.txt").write_text("written after the first run")
    finetune_wavlm(replace(cfg, overwrite=True))
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert (target / "config.json").is_file() and not (target / "note.txt").exists()
