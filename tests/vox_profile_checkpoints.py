"""Checkpoints in the vox-profile authors' layout (WavLMWrapper, WhisperWrapper) with random
weights, for `ser-cache import vox-profile` and the runs it makes.

`categorical=True` gives the categorical models' layout (src/model/emotion/{wavlm,whisper}_emotion.py):
the wrapper arguments without predict_gender, output_class_num 9, and a 9-way emotion_layer (the order
Anger, Contempt, Disgust, Fear, Happiness, Neutral, Sadness, Surprise, Other) beside the 17-way
detailed_out_layer and the sigmoid A/V/D heads."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN = 16  # the authors' hidden_dim, small for the test


ATTRS = ("arousal", "valence", "dominance")


def _head_tensors(prefix: str, in_dim: int, out_dim: int, gen: torch.Generator) -> dict:
    """Linear(in, hidden) – ReLU – Linear(hidden, out): keys {prefix}.0 and {prefix}.2."""
    return {f"{prefix}.0.weight": torch.randn(HIDDEN, in_dim, generator=gen) * 0.3,
            f"{prefix}.0.bias": torch.randn(HIDDEN, generator=gen) * 0.1,
            f"{prefix}.2.weight": torch.randn(out_dim, HIDDEN, generator=gen) * 0.3,
            f"{prefix}.2.bias": torch.randn(out_dim, generator=gen) * 0.1}


def _downstream(in_dim: int, gen: torch.Generator, *, gender: bool, n_emotions: int = 4) -> dict:
    t = {}
    for i, (cin, cout) in zip((0, 3, 6), ((in_dim, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, HIDDEN))):
        t[f"model_seq.{i}.weight"] = torch.randn(cout, cin, 1, generator=gen) * 0.3
        t[f"model_seq.{i}.bias"] = torch.randn(cout, generator=gen) * 0.1
    for attr in ATTRS:
        t.update(_head_tensors(f"{attr}_layer", HIDDEN, 1, gen))
    if gender:
        t.update(_head_tensors("gender_layer", HIDDEN, 2, gen))
    # Parts of the authors' wrapper that the dimensional model does not use (4 outputs there), the
    # categorical model's class head (9).
    t.update(_head_tensors("emotion_layer", HIDDEN, n_emotions, gen))
    t.update(_head_tensors("detailed_out_layer", HIDDEN, 17, gen))
    return t


def write_checkpoint(path: Path, wrapper: dict, tensors: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(wrapper))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    return path


def _wrapper(pretrain_model: str, finetune_method: str, lora_rank: int, freeze: bool, *, gender: bool,
             categorical: bool) -> dict:
    wrapper = {"pretrain_model": pretrain_model, "hidden_dim": HIDDEN, "finetune_method": finetune_method,
               "lora_rank": lora_rank, "freeze_params": freeze, "output_class_num": 9 if categorical else 4,
               "use_conv_output": True, "detailed_class_num": 17}
    return wrapper if categorical else {**wrapper, "predict_gender": gender}


def authors_wavlm_checkpoint(path: Path, backbone_dir: Path, *, gender: bool = True, lora: bool = False,
                             categorical: bool = False):
    """A WavLMWrapper checkpoint (pretrain_model wavlm_large) with random weights and a non-uniform `weights`
    (categorical: the categorical wrapper's, which has no gender head)."""
    from transformers import WavLMModel

    gen = torch.Generator().manual_seed(1)
    backbone = WavLMModel.from_pretrained(backbone_dir)
    state = {f"backbone_model.{k}": v.clone() for k, v in backbone.state_dict().items()}
    n_states = backbone.config.num_hidden_layers + 1
    tensors = {**state, "weights": torch.randn(n_states, generator=gen),
               **_downstream(backbone.config.hidden_size, gen, gender=gender and not categorical,
                             n_emotions=9 if categorical else 4)}
    if lora:
        # The authors build LoRA layers in layers > L // 2 only; a pair on layer 0 (which their
        # non-strict loading drops) must change nothing.
        n = backbone.config.num_hidden_layers
        for layer in [*range(n // 2 + 1, n), 0]:
            for dense in ("intermediate_dense", "output_dense"):
                w = tensors[f"backbone_model.encoder.layers.{layer}.feed_forward.{dense}.weight"]
                tensors[f"backbone_model.encoder.layers.{layer}.feed_forward.{dense}.lora_A"] = \
                    torch.randn(4, w.shape[1], generator=gen) * 0.2
                tensors[f"backbone_model.encoder.layers.{layer}.feed_forward.{dense}.lora_B"] = \
                    torch.randn(w.shape[0], 4, generator=gen) * 0.2
    wrapper = _wrapper("wavlm_large", "lora" if lora else "finetune", 4, False, gender=gender, categorical=categorical)
    return write_checkpoint(path, wrapper, tensors), tensors


def authors_whisper_checkpoint(path: Path, backbone_dir: Path, *, gender: bool = False, categorical: bool = False,
                               lora: bool = False):
    """A WhisperWrapper checkpoint (whisper_large layout: 750-row positional table, decoder included);
    `lora`: finetune_method lora, rank-16 loralib pairs on fc1/fc2 of encoder layers > L // 2."""
    from transformers import WhisperModel

    gen = torch.Generator().manual_seed(2)
    backbone = WhisperModel.from_pretrained(backbone_dir)
    state = {f"backbone_model.{k}": v.clone() for k, v in backbone.state_dict().items()}
    state["backbone_model.encoder.embed_positions.weight"] = (
        state["backbone_model.encoder.embed_positions.weight"][:750].clone())
    d = backbone.config.d_model
    tensors = {**state, "embed_positions": state["backbone_model.encoder.embed_positions.weight"].clone(),
               "weights": torch.ones(backbone.config.num_hidden_layers + 1) / 3,  # unused by the Whisper model
               **_downstream(d, gen, gender=gender and not categorical, n_emotions=9 if categorical else 4)}
    if lora:
        n = backbone.config.encoder_layers
        for layer in range(n // 2 + 1, n):
            for fc in ("fc1", "fc2"):
                w = tensors[f"backbone_model.encoder.layers.{layer}.{fc}.weight"]
                tensors[f"backbone_model.encoder.layers.{layer}.{fc}.lora_A"] = torch.randn(16, w.shape[1],
                                                                                          generator=gen) * 0.2
                tensors[f"backbone_model.encoder.layers.{layer}.{fc}.lora_B"] = torch.randn(w.shape[0], 16,
                                                                                          generator=gen) * 0.2
    wrapper = _wrapper("whisper_large", "lora" if lora else "finetune", 16, True, gender=gender,
                       categorical=categorical)
    return write_checkpoint(path, wrapper, tensors), tensors
