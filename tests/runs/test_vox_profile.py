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
    pooled = authors_wavlm_pooled(tensors, backbone_dir, wave)
    with torch.no_grad():
        return np.array([torch.sigmoid(_heads(pooled, tensors, f"{a}_layer"))[0].item() for a in ATTRS])


def authors_wavlm_pooled(tensors: dict, backbone_dir: Path, wave: np.ndarray) -> torch.Tensor:
    """The authors' WavLMWrapper up to its heads: the masked mean of the convolutions, (HIDDEN,)."""
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
        return _convs(mixed, tensors).mean(0)


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
    # A dimensional checkpoint's (untrained, 4-way) emotion_layer is not a class head.
    assert result.task == "attributes" and "categorical" not in config
    assert not (result.run_dir / "detailed_head.safetensors").exists()
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
    from ser_cache.runs.vox_profile import ImportConfig, import_vox_profile
    from ser_cache.runs.vox_profile_checkpoint import ImportError_

    src, tensors = authors_wavlm_checkpoint(tmp_path / "ckpt", models["wavlm"])
    extra = dict(tensors, surprise_layer=torch.zeros(3))
    del extra["valence_layer.2.bias"]
    write_checkpoint(tmp_path / "bad", json.loads((src / "config.json").read_text()), extra)
    with pytest.raises(ImportError_, match=r"unknown key\(s\) surprise_layer.*missing key\(s\) valence_layer.2.bias"):
        import_vox_profile(ImportConfig(source=str(tmp_path / "bad"), out=tmp_path / "run",
                                        backbone=str(models["wavlm"])))
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_for_another_backbone_is_refused(models, tmp_path):
    from ser_cache.runs.vox_profile import ImportConfig, import_vox_profile
    from ser_cache.runs.vox_profile_checkpoint import ImportError_

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
    pooled = authors_whisper_pooled(tensors, backbone_dir, waves)
    with torch.no_grad():
        return np.array([[torch.sigmoid(_heads(p, tensors, f"{a}_layer"))[0].item() for a in ATTRS] for p in pooled])


def authors_whisper_pooled(tensors: dict, backbone_dir: Path, waves: list[np.ndarray]) -> list[torch.Tensor]:
    """The authors' WhisperWrapper up to its heads, one (HIDDEN,) mean per clip; loralib pairs (encoder
    layers > L // 2) computed as W + B A / r beside the dense weight."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    config = WhisperConfig.from_pretrained(backbone_dir, max_source_positions=750)
    model = WhisperModel(config).eval()
    dense = {k.removeprefix("backbone_model."): v.clone() for k, v in tensors.items()
             if k.startswith("backbone_model.") and not k.endswith(("lora_A", "lora_B"))}
    for k in [k for k in tensors if k.endswith("lora_A")]:
        a, b = tensors[k], tensors[k.removesuffix("lora_A") + "lora_B"]
        if int(k.split(".")[3]) > config.encoder_layers // 2:  # backbone_model.encoder.layers.{i}.fc1
            name = k.removeprefix("backbone_model.").removesuffix(".lora_A") + ".weight"
            dense[name] = dense[name] + b @ a / a.shape[0]
    model.load_state_dict(dense)
    fe = WhisperFeatureExtractor.from_pretrained(backbone_dir, chunk_length=15)
    longest = max(len(w) for w in waves)
    padded = [np.pad(w, (0, longest - len(w))) for w in waves]  # the batch the wrapper receives
    features = fe(padded, return_tensors="pt", sampling_rate=16000, max_length=15 * 16000).input_features
    lengths = [(len(w) // 160 - 1) // 2 + 1 for w in waves]
    with torch.no_grad():
        frames = model.encoder(features).last_hidden_state  # after the encoder's final layer norm
        return [_convs(frames[b], tensors)[:n].mean(0) for b, n in enumerate(lengths)]


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


# --------------------------------------------------------------------------- the categorical models

# The authors' label_list (src/example/categorized_emotion*.py), the order of their emotion_layer, and
# the corpus's EmoClass code of each (MSP-Podcast: A Angry, S Sad, H Happy, U Surprise, F Fear,
# D Disgust, C Contempt, N Neutral, O Other). Written here from those sources, not from vox_profile.py.
AUTHORS_LABELS = ["Anger", "Contempt", "Disgust", "Fear", "Happiness", "Neutral", "Sadness", "Surprise", "Other"]
CODE_OF = {"Anger": "A", "Contempt": "C", "Disgust": "D", "Fear": "F", "Happiness": "H", "Neutral": "N",
           "Sadness": "S", "Surprise": "U", "Other": "O"}
RUN_CLASSES = ("A", "S", "H", "U", "F", "D", "C", "N", "O")


def authors_class_probabilities(pooled: torch.Tensor, tensors: dict) -> dict[str, float]:
    """Their categorical output: softmax over emotion_layer's logits, each named by its corpus code."""
    with torch.no_grad():
        probs = torch.softmax(_heads(pooled, tensors, "emotion_layer"), dim=-1)
    return {CODE_OF[label]: float(p) for label, p in zip(AUTHORS_LABELS, probs)}


def _predicted_classes(run: Path, clips: list[Path], out: Path):
    from ser_cache.runs.predict import predict

    predict(run, files=clips, out=out, device="cpu", task="categorical", with_probabilities=True)
    ids, codes, probs, classes = prediction_file.read_class_predictions(out)
    assert ids == [c.name for c in clips]
    return codes, probs, classes


def _check_detailed_head(run: Path, tensors: dict) -> None:
    from safetensors.torch import load_file

    detailed = load_file(str(run / "detailed_head.safetensors"))
    assert set(detailed) == {f"detailed_out_layer.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    for k, v in detailed.items():
        assert torch.equal(v, tensors[k])
    config = rundir.read_config(run)
    assert config["imported"]["detailed_head"]["outputs"] == 17
    assert config["categorical"]["task"] == "both" and config["categorical"]["classes"] == list(RUN_CLASSES)


@pytest.mark.parametrize("lora", [False, True])
def test_categorical_wavlm_checkpoint_predicts_the_authors_classes_and_attributes(models, tmp_path, lora,
                                                                                   one_torch_thread):
    import soundfile as sf

    from ser_cache.runs.vox_profile import ImportConfig, import_vox_profile

    backbone = three_layer_wavlm(tmp_path / "wavlm3") if lora else models["wavlm"]
    src, tensors = authors_wavlm_checkpoint(tmp_path / "ckpt", backbone, lora=lora, categorical=True)
    result = import_vox_profile(ImportConfig(source=str(src), out=tmp_path / "run", backbone=str(backbone)))
    assert result.system == "finetuned-wavlm" and result.task == "both" and result.merged_lora == (2 if lora else 0)
    clips = _clips(tmp_path / "audio")
    codes, probs, classes = _predicted_classes(result.run_dir, clips, tmp_path / "classes.csv")
    assert classes == RUN_CLASSES
    avd = _predicted(result.run_dir, clips, tmp_path / "avd.csv")
    for i, clip in enumerate(clips):
        pooled = authors_wavlm_pooled(tensors, backbone, sf.read(clip, dtype="float32")[0])
        ref = authors_class_probabilities(pooled, tensors)
        np.testing.assert_allclose(probs[i], [ref[c] for c in classes], atol=1e-4)
        assert codes[i] == max(ref, key=ref.get)
        with torch.no_grad():
            ref_avd = [torch.sigmoid(_heads(pooled, tensors, f"{a}_layer"))[0].item() for a in ATTRS]
        np.testing.assert_allclose((avd[i] - 1) / 6, ref_avd, atol=1e-4)
    _check_detailed_head(result.run_dir, tensors)


def test_the_class_map_puts_each_of_the_authors_classes_on_its_code(models, tmp_path, one_torch_thread):
    """A class head that ignores the audio: its logits are its bias, a different value per class with
    Fear the largest, so the run must predict F and give every code the probability of the authors'
    class of that name (a swapped pair in the map changes two columns)."""
    from typer.testing import CliRunner

    from ser_cache.cli.app import app

    src, tensors = authors_wavlm_checkpoint(tmp_path / "ckpt", models["wavlm"], categorical=True)
    bias = torch.tensor([1.0, 2.0, 3.0, 9.0, 4.0, 5.0, 6.0, 7.0, 0.0])  # the authors' order: Fear (3) wins
    tensors = dict(tensors, **{"emotion_layer.2.weight": torch.zeros(9, HIDDEN), "emotion_layer.2.bias": bias})
    write_checkpoint(src, json.loads((src / "config.json").read_text()), tensors)
    run = tmp_path / "run"
    res = CliRunner().invoke(app, ["import", "vox-profile", str(src), "--out", str(run), "--backbone",
                                   str(models["wavlm"])])
    assert res.exit_code == 0, res.output
    assert "finetuned-wavlm run, task both" in res.output
    clips = _clips(tmp_path / "audio", seconds=(1.0, 0.7))
    codes, probs, classes = _predicted_classes(run, clips, tmp_path / "classes.csv")
    assert codes == ["F", "F"]
    expected = dict(zip((CODE_OF[label] for label in AUTHORS_LABELS), torch.softmax(bias, 0).tolist()))
    for row in probs:
        np.testing.assert_allclose(row, [expected[c] for c in classes], atol=1e-6)


def test_the_class_map_covers_the_run_classes_once():
    from ser_cache.runs.vox_profile_checkpoint import AUTHORS_CLASSES, CLASS_MAP, run_class_order

    assert list(AUTHORS_CLASSES) == AUTHORS_LABELS
    assert {AUTHORS_CLASSES[i]: code for i, code in CLASS_MAP.items()} == CODE_OF
    assert [AUTHORS_LABELS[i] for i in run_class_order()] == [
        "Anger", "Sadness", "Happiness", "Surprise", "Fear", "Disgust", "Contempt", "Neutral", "Other"]


def test_a_categorical_checkpoint_without_its_detailed_head_is_refused(models, tmp_path):
    from ser_cache.runs.vox_profile import ImportConfig, import_vox_profile
    from ser_cache.runs.vox_profile_checkpoint import ImportError_

    src, tensors = authors_wavlm_checkpoint(tmp_path / "ckpt", models["wavlm"], categorical=True)
    del tensors["detailed_out_layer.2.bias"]
    write_checkpoint(src, json.loads((src / "config.json").read_text()), tensors)
    with pytest.raises(ImportError_, match=r"missing key\(s\) detailed_out_layer.2.bias"):
        import_vox_profile(ImportConfig(source=str(src), out=tmp_path / "run", backbone=str(models["wavlm"])))
    assert not (tmp_path / "run").exists()


def three_layer_whisper(path: Path, like: Path) -> Path:
    """The tiny Whisper with 3 encoder layers: layer 2 > 3 // 2 is one the authors give LoRA."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    torch.manual_seed(4)
    WhisperForConditionalGeneration(WhisperConfig.from_pretrained(like, encoder_layers=3)).save_pretrained(path)
    WhisperFeatureExtractor.from_pretrained(like).save_pretrained(path)
    return path


def test_categorical_whisper_checkpoint_with_lora_predicts_the_authors_classes(models, tmp_path, one_torch_thread):
    import soundfile as sf

    from ser_cache.runs.vox_profile import ImportConfig, import_vox_profile

    backbone = three_layer_whisper(tmp_path / "whisper3", models["whisper"])
    src, tensors = authors_whisper_checkpoint(tmp_path / "ckpt", backbone, categorical=True, lora=True)
    result = import_vox_profile(ImportConfig(source=str(src), out=tmp_path / "run", backbone=str(backbone)))
    assert result.system == "frame-heads" and result.task == "both" and result.merged_lora == 2
    clips = _clips(tmp_path / "audio", seconds=(1.3, 2.1, 0.8))
    codes, probs, classes = _predicted_classes(result.run_dir, clips, tmp_path / "classes.csv")
    avd = _predicted(result.run_dir, clips, tmp_path / "avd.csv")
    pooled = authors_whisper_pooled(tensors, backbone, [sf.read(c, dtype="float32")[0] for c in clips])
    for i, p in enumerate(pooled):
        ref = authors_class_probabilities(p, tensors)
        np.testing.assert_allclose(probs[i], [ref[c] for c in classes], atol=1e-4)
        assert codes[i] == max(ref, key=ref.get)
    np.testing.assert_allclose((avd - 1) / 6, authors_whisper_forward(
        tensors, backbone, [sf.read(c, dtype="float32")[0] for c in clips]), atol=1e-4)
    _check_detailed_head(result.run_dir, tensors)


@pytest.mark.slow
def test_finetune_both_can_start_from_an_imported_categorical_run(models, tmp_path, one_torch_thread):
    """The imported class head (rows already in the run's class order) is taken over by a 9-class run."""
    from safetensors.torch import load_file

    from ser_cache.finetune.loop import finetune_wavlm
    from ser_cache.finetune.options import FinetuneConfig
    from ser_cache.runs.vox_profile import ImportConfig, import_vox_profile

    from finetune_support import learnable_corpus

    src, _ = authors_wavlm_checkpoint(tmp_path / "ckpt", models["wavlm"], categorical=True)
    imported = import_vox_profile(ImportConfig(source=str(src), out=tmp_path / "imported",
                                               backbone=str(models["wavlm"])))
    corpus = learnable_corpus(tmp_path / "corpus")
    cfg = FinetuneConfig(data=corpus, out=tmp_path / "ft", model=str(models["wavlm"]), epochs=1, lr_encoder=1e-12,
                         lr_heads=1e-12, conv_dim=HIDDEN, hidden=HIDDEN, gender_weight=0.0, speaker_weight=0.0,
                         undersample=False, device="cpu", progress=False, init_from=imported.run_dir,
                         weight_decay=0.0, task="both", classes=9, class_weights="none")
    result = finetune_wavlm(cfg)
    a, b = load_file(str(imported.run_dir / layout.WEIGHTS)), load_file(str(result.run_dir / layout.WEIGHTS))
    head = [k for k in a if k.startswith("heads.classifier.")]
    assert len(head) == 4 and max(float((a[k] - b[k]).abs().max()) for k in head) < 1e-8
    assert rundir.read_config(result.run_dir)["categorical"]["classes"] == list(RUN_CLASSES)
