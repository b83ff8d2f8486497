"""WavLM, frozen: every hidden state pooled (for a learned layer weighting), or the x-vector head."""

from __future__ import annotations

import warnings

import numpy as np
import torch


def _quiet(forward):
    """WavLM's relative-position attention mixes a float bias with a boolean padding mask inside
    torch's MultiheadAttention, which warns on every call; the result is correct."""

    def wrapped(self, prepared):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask")
            return forward(self, prepared)

    return wrapped

from ser_cache.audio import SAMPLE_RATE
from ser_cache.encoders.base import (
    Encoder,
    ResolvedModel,
    RuntimeOptions,
    load_pretrained,
    masked_pool,
    pad_waves,
    pooled_dim,
    read_json,
)


def _input_conventions(resolved: ResolvedModel, config) -> tuple[bool, bool]:
    """(normalise each waveform, pass an attention mask), as the model's preprocessor says.

    Checkpoints whose CNN uses group norm were trained on zero-padded batches without a mask;
    those with layer norm expect the mask. The preprocessor config records which.
    """
    pre = {}
    if resolved.is_local_dir:
        from pathlib import Path

        pre = read_json(Path(resolved.source) / "preprocessor_config.json")
    else:
        try:
            from transformers import AutoFeatureExtractor

            pre = AutoFeatureExtractor.from_pretrained(resolved.source, local_files_only=resolved.local_only).to_dict()
        except (OSError, ValueError):
            pre = {}
    uses_mask = pre.get("return_attention_mask", getattr(config, "feat_extract_norm", "group") == "layer")
    return bool(pre.get("do_normalize", True)), bool(uses_mask)


def normalise(audio: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance per utterance over its real samples; padding stays zero."""
    t = audio.shape[1]
    mask = (torch.arange(t, device=audio.device)[None, :] < lengths[:, None]).to(audio.dtype)
    n = lengths.to(audio.dtype).clamp_min(1)[:, None]
    mean = (audio * mask).sum(1, keepdim=True) / n
    var = (((audio - mean) ** 2) * mask).sum(1, keepdim=True) / n
    return (audio - mean) / torch.sqrt(var + 1e-7) * mask


class _WavLMBase(Encoder):
    modality = "audio"

    def prepare(self, waves: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_waves(waves, pin=self.pin)

    def _on_device(self, prepared) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        audio, lengths = prepared
        audio = audio.to(self.device, non_blocking=True)
        lengths = lengths.to(self.device)
        if self.do_normalize:
            audio = normalise(audio, lengths)
        mask = None
        if self.uses_mask:
            mask = (torch.arange(audio.shape[1], device=self.device)[None, :] < lengths[:, None]).long()
        return audio, lengths, mask

    def settings(self) -> dict:
        return {**super().settings(), "max_seconds": self.max_seconds, "sample_rate": SAMPLE_RATE,
                "normalize": self.do_normalize, "attention_mask": self.uses_mask}


class WavLMLayersEncoder(_WavLMBase):
    """All hidden states (CNN projection + every transformer layer), each pooled: (L+1, D)."""

    kind = "wavlm"

    def __init__(self, resolved: ResolvedModel, runtime: RuntimeOptions, *, pooling: str = "mean", max_seconds: float = 15.0):
        from transformers import WavLMModel

        model = load_pretrained(WavLMModel, resolved)
        self.pooling = pooling
        self.max_seconds = max_seconds
        self.do_normalize, self.uses_mask = _input_conventions(resolved, model.config)
        self.n_states = model.config.num_hidden_layers + 1
        self.hidden = model.config.hidden_size
        super().__init__(resolved, model, runtime)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return (self.n_states, pooled_dim(self.hidden, self.pooling))

    def settings(self) -> dict:
        return {**super().settings(), "pooling": self.pooling, "layer": "all"}

    @_quiet
    def _forward(self, prepared) -> torch.Tensor:
        audio, lengths, mask = self._on_device(prepared)
        out = self.model(audio, attention_mask=mask, output_hidden_states=True)
        frames = self.model._get_feat_extract_output_lengths(lengths).long()
        pooled = [masked_pool(h, frames, self.pooling) for h in out.hidden_states]
        return torch.stack(pooled, dim=1)


class XVectorEncoder(_WavLMBase):
    """The speaker-verification head's x-vector (WavLMForXVector.embeddings), one vector per utterance."""

    kind = "xvector"

    def __init__(self, resolved: ResolvedModel, runtime: RuntimeOptions, *, max_seconds: float = 15.0):
        from transformers import WavLMForXVector

        # The classifier/objective layers score training speakers only; the x-vector needs the rest.
        model = load_pretrained(WavLMForXVector, resolved, optional=lambda k: k.startswith(("objective.", "classifier.")))
        self.max_seconds = max_seconds
        self.do_normalize, self.uses_mask = _input_conventions(resolved, model.config)
        self.dim = model.config.xvector_output_dim
        super().__init__(resolved, model, runtime)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return (self.dim,)

    def settings(self) -> dict:
        return {**super().settings(), "pooling": "xvector"}

    @_quiet
    def _forward(self, prepared) -> torch.Tensor:
        audio, _, mask = self._on_device(prepared)
        return self.model(audio, attention_mask=mask).embeddings
