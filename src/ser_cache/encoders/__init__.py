"""Frozen encoders behind one small interface: `load_encoder(name, ...)` → `Encoder.encode(batch)`.

A model is named by a short name (KNOWN_MODELS), any Hugging Face id, or a local directory; all
three go through the same `from_pretrained` path. The kind (whisper, wavlm, xvector, text) comes
from the short name, or else from the model's config.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ser_cache.encoders.base import (
    FRAME_KINDS,
    FRAMES,
    POOLINGS,
    XVECTOR,
    Encoder,
    EncoderError,
    RuntimeOptions,
    masked_pool,
    read_json,
    resolve_model,
)

KINDS = ("whisper", "wavlm", "xvector", "text")


@dataclass(frozen=True)
class KnownModel:
    hub_id: str
    kind: str


KNOWN_MODELS = {
    "whisper-large-v3": KnownModel("openai/whisper-large-v3", "whisper"),
    "roberta-large": KnownModel("FacebookAI/roberta-large", "text"),
    "wavlm-large": KnownModel("microsoft/wavlm-large", "wavlm"),
    "wavlm-base-plus-sv": KnownModel("microsoft/wavlm-base-plus-sv", "xvector"),
}
HUB_IDS = {k: v.hub_id for k, v in KNOWN_MODELS.items()}


def read_model_config(model: str, *, allow_network: bool = True) -> dict | None:
    """The model's config.json as a dict (local directory, or the hub's cache); None when it is
    not on disk and `allow_network` is False."""
    resolved = resolve_model(model, HUB_IDS)
    if resolved.is_local_dir:
        return read_json(Path(resolved.source) / "config.json")
    if not (resolved.local_only or allow_network):
        return None
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(resolved.source, local_files_only=resolved.local_only).to_dict()
    except (OSError, ValueError) as exc:
        from ser_cache.encoders.base import load_error

        raise load_error(resolved, exc) from None


def _kind_of(model: str, config: dict) -> str:
    model_type = config.get("model_type", "")
    architectures = config.get("architectures") or []
    if model_type == "whisper":
        return "whisper"
    if model_type in ("wavlm", "wav2vec2", "hubert", "unispeech-sat"):
        if any(a.endswith("ForXVector") for a in architectures):
            return "xvector"
        if model_type != "wavlm":
            raise EncoderError(f"model '{model}': {model_type} models are not supported yet (WavLM is)")
        return "wavlm"
    if not model_type:
        raise EncoderError(f"model '{model}': no config.json with a model_type; pass --kind")
    return "text"


def detect_kind(model: str) -> str:
    """The encoder kind of a model: from the short name, else from its config (local or cached)."""
    if model in KNOWN_MODELS:
        return KNOWN_MODELS[model].kind
    return _kind_of(model, read_model_config(model))


def _check_kind(model: str, kind: str) -> None:
    """Refuse a --kind the checkpoint is not, before loading it: loaded as the wrong kind it fails
    deep in transformers (Whisper as an x-vector) or "works" on nothing (Whisper as text: every
    row fails). The check is skipped where the kind cannot be told without the network, or where
    --kind is the way around detection (a config without model_type, a model type not detected)."""
    if model in KNOWN_MODELS:
        actual, described = KNOWN_MODELS[model].kind, f"a {KNOWN_MODELS[model].kind} model"
    else:
        try:
            config = read_model_config(model, allow_network=False)
            if config is None:
                return
            actual = _kind_of(model, config)
        except EncoderError:
            return
        architectures = config.get("architectures") or []
        described = f"a {config.get('model_type')} model" + (f" ({', '.join(architectures)})" if architectures else "")
    # An x-vector checkpoint holds a whole WavLM: its layers can be extracted as --kind wavlm.
    if kind == actual or (kind == "wavlm" and actual == "xvector"):
        return
    raise EncoderError(f"--kind {kind}: model '{model}' is {described}, an encoder of kind {actual}; "
                       f"leave --kind out (it is detected) or pass --kind {actual}")


def load_encoder(
    model: str,
    *,
    kind: str | None = None,
    device: str = "auto",
    precision: str = "auto",
    window: str | None = None,
    pooling: str = "mean",
    max_seconds: float = 15.0,
) -> Encoder:
    """Load a frozen encoder by short name, hub id or local directory.

    `window` is Whisper's ("window", the default, or "trimmed"); given for another kind it is
    refused rather than ignored.
    """
    if kind is None:
        kind = detect_kind(model)
    elif kind not in KINDS:
        raise EncoderError(f"--kind {kind}: expected one of {', '.join(KINDS)}")
    else:
        _check_kind(model, kind)
    # An x-vector store records its encoder's own pooling ("xvector"); loading that store's encoder
    # again (predict on new audio) passes it back, and it is the only pooling an x-vector has.
    own_pooling = kind == "xvector" and pooling == XVECTOR
    if pooling not in POOLINGS and not own_pooling:
        raise EncoderError(f"--pooling {pooling}: expected one of {', '.join(POOLINGS)}")
    if pooling == FRAMES and kind not in FRAME_KINDS:
        raise EncoderError(f"--pooling frames: model '{model}' is a {kind} encoder, which has no frames to keep; "
                           f"only audio encoders with one output layer ({', '.join(FRAME_KINDS)}) can keep them")
    if window is not None and kind != "whisper":
        raise EncoderError(f"--window {window}: model '{model}' is a {kind} encoder; --window chooses Whisper's input "
                           "(its 15-s window or the trimmed clip) and applies to Whisper only: leave it out")
    resolved = resolve_model(model, HUB_IDS)
    runtime = RuntimeOptions(device=device, precision=precision)
    if kind == "whisper":
        from ser_cache.encoders.whisper import WhisperAudioEncoder

        return WhisperAudioEncoder(resolved, runtime, window=window or "window", pooling=pooling,
                                   max_seconds=max_seconds)
    if kind == "wavlm" and pooling == FRAMES:
        from ser_cache.encoders.wavlm import WavLMFramesEncoder

        return WavLMFramesEncoder(resolved, runtime, max_seconds=max_seconds)
    if kind == "wavlm":
        from ser_cache.encoders.wavlm import WavLMLayersEncoder

        return WavLMLayersEncoder(resolved, runtime, pooling=pooling, max_seconds=max_seconds)
    if kind == "xvector":
        from ser_cache.encoders.wavlm import XVectorEncoder

        return XVectorEncoder(resolved, runtime, max_seconds=max_seconds)
    from ser_cache.encoders.text import TextEncoder

    return TextEncoder(resolved, runtime, pooling=pooling)


__all__ = [
    "FRAMES",
    "KINDS",
    "KNOWN_MODELS",
    "POOLINGS",
    "Encoder",
    "EncoderError",
    "detect_kind",
    "load_encoder",
    "masked_pool",
]
