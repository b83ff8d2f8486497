"""The encoder components of the online path, by kind: their run "system", config.json entry, loading
and rebuilding. What the loop, a run's loading and predict need to know about WavLM vs Whisper."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from ser_cache.system import finetuned, whisper_finetuned


@dataclass(frozen=True)
class Kind:
    name: str  # `finetune NAME`, and config.json's key of the encoder entry
    system: str  # config.json "system"
    input_name: str  # the heads' input of the pooled vector
    label: str  # in messages


KINDS = {
    "wavlm": Kind("wavlm", finetuned.SYSTEM, finetuned.AUDIO_INPUT, "WavLM"),
    "whisper": Kind("whisper", whisper_finetuned.SYSTEM, whisper_finetuned.AUDIO_INPUT, "Whisper"),
}
SYSTEMS = {k.system: k for k in KINDS.values()}


def kind_of(config: Mapping) -> Kind | None:
    """The kind of a fine-tuned run's config.json, None for any other run."""
    return SYSTEMS.get(str(config.get("system")))


def arch_of(config: Mapping) -> dict:
    """The encoder entry of a fine-tuned run's config.json ("wavlm" or "whisper"); KeyError when its
    "system" names no fine-tuned model."""
    kind = kind_of(config)
    if kind is None:
        raise KeyError(f"system {config.get('system')!r} is not a fine-tuned model's")
    return config[kind.name]


def n_layers(kind: str, encoder: nn.Module) -> int:
    cfg = encoder.config
    return int(cfg.encoder_layers if kind == "whisper" else cfg.num_hidden_layers)


def build_from_config(config: Mapping, encoder: nn.Module | None = None):
    """The model a fine-tuned run describes (untrained; `encoder`: its pretrained base)."""
    if kind_of(config).name == "whisper":
        return whisper_finetuned.build_from_config(dict(config), encoder)
    return finetuned.build_from_config(dict(config), encoder)


def load_base(kind: str, model_id: str) -> tuple[nn.Module, object]:
    """(pretrained encoder, ResolvedModel) of a kind, by short name, hub id or local directory."""
    if kind == "whisper":
        encoder, resolved, _ = whisper_finetuned.load_whisper(model_id)
        return encoder, resolved
    encoder, resolved, _, _ = finetuned.load_wavlm(model_id)
    return encoder, resolved
