"""Checkpoints in the vox-profile authors' layout (WavLMWrapper, WhisperWrapper) with random
weights, for `ser-cache import vox-profile` and the runs it makes."""

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


def _downstream(in_dim: int, gen: torch.Generator, *, gender: bool) -> dict:
    t = {}
    for i, (cin, cout) in zip((0, 3, 6), ((in_dim, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, HIDDEN))):
        t[f"model_seq.{i}.weight"] = torch.randn(cout, cin, 1, generator=gen) * 0.3
        t[f"model_seq.{i}.bias"] = torch.randn(cout, generator=gen) * 0.1
    for attr in ATTRS:
        t.update(_head_tensors(f"{attr}_layer", HIDDEN, 1, gen))
    if gender:
        t.update(_head_tensors("gender_layer", HIDDEN, 2, gen))
    # Parts of the authors' wrapper that the dimensional model does not use.
    t.update(_head_tensors("emotion_layer", HIDDEN, 4, gen))
    t.update(_head_tensors("detailed_out_layer", HIDDEN, 17, gen))
    return t


def write_checkpoint(path: Path, wrapper: dict, tensors: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(wrapper))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    return path


def authors_wavlm_checkpoint(path: Path, backbone_dir: Path, *, gender: bool = True, lora: bool = False):
    """A WavLMWrapper checkpoint (pretrain_model wavlm_large) with random weights and a non-uniform `weights`."""
    from transformers import WavLMModel

    gen = torch.Generator().manual_seed(1)
    backbone = WavLMModel.from_pretrained(backbone_dir)
    state = {f"backbone_model.{k}": v.clone() for k, v in backbone.state_dict().items()}
    n_states = backbone.config.num_hidden_layers + 1
    tensors = {**state, "weights": torch.randn(n_states, generator=gen),
               **_downstream(backbone.config.hidden_size, gen, gender=gender)}
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
    wrapper = {"pretrain_model": "wavlm_large", "hidden_dim": HIDDEN, "finetune_method": "lora" if lora else "finetune",
               "lora_rank": 4, "freeze_params": False, "output_class_num": 4, "use_conv_output": True,
               "detailed_class_num": 17, "predict_gender": gender}
    return write_checkpoint(path, wrapper, tensors), tensors


def authors_whisper_checkpoint(path: Path, backbone_dir: Path, *, gender: bool = False):
    """A WhisperWrapper checkpoint (whisper_large layout: 750-row positional table, decoder included)."""
    from transformers import WhisperModel

    gen = torch.Generator().manual_seed(2)
    backbone = WhisperModel.from_pretrained(backbone_dir)
    state = {f"backbone_model.{k}": v.clone() for k, v in backbone.state_dict().items()}
    state["backbone_model.encoder.embed_positions.weight"] = (
        state["backbone_model.encoder.embed_positions.weight"][:750].clone())
    d = backbone.config.d_model
    tensors = {**state, "embed_positions": state["backbone_model.encoder.embed_positions.weight"].clone(),
               "weights": torch.ones(backbone.config.num_hidden_layers + 1) / 3,  # unused by the Whisper model
               **_downstream(d, gen, gender=gender)}
    wrapper = {"pretrain_model": "whisper_large", "hidden_dim": HIDDEN, "finetune_method": "finetune",
               "lora_rank": 16, "freeze_params": True, "output_class_num": 4, "use_conv_output": True,
               "detailed_class_num": 17, "predict_gender": gender}
    return write_checkpoint(path, wrapper, tensors), tensors
