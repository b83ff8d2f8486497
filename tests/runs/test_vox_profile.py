"""`ser-cache import vox-profile`: checkpoints in the authors' layout, imported and compared with an
independent re-statement of the authors' forward (vox-profile-release, *_emotion_dim.py).

The reference forwards below are written from the description of the authors' code, with stock
transformers modules and plain tensor operations; they share nothing with ser-cache's model code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ser_cache.runs import layout, prediction_file, rundir

import factories
from vox_profile_checkpoints import (
    ATTRS,
    HIDDEN,
    authors_wavlm_checkpoint,
    authors_whisper_checkpoint,
    write_checkpoint,
)


def _heads(features: torch.Tensor, t: dict, prefix: str) -> torch.Tensor:
    h = F.relu(features @ t[f"{prefix}.0.weight"].T + t[f"{prefix}.0.bias"])
    return h @ t[f"{prefix}.2.weight"].T + t[f"{prefix}.2.bias"]


def _convs(frames: torch.Tensor, t: dict) -> torch.Tensor:
    """(T, D) → (T, HIDDEN): Conv1d 1×1, ReLU, Conv1d, ReLU, Conv1d (dropout off in eval)."""
    x = frames.T[None]
    x = F.relu(F.conv1d(x, t["model_seq.0.weight"], t["model_seq.0.bias"]))
    x = F.relu(F.conv1d(x, t["model_seq.3.weight"], t["model_seq.3.bias"]))
    return F.conv1d(x, t["model_seq.6.weight"], t["model_seq.6.bias"])[0].T


def authors_wavlm_forward(tensors: dict, backbone_dir: Path, wave: np.ndarray) -> np.ndarray:
    """One clip as the authors' WavLMWrapper computes it: (arousal, valence, dominance) in [0, 1]."""
    from transformers import WavLMModel

    model = WavLMModel.from_pretrained(backbone_dir).eval()
    dense = {}
    for k, v in tensors.items():
        if k.startswith("backbone_model.") and not k.endswith(("lora_A", "lora_B")):
            dense[k.removeprefix("backbone_model.")] = v.clone()
    n = model.config.num_hidden_layers
    for k in [k for k in tensors if k.endswith("lora_A")]:  # loralib: W + B A · alpha / r, alpha 1
        base = k.removesuffix(".lora_A").removeprefix("backbone_model.")
        if int(base.split(".")[2]) <= n // 2:  # encoder.layers.{i}...: no LoRA layer there
            continue
        a, b = tensors[k], tensors[k.removesuffix("lora_A") + "lora_B"]
        dense[base + ".weight"] = dense[base + ".weight"] + b @ a / a.shape[0]
    model.load_state_dict(dense)
    x = torch.from_numpy((wave - wave.mean()) / np.sqrt(wave.var() + 1e-7)).float()[None]  # the processor
    with torch.no_grad():
        out = model(x, attention_mask=torch.ones_like(x, dtype=torch.long), output_hidden_states=True)
        # transformers 4.46, which the authors trained with, returns the last state after the final norm.
        states = torch.stack([*out.hidden_states[:-1], out.last_hidden_state])[:, 0]
        mixed = (F.softmax(tensors["weights"], dim=-1)[:, None, None] * states).sum(0)
        pooled = _convs(mixed, tensors).mean(0)
        return np.array([torch.sigmoid(_heads(pooled, tensors, f"{a}_layer"))[0].item() for a in ATTRS])


def _clips(root: Path, seconds=(1.3, 2.1, 0.8)) -> list[Path]:
    return [factories.write_wav(root / f"clip{i}.wav", factories.tone(s, seed=i, freq=140 + 30 * i))
            for i, s in enumerate(seconds)]


def _predicted(run: Path, clips: list[Path], out: Path) -> np.ndarray:
    from ser_cache.runs.predict import predict

    predict(run, files=clips, out=out, device="cpu")
    ids, avd = prediction_file.read_predictions(out)
    assert ids == [c.name for c in clips]
    return avd


def three_layer_wavlm(path: Path) -> Path:
    """The tiny WavLM with 3 layers: layer 2 > 3 // 2 is one the authors give LoRA."""
    from transformers import Wav2Vec2FeatureExtractor, WavLMModel

    torch.manual_seed(3)
    WavLMModel(factories._wavlm_config(feat_extract_norm="layer", do_stable_layer_norm=True,
                                       num_hidden_layers=3)).save_pretrained(path)
    Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True).save_pretrained(path)
    return path


@pytest.mark.parametrize("lora", [False, True])
def test_wavlm_checkpoint_imports_and_predicts_what_the_authors_code_does(models, tmp_path, lora, one_torch_thread):
    from ser_cache.runs.vox_profile import ImportConfig, import_vox_profile

    backbone = three_layer_wavlm(tmp_path / "wavlm3") if lora else models["wavlm"]
    src, tensors = authors_wavlm_checkpoint(tmp_path / "ckpt", backbone, lora=lora)
    result = import_vox_profile(ImportConfig(source=str(src), out=tmp_path / "run", backbone=str(backbone)))
    assert result.system == "finetuned-wavlm" and result.merged_lora == (2 if lora else 0)
    clips = _clips(tmp_path / "audio")
    avd = _predicted(result.run_dir, clips, tmp_path / "pred.csv")
    for clip, row in zip(clips, avd):
        import soundfile as sf

        ref = authors_wavlm_forward(tensors, backbone, sf.read(clip, dtype="float32")[0])
        np.testing.assert_allclose((row - 1) / 6, ref, atol=1e-4)
    config = rundir.read_config(result.run_dir)
    assert config["gender_labels"] == ["Female", "Male"] and config["imported"]["wrapper"]["hidden_dim"] == HIDDEN
    assert config["wavlm"]["last_state"] == "after-final-layer-norm"


@pytest.mark.slow
def test_imported_predictions_follow_the_label_range(models, tmp_path):
    from ser_cache.runs.vox_profile import ImportConfig, import_vox_profile

    src, _ = authors_wavlm_checkpoint(tmp_path / "ckpt", models["wavlm"], gender=False)
    clips = _clips(tmp_path / "audio", seconds=(1.0,))
    a = import_vox_profile(ImportConfig(source=str(src), out=tmp_path / "a", backbone=str(models["wavlm"])))
    b = import_vox_profile(ImportConfig(source=str(src), out=tmp_path / "b", backbone=str(models["wavlm"]),
                                        label_range=(0.0, 1.0)))
    pa, pb = _predicted(a.run_dir, clips, tmp_path / "a.csv"), _predicted(b.run_dir, clips, tmp_path / "b.csv")
    np.testing.assert_allclose(pa, 1 + 6 * pb, atol=1e-5)
    assert rundir.read_config(a.run_dir)["gender_labels"] == []


def test_unknown_and_missing_keys_are_named(models, tmp_path):
    from ser_cache.runs.vox_profile import ImportConfig, ImportError_, import_vox_profile

    src, tensors = authors_wavlm_checkpoint(tmp_path / "ckpt", models["wavlm"])
    extra = dict(tensors, surprise_layer=torch.zeros(3))
    del extra["valence_layer.2.bias"]
    write_checkpoint(tmp_path / "bad", json.loads((src / "config.json").read_text()), extra)
    with pytest.raises(ImportError_, match=r"unknown key\(s\) surprise_layer.*missing key\(s\) valence_layer.2.bias"):
        import_vox_profile(ImportConfig(source=str(tmp_path / "bad"), out=tmp_path / "run",
                                        backbone=str(models["wavlm"])))
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_for_another_backbone_is_refused(models, tmp_path):
    from ser_cache.runs.vox_profile import ImportConfig, ImportError_, import_vox_profile

    src, _ = authors_wavlm_checkpoint(tmp_path / "ckpt", models["wavlm"])
    with pytest.raises(ImportError_, match="not a WavLM"):
        import_vox_profile(ImportConfig(source=str(src), out=tmp_path / "run", backbone=str(models["whisper"])))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImportError_, match="no config.json"):
        import_vox_profile(ImportConfig(source=str(tmp_path / "empty"), out=tmp_path / "run"))


@pytest.mark.slow
def test_finetune_can_start_from_an_imported_run(models, tmp_path, one_torch_thread):
    from safetensors.torch import load_file

    from ser_cache.finetune.loop import finetune_wavlm
    from ser_cache.finetune.options import FinetuneConfig
    from ser_cache.runs.vox_profile import ImportConfig, import_vox_profile

    from finetune_support import learnable_corpus

    src, _ = authors_wavlm_checkpoint(tmp_path / "ckpt", models["wavlm"], gender=True)
    imported = import_vox_profile(ImportConfig(source=str(src), out=tmp_path / "imported",
                                               backbone=str(models["wavlm"])))
    corpus = learnable_corpus(tmp_path / "corpus")
    cfg = FinetuneConfig(data=corpus, out=tmp_path / "ft", model=str(models["wavlm"]), epochs=1, lr_encoder=1e-12,
                         lr_heads=1e-12, conv_dim=HIDDEN, hidden=HIDDEN, gender_weight=1.0, undersample=False,
                         select="ccc", device="cpu", progress=False, init_from=imported.run_dir, weight_decay=0.0)
    result = finetune_wavlm(cfg)
    a, b = load_file(str(imported.run_dir / layout.WEIGHTS)), load_file(str(result.run_dir / layout.WEIGHTS))
    # With learning rates of 1e-12 nothing moves visibly: the run holds the imported weights (AdamW's
    # first step moves a weight by about the learning rate), but its own label range.
    same = [k for k in a if not k.endswith((".lo", ".hi"))]
    assert same and max(float((a[k].float() - b[k].float()).abs().max()) for k in same) < 1e-8
    lo = [k for k in b if k.endswith(".lo")]
    assert any(not torch.equal(a[k], b[k]) for k in lo)  # the learnable corpus' labels do not span 1-7


# --------------------------------------------------------------------------- Whisper


def authors_whisper_forward(tensors: dict, backbone_dir: Path, waves: list[np.ndarray]) -> np.ndarray:
    """A padded batch with lengths as the authors' WhisperWrapper computes it: (B, 3) in [0, 1]."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    config = WhisperConfig.from_pretrained(backbone_dir, max_source_positions=750)
    model = WhisperModel(config).eval()
    model.load_state_dict({k.removeprefix("backbone_model."): v for k, v in tensors.items()
                           if k.startswith("backbone_model.")})
    fe = WhisperFeatureExtractor.from_pretrained(backbone_dir, chunk_length=15)
    longest = max(len(w) for w in waves)
    padded = [np.pad(w, (0, longest - len(w))) for w in waves]  # the batch the wrapper receives
    features = fe(padded, return_tensors="pt", sampling_rate=16000, max_length=15 * 16000).input_features
    lengths = [(len(w) // 160 - 1) // 2 + 1 for w in waves]
    with torch.no_grad():
        frames = model.encoder(features).last_hidden_state  # after the encoder's final layer norm
        out = []
        for b, n in enumerate(lengths):
            pooled = _convs(frames[b], tensors)[:n].mean(0)
            out.append([torch.sigmoid(_heads(pooled, tensors, f"{a}_layer"))[0].item() for a in ATTRS])
    return np.array(out)


def test_whisper_checkpoint_imports_and_predicts_what_the_authors_code_does(models, tmp_path, one_torch_thread):
    import soundfile as sf

    from ser_cache.runs.vox_profile import ImportConfig, import_vox_profile

    src, tensors = authors_whisper_checkpoint(tmp_path / "ckpt", models["whisper"], gender=True)
    result = import_vox_profile(ImportConfig(source=str(src), out=tmp_path / "run", backbone=str(models["whisper"])))
    assert result.system == "frame-heads"
    clips = _clips(tmp_path / "audio", seconds=(1.3, 2.1, 0.8, 16.5))  # the last is cut to the 15-s window
    avd = _predicted(result.run_dir, clips, tmp_path / "pred.csv")
    ref = authors_whisper_forward(tensors, models["whisper"], [sf.read(c, dtype="float32")[0] for c in clips])
    np.testing.assert_allclose((avd - 1) / 6, ref, atol=1e-4)

    moved = tmp_path / "elsewhere" / "run"  # the run carries its encoder: it works wherever it is
    moved.parent.mkdir()
    result.run_dir.rename(moved)
    np.testing.assert_allclose(_predicted(moved, clips, tmp_path / "moved.csv"), avd, atol=1e-6)


def test_import_command_and_evaluate_on_a_corpus(models, corpus, tmp_path):
    from typer.testing import CliRunner

    from ser_cache.cli.app import app

    src, _ = authors_whisper_checkpoint(tmp_path / "ckpt", models["whisper"])
    runner = CliRunner()
    res = runner.invoke(app, ["import", "vox-profile", str(src), "--out", str(tmp_path / "run"),
                              "--backbone", str(models["whisper"])])
    assert res.exit_code == 0, res.output
    assert "frame-heads run" in res.output
    res = runner.invoke(app, ["evaluate", str(tmp_path / "run"), "--data", str(corpus), "--split", "Development",
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output
    scores = json.loads((tmp_path / "run" / "eval_Development.json").read_text())
    assert scores["rows"] >= 2 and set(scores["ccc"]) >= {"arousal", "valence", "dominance", "mean"}
    res = runner.invoke(app, ["import", "vox-profile", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run2")])
    assert res.exit_code == 2 and "no such directory" in res.output


def test_a_run_whose_config_sends_its_own_encoder_outside_the_run_is_refused(models, tmp_path):
    """An in-run encoder is a folder inside the run; an edited config.json may not point it elsewhere."""
    import shutil

    from typer.testing import CliRunner

    from ser_cache.cli.app import app
    from ser_cache.runs.vox_profile import ImportConfig, import_vox_profile

    src, _ = authors_whisper_checkpoint(tmp_path / "ckpt", models["whisper"])
    run = import_vox_profile(ImportConfig(source=str(src), out=tmp_path / "run",
                                          backbone=str(models["whisper"]))).run_dir
    shutil.copytree(models["whisper"], tmp_path / "elsewhere")  # a loadable model outside the run
    config = json.loads((run / "config.json").read_text())
    (record,) = [r for r in config["inputs"] if r.get("in_run")]
    record["model_id"] = "../elsewhere"
    (run / "config.json").write_text(json.dumps(config))
    clips = _clips(tmp_path / "audio")
    res = CliRunner().invoke(app, ["predict", str(run), *map(str, clips), "--out", str(tmp_path / "p.csv"),
                                   "--device", "cpu"])
    assert res.exit_code == 2, res.output
    assert "not a folder inside the run" in res.output and not (tmp_path / "p.csv").exists()
