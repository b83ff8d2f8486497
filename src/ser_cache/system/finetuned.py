"""The fine-tuned WavLM system: the encoder, what sits between it and the heads, loading and rebuilding it.

    waveform → WavLM (every hidden state) → softmax layer weighting → point-wise Conv1d stack
             → mean over the valid frames → [concatenated with cached features] → MultitaskHeads

The heads are stage two's `heads.MultitaskHeads`, unchanged: the pooled audio vector is just one
more named input (AUDIO_INPUT) beside any cached store, so the same losses, metrics and run format
apply. Input conventions (per-utterance normalisation, attention mask) are those of the frozen
WavLM encoder (encoders/wavlm.py), read from the checkpoint's preprocessor config.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ser_cache.data import audio as audio_lib
from ser_cache.system.online import OnlineModel, freeze_unused

__all__ = ["SYSTEM", "AUDIO_INPUT", "WavLMEmotionModel", "freeze_unused", "load_wavlm", "architecture",
           "build_from_config", "model_state", "encoder_states"]

SYSTEM = "finetuned-wavlm"  # config.json "system" of a fine-tuned run
AUDIO_INPUT = "finetuned-wavlm"  # the heads' input name of the pooled WavLM vector
MIN_SECONDS = 0.05  # shorter than one or two WavLM frames: nothing to pool (as in extract)


LAST_STATE = "after-final-layer-norm"  # as transformers 4.x returned it; the authors trained on 4.46
LEGACY_LAST_STATE = "before-final-layer-norm"  # runs written before that was followed (transformers 5's)


def encoder_states(wavlm: nn.Module, audio: Tensor, mask: Tensor | None, *, layerdrop: float = 0.0,
                   generator: torch.Generator | None = None, last_state: str = LAST_STATE) -> list[Tensor]:
    """WavLMModel's forward, returning all L + 1 hidden states as transformers 4.46 did.

    transformers 5 computes the same layers but (a) returns the last state before the encoder's
    final layer norm, and (b) with LayerDrop on, leaves a skipped layer's state out of the list,
    so the weighted sum would see 24 states one step and 25 the next. Here, as in 4.46: state i is
    the input of layer i, a skipped layer passes its input on (so its state repeats), and the last
    state comes after the final layer norm (models with do_stable_layer_norm, WavLM Large).

    LayerDrop (training mode only, never layer 0, as transformers) draws from `generator`: under
    torchrun every rank holds the same generator, so all ranks skip the same layers and the
    global batch takes the very step a single process would: a layer skipped on every rank gets
    no gradient, which DDP (find_unused_parameters) leaves as None, as one process does, so AdamW
    leaves it alone in both.
    """
    cfg = wavlm.config
    extract = wavlm.feature_extractor(audio).transpose(1, 2)
    frame_mask = None
    if mask is not None:
        frame_mask = wavlm._get_feature_vector_attention_mask(extract.shape[1], mask, add_adapter=False)
    hidden, _ = wavlm.feature_projection(extract)
    hidden = wavlm._mask_hidden_states(hidden, attention_mask=frame_mask)  # spec-augment, training only
    enc = wavlm.encoder
    if frame_mask is not None:
        hidden = hidden.masked_fill(~frame_mask.bool()[..., None], 0.0)
    hidden = hidden + enc.pos_conv_embed(hidden)
    stable = bool(getattr(cfg, "do_stable_layer_norm", False))
    if not stable:
        hidden = enc.layer_norm(hidden)
    hidden = enc.dropout(hidden)
    states: list[Tensor] = []
    bias = None
    for i, layer in enumerate(enc.layers):
        states.append(hidden)
        if wavlm.training and i > 0 and layerdrop > 0 and float(torch.rand((), generator=generator)) < layerdrop:
            continue
        hidden, bias = layer(hidden, attention_mask=frame_mask, position_bias=bias, index=i)
    if stable and last_state == LAST_STATE:
        hidden = enc.layer_norm(hidden)
    states.append(hidden)
    return states


class WavLMEmotionModel(OnlineModel):
    """WavLM + layer weighting + point-wise convolutions + masked mean pooling + the multitask heads.

    `forward(audio, lengths, cached)` takes right-padded raw 16 kHz waveforms (B, T), their real
    lengths in samples, and the cached inputs {name: (B, *shape)}; it returns the heads' outputs.
    The convolutions and pooling are model.ConvPool, the very module of stage two's frame inputs.
    `layerdrop`: the probability of skipping each transformer layer (but the first) in training;
    the challenge winner trained with the checkpoint's own value (0.1 for WavLM Large).
    """

    encoder_attr = "wavlm"
    input_name = AUDIO_INPUT

    def __init__(self, wavlm: nn.Module, heads: nn.Module, *, conv_dim: int = 256, conv_layers: int = 3,
                 conv_dropout: float = 0.1, normalize: bool = True, attention_mask: bool = True,
                 layerdrop: float = 0.0, seed: int = 0, last_state: str = LAST_STATE,
                 conv_final_activation: bool = False):
        super().__init__()
        from ser_cache.system.heads import LayerWeighting
        from ser_cache.system.model import ConvPool

        self.wavlm = wavlm
        self.normalize = normalize
        self.attention_mask = attention_mask
        self.layerdrop = float(layerdrop)
        self.last_state = last_state
        # One generator for the LayerDrop draws, seeded alike on every rank (see encoder_states).
        self.layerdrop_generator = torch.Generator().manual_seed(int(seed))
        n_states = wavlm.config.num_hidden_layers + 1  # the CNN projection and every transformer layer
        self.layer_weighting = LayerWeighting(n_states)
        self.pool = ConvPool(wavlm.config.hidden_size, dim=conv_dim, layers=conv_layers, dropout=conv_dropout,
                             final_activation=conv_final_activation)
        self.heads = heads

    def pooled(self, audio: Tensor, lengths: Tensor) -> Tensor:
        """(B, T) waveforms → (B, conv_dim), the mean over each utterance's valid frames."""
        from ser_cache.encoders.wavlm import normalise

        if self.normalize:
            audio = normalise(audio, lengths)
        mask = None
        if self.attention_mask:
            mask = (torch.arange(audio.shape[1], device=audio.device)[None, :] < lengths[:, None]).long()
        with warnings.catch_warnings():
            # WavLM mixes a float position bias with a boolean padding mask inside torch's attention,
            # which warns on every call; the result is correct (see encoders/wavlm.py).
            warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask")
            with self.encoder_context():
                states = encoder_states(self.wavlm, audio, mask, layerdrop=self.layerdrop,
                                        generator=self.layerdrop_generator, last_state=self.last_state)
        weights = self.layer_weighting.weights
        # A running weighted sum rather than LayerWeighting(stack(states)): stacking 25 states of
        # (B, T, 1024) would hold one more copy of all of them for the backward pass.
        mixed = sum(w.to(h.dtype) * h for w, h in zip(weights, states))
        frames = self.wavlm._get_feat_extract_output_lengths(lengths).long()
        return self.pool(mixed, frames)


# --------------------------------------------------------------------------- loading


def load_wavlm(name: str):
    """(WavLMModel, ResolvedModel, normalise?, attention mask?) for a short name, hub id or local directory.

    The model keeps its checkpoint's configuration, LayerDrop included (0.1 for microsoft/wavlm-large);
    WavLMEmotionModel applies it (encoder_states), so that all hidden states stay in the weighting.
    """
    from transformers import WavLMModel

    from ser_cache.encoders import HUB_IDS
    from ser_cache.encoders.base import load_pretrained, resolve_model
    from ser_cache.encoders.wavlm import input_conventions

    resolved = resolve_model(name, HUB_IDS)
    _refuse_other_models(name)
    model = load_pretrained(WavLMModel, resolved)
    if getattr(model.config, "model_type", "wavlm") != "wavlm":
        from ser_cache.encoders.base import EncoderError

        raise EncoderError(f"model '{name}' is a {model.config.model_type} model; `finetune wavlm` needs a WavLM")
    normalize, uses_mask = input_conventions(resolved, model.config)
    return model, resolved, normalize, uses_mask


def _refuse_other_models(name: str) -> None:
    """Before loading: a Whisper (or any non-WavLM) model loaded as WavLM would fail as "lacks N weights"."""
    from ser_cache.encoders import read_model_config
    from ser_cache.encoders.base import EncoderError

    try:
        config = read_model_config(name, allow_network=False)  # None: not on disk yet; the loader reports it
    except EncoderError:
        return
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if isinstance(model_type, str) and model_type and model_type != "wavlm":
        listed = config.get("architectures")
        architectures = ", ".join(map(str, listed)) if isinstance(listed, list) and listed else model_type
        raise EncoderError(f"model '{name}' holds a {model_type} model ({architectures}); `finetune wavlm` "
                           "fine-tunes a WavLM model: give --model wavlm-large or a directory holding a WavLM model")


def architecture(model: WavLMEmotionModel, resolved, *, max_seconds: float, revision: str) -> dict:
    """config.json's "wavlm" entry: everything needed to rebuild the model without the hub."""
    pool = model.pool
    return {
        "model_id": resolved.model_id,
        "revision": revision,
        "config": model.wavlm.config.to_dict(),
        "normalize": model.normalize,
        "attention_mask": model.attention_mask,
        "conv_dim": pool.dim,
        "conv_layers": pool.layers,
        "conv_dropout": pool.dropout,
        "conv_final_activation": pool.final_activation,
        "last_state": model.last_state,
        "layerdrop": model.layerdrop,
        "max_seconds": max_seconds,
        "sample_rate": audio_lib.SAMPLE_RATE,
        "input": AUDIO_INPUT,
    }


def build_from_config(config: dict, encoder: nn.Module | None = None) -> WavLMEmotionModel:
    """The (untrained) model a run's config.json describes; then load model.safetensors into it.

    Runs written before ser-cache built the authors' architecture lack "last_state" and
    "conv_final_activation": they are rebuilt as they were trained (last state before the final
    layer norm, ReLU and dropout after the last convolution), never silently as the new model.
    `encoder`: the pretrained WavLM a run of adapters and heads only stands on (runs.finetuned_run).
    """
    from transformers import WavLMConfig, WavLMModel

    from ser_cache.system.heads import MultitaskHeads

    arch = config["wavlm"]
    if encoder is None:
        wavlm_cfg = dict(arch["config"])
        for key in ("architectures", "model_type", "transformers_version"):
            wavlm_cfg.pop(key, None)
        encoder = WavLMModel(WavLMConfig(**wavlm_cfg))
    wavlm = encoder
    heads = MultitaskHeads.from_config(config["heads"])
    return WavLMEmotionModel(wavlm, heads, conv_dim=arch["conv_dim"], conv_layers=arch["conv_layers"],
                             conv_dropout=arch.get("conv_dropout", arch.get("dropout", 0.1)),
                             normalize=arch["normalize"], attention_mask=arch["attention_mask"],
                             layerdrop=float(arch.get("layerdrop", 0.0)),
                             last_state=arch.get("last_state", LEGACY_LAST_STATE),
                             conv_final_activation=bool(arch.get("conv_final_activation", True)))


def model_state(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A fine-tuned run's weights as WavLMEmotionModel keys: without the AAM's, and the convolutions of
    runs written before model.ConvPool ("convs.*") under their present name ("pool.convs.*")."""
    return {("pool." + k if k.startswith("convs.") else k): v for k, v in tensors.items() if not k.startswith("aam.")}


# --------------------------------------------------------------------------- audio and batches


# --------------------------------------------------------------------------- prediction


