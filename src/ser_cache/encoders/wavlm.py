"""WavLM's own parts: the scaled-dot-product attention the frozen WavLM encoders run, the input
conventions of the Wav2Vec2FeatureExtractor families, and the x-vector encoder (WavLMForXVector).

The hidden states of WavLM (and HuBERT, wav2vec 2.0, data2vec-audio, W2V-BERT) are encoders.ssl's."""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from ser_cache.data.audio import SAMPLE_RATE
from ser_cache.encoders.base import (
    XVECTOR,
    Encoder,
    ResolvedModel,
    RuntimeOptions,
    load_pretrained,
    pad_waves,
    read_json,
)


def quiet_attention(forward):
    """The stock WavLM attention (where use_sdpa_attention cannot apply) mixes a float bias with a
    boolean padding mask inside torch's MultiheadAttention, which warns on every call; the result
    is correct."""

    def wrapped(self, prepared):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask")
            return forward(self, prepared)

    return wrapped


def _sdpa_self_attention(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                         gated_position_bias: torch.Tensor) -> tuple[torch.Tensor, None]:
    """WavLMAttention.torch_multi_head_self_attention, computed with F.scaled_dot_product_attention.

    Same projections, gated relative-position bias (an additive mask per head), key padding mask
    (1 = a real frame), scale 1/sqrt(head_dim) and attention dropout; the attention weights are not
    returned (nothing here asks for them).
    """
    b, t, e = hidden_states.shape
    h, d = self.num_heads, self.head_dim

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.view(b, t, h, d).transpose(1, 2)

    q, k, v = heads(self.q_proj(hidden_states)), heads(self.k_proj(hidden_states)), heads(self.v_proj(hidden_states))
    bias = gated_position_bias.view(b, h, t, t).to(q.dtype)
    if attention_mask is not None:
        bias = bias.masked_fill(attention_mask.ne(1)[:, None, None, :], float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0)
    return self.out_proj(out.transpose(1, 2).reshape(b, t, e)), None


def use_sdpa_attention(model: torch.nn.Module) -> int:
    """Run every WavLM attention layer in `model` through PyTorch's scaled-dot-product attention.

    transformers' WavLM attention calls torch's multi_head_attention_forward with
    need_weights=True: it materialises and head-averages the attention weights, and runs the
    projections on a (T, B, E) layout as batched products. The replacement computes the same
    thing (tests/encoders/test_encoders.py checks outputs and gradients against the stock layers). For the
    frozen encoders it is faster (docs/performance.md); fine-tuning keeps the stock attention,
    since a training step with it measured slower on the CPU and is not yet measured on a GPU.
    Returns the number of layers switched: 0 with a transformers version whose WavLM has no such
    method, and then the stock attention runs.
    """
    import types

    from transformers.models.wavlm.modeling_wavlm import WavLMAttention

    if not hasattr(WavLMAttention, "torch_multi_head_self_attention"):
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, WavLMAttention):
            module.torch_multi_head_self_attention = types.MethodType(_sdpa_self_attention, module)
            n += 1
    return n


def input_conventions(resolved: ResolvedModel, config) -> tuple[bool, bool]:
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


LAST_STATE = "after-final-layer-norm"  # the last hidden state an SSL store holds (see encoders.ssl)


def normalise(audio: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance per utterance over its real samples; padding stays zero."""
    t = audio.shape[1]
    mask = (torch.arange(t, device=audio.device)[None, :] < lengths[:, None]).to(audio.dtype)
    n = lengths.to(audio.dtype).clamp_min(1)[:, None]
    mean = (audio * mask).sum(1, keepdim=True) / n
    var = (((audio - mean) ** 2) * mask).sum(1, keepdim=True) / n
    return (audio - mean) / torch.sqrt(var + 1e-7) * mask


class XVectorEncoder(Encoder):
    """The speaker-verification head's x-vector (WavLMForXVector.embeddings), one vector per utterance."""

    kind = "xvector"
    modality = "audio"
    pooling = XVECTOR  # its own statistics pooling, what a store's settings record

    def __init__(self, resolved: ResolvedModel, runtime: RuntimeOptions, *, max_seconds: float = 15.0):
        from transformers import WavLMForXVector

        # The classifier/objective layers score training speakers only; the x-vector needs the rest.
        model = load_pretrained(WavLMForXVector, resolved,
                                optional=lambda k: k.startswith(("objective.", "classifier.")))
        use_sdpa_attention(model)
        self.max_seconds = max_seconds
        self.do_normalize, self.uses_mask = input_conventions(resolved, model.config)
        self.dim = model.config.xvector_output_dim
        super().__init__(resolved, model, runtime)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return (self.dim,)

    def settings(self) -> dict:
        return {**super().settings(), "max_seconds": self.max_seconds, "sample_rate": SAMPLE_RATE,
                "normalize": self.do_normalize, "attention_mask": self.uses_mask, "pooling": self.pooling}

    def describe(self) -> dict:
        return {**super().describe(), "family": "wavlm-xvector", "hidden_size": self.dim,
                "input": "waveform, normalised" if self.do_normalize else "waveform",
                "attention_mask": self.uses_mask, "last_state": "x-vector head"}

    def prepare(self, waves: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_waves(waves, pin=self.pin)

    @quiet_attention
    def _forward(self, prepared) -> torch.Tensor:
        audio, lengths = prepared
        audio = audio.to(self.device, non_blocking=True)
        lengths = lengths.to(self.device, non_blocking=True)
        if self.do_normalize:
            audio = normalise(audio, lengths)
        mask = None
        if self.uses_mask:
            mask = (torch.arange(audio.shape[1], device=self.device)[None, :] < lengths[:, None]).long()
        return self.model(audio, attention_mask=mask).embeddings
