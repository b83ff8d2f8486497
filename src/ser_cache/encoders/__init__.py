"""Frozen encoders behind one small interface: `load_encoder(name, ...)` → `Encoder.encode(batch)`.

A model is named by a short name (KNOWN_MODELS, the registry's table), any Hugging Face id, or a
local directory; all three go through the same `from_pretrained` path. The kind comes from the short
name, or else from the model's config.json: "whisper", an SSL family ("wavlm", "hubert", "wav2vec2",
"data2vec-audio", "wav2vec2-bert": one encoder, encoders.ssl), "xvector" or "text".
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
from ser_cache.encoders.layers import LayersError
from ser_cache.encoders.registry import REGISTRY

SSL = "ssl"
KINDS = ("whisper", SSL, "xvector", "text")  # the encoder kinds; KIND_CHOICES adds the SSL family names
SSL_FAMILIES = ("wavlm", "hubert", "wav2vec2", "data2vec-audio", "wav2vec2-bert")  # encoders.ssl.FAMILIES
# Every --kind accepted: "ssl" and each SSL family name mean the same encoder (its family read from
# the checkpoint's config).
KIND_CHOICES = ("whisper", "wavlm", "xvector", "text", SSL, *SSL_FAMILIES[1:])
# --kind on the command line: the kinds, and wavlm, its name before ssl; load_encoder also takes the other
# family names (KIND_CHOICES), which the command line leaves to detection from the config.
SHOWN_KINDS = ("whisper", SSL, "wavlm", "xvector", "text")
LAYERED_KINDS = ("whisper", *SSL_FAMILIES)  # kinds whose hidden states --layers chooses among


@dataclass(frozen=True)
class KnownModel:
    hub_id: str
    kind: str


KNOWN_MODELS = {name: KnownModel(e.hub_id, e.kind) for name, e in REGISTRY.items()}
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


UNSUPPORTED_AUDIO = ("unispeech-sat", "unispeech", "sew", "sew-d", "wav2vec2-conformer")


def _kind_of(model: str, config: dict) -> str:
    model_type = config.get("model_type", "")
    architectures = config.get("architectures") or []
    if model_type == "whisper":
        return "whisper"
    if model_type in ("wavlm", "wav2vec2", "hubert", "unispeech-sat") and any(
            a.endswith("ForXVector") for a in architectures):
        return "xvector"
    if model_type in SSL_FAMILIES:
        return model_type
    if model_type in UNSUPPORTED_AUDIO:
        raise EncoderError(f"model '{model}': {model_type} models are not supported (the audio encoders are "
                           f"Whisper and {', '.join(SSL_FAMILIES)})")
    if not model_type:
        raise EncoderError(f"model '{model}': no config.json with a model_type; pass --kind")
    return "text"


def detect_kind(model: str) -> str:
    """The encoder kind of a model: from the short name, else from its config (local or cached).
    A self-supervised speech model's kind is its family (config.model_type: "wavlm", "hubert", ...)."""
    if model in KNOWN_MODELS:
        return KNOWN_MODELS[model].kind
    return _kind_of(model, read_model_config(model))


def encoder_class(kind: str) -> str:
    """"ssl" for "ssl" and every SSL family name (one encoder), else the kind itself."""
    return SSL if kind == SSL or kind in SSL_FAMILIES else kind


def _check_kind(model: str, kind: str) -> None:
    """Refuse a --kind the checkpoint is not, before loading it: loaded as the wrong kind it fails
    deep in transformers (Whisper as an x-vector) or "works" on nothing (Whisper as text: every
    row fails). The check is skipped where the kind cannot be told without the network, or where
    --kind is the way around detection (a config without model_type, a model type not detected).
    "ssl" and the family names are one kind: the family is read from the checkpoint."""
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
    # An x-vector checkpoint holds a whole WavLM: its layers can be extracted as --kind wavlm (or ssl).
    if encoder_class(kind) == encoder_class(actual) or (encoder_class(kind) == SSL and actual == "xvector"):
        return
    raise EncoderError(f"--kind {kind}: model '{model}' is {described}, an encoder of kind {actual}; "
                       f"leave --kind out (it is detected) or pass --kind {actual}")


def _ssl_family(model: str, kind: str) -> str:
    """The family of a model loaded with --kind ssl (or a family name): its config's model_type."""
    if model in KNOWN_MODELS:
        actual = KNOWN_MODELS[model].kind
        return "wavlm" if actual == "xvector" else actual
    config = read_model_config(model) or {}
    model_type = config.get("model_type", "")
    if model_type in SSL_FAMILIES:
        return model_type
    if kind in SSL_FAMILIES:
        return kind
    raise EncoderError(f"--kind {kind}: model '{model}' has no config.json naming its family (model_type); "
                       f"pass --kind {'|'.join(SSL_FAMILIES)}")


def load_encoder(
    model: str,
    *,
    kind: str | None = None,
    device: str = "auto",
    precision: str = "auto",
    window: str | None = None,
    pooling: str = "mean",
    max_seconds: float = 15.0,
    layers: str | None = None,
) -> Encoder:
    """Load a frozen encoder by short name, hub id or local directory.

    `window` is Whisper's ("window", the default, or "trimmed"); given for another kind it is
    refused rather than ignored. `layers` (--layers: all, last, or indices and ranges, see
    encoders.layers) chooses the hidden states of an audio encoder with layers (Whisper, the SSL
    families); None is each one's default (pooled SSL: all; Whisper and frames: last); given for
    a text or x-vector encoder it is refused.
    """
    if kind is None:
        kind = detect_kind(model)
    elif kind not in KIND_CHOICES:
        raise EncoderError(f"--kind {kind}: expected one of {', '.join(KIND_CHOICES)}")
    else:
        _check_kind(model, kind)
    # An x-vector store records its encoder's own pooling ("xvector"); loading that store's encoder
    # again (predict on new audio) passes it back, and it is the only pooling an x-vector has.
    own_pooling = kind == "xvector" and pooling == XVECTOR
    if pooling not in POOLINGS and not own_pooling:
        raise EncoderError(f"--pooling {pooling}: expected one of {', '.join(POOLINGS)}")
    if pooling == FRAMES and kind not in FRAME_KINDS and kind != SSL:
        raise EncoderError(f"--pooling frames: model '{model}' is a {kind} encoder, which has no frames to keep; "
                           f"only audio encoders with hidden states ({', '.join(FRAME_KINDS)}) can keep them")
    if window is not None and kind != "whisper":
        raise EncoderError(f"--window {window}: model '{model}' is a {kind} encoder; --window chooses Whisper's input "
                           "(its 15-s window or the trimmed clip) and applies to Whisper only: leave it out")
    if layers is not None and encoder_class(kind) not in ("whisper", SSL):
        raise EncoderError(f"--layers {layers}: model '{model}' is a {kind} encoder, with one output; --layers "
                           f"chooses among the hidden states of an audio encoder ({', '.join(LAYERED_KINDS)}): "
                           "leave it out")
    resolved = resolve_model(model, HUB_IDS)
    runtime = RuntimeOptions(device=device, precision=precision)
    try:
        if kind == "whisper":
            from ser_cache.encoders.whisper import WhisperAudioEncoder

            return WhisperAudioEncoder(resolved, runtime, window=window or "window", pooling=pooling,
                                       max_seconds=max_seconds, layers=layers)
        if encoder_class(kind) == SSL:
            from ser_cache.encoders.ssl import SSLEncoder

            return SSLEncoder(resolved, runtime, family=_ssl_family(model, kind), pooling=pooling, layers=layers,
                              max_seconds=max_seconds)
    except LayersError as exc:
        raise EncoderError(f"model '{model}': {exc}") from None
    if kind == "xvector":
        from ser_cache.encoders.wavlm import XVectorEncoder

        return XVectorEncoder(resolved, runtime, max_seconds=max_seconds)
    from ser_cache.encoders.text import TextEncoder

    return TextEncoder(resolved, runtime, pooling=pooling)


__all__ = [
    "FRAMES",
    "KINDS",
    "KIND_CHOICES",
    "SHOWN_KINDS",
    "KNOWN_MODELS",
    "POOLINGS",
    "Encoder",
    "EncoderError",
    "detect_kind",
    "load_encoder",
    "masked_pool",
]
