"""The fine-tuned Whisper system: Whisper's encoder as the encoder component of an OnlineModel.

    waveform → log-mel (the 15-s window, or trimmed) → Whisper encoder → last state (after the final
             layer norm) or a softmax weighting of every state → point-wise Conv1d stack
             → mean over the valid frames → [cached features] → MultitaskHeads

This is the challenge winner's dimensional Whisper model (vox-profile-release, whisper_emotion_dim.py):
WhisperModel.from_pretrained(..., max_source_positions=750), i.e. the 15-s window, its
`hidden_states[-1]`, `model_seq` (conv 1×1, ReLU, dropout 0.1, conv, ReLU, dropout, conv), a mean over
`(length // 160 - 1) // 2 + 1` frames, then sigmoid heads. The window is run as the frozen encoder
runs it (encoders/whisper.py): the positional table cut to its first 750 rows, which is what a model
built for 750 positions holds. `--window trimmed` runs only the real frames, padding masked out.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ser_cache.data import audio as audio_lib
from ser_cache.system.online import OnlineModel

SYSTEM = "finetuned-whisper"  # config.json "system" of a fine-tuned Whisper run
AUDIO_INPUT = "finetuned-whisper"  # the heads' input name of the pooled Whisper vector
STATES = ("last", "all")  # the last state (the authors'), or a learned weighting of every state


def _whisper_constants():
    from ser_cache.encoders import whisper as w

    return w


class WhisperEmotionModel(OnlineModel):
    """Whisper's encoder + [layer weighting] + point-wise convolutions + masked mean + the heads."""

    encoder_attr = "whisper"
    input_name = AUDIO_INPUT

    def __init__(self, encoder: nn.Module, heads: nn.Module, filters: Tensor, *, window: str = "window",
                 states: str = "last", max_seconds: float = 15.0, conv_dim: int = 256, conv_layers: int = 3,
                 conv_dropout: float = 0.1, seed: int = 0):
        super().__init__()
        from ser_cache.system.heads import LayerWeighting
        from ser_cache.system.model import ConvPool

        w = _whisper_constants()
        if window not in w.WINDOWS:
            raise ValueError(f"window must be one of {w.WINDOWS}, got {window!r}")
        if states not in STATES:
            raise ValueError(f"states must be one of {STATES}, got {states!r}")
        self.whisper = encoder
        self.window, self.states, self.max_seconds = window, states, float(max_seconds)
        self.register_buffer("mel_filters", filters.float().clone(), persistent=True)
        # No LayerDrop here (Whisper's encoder_layerdrop is 0); the generator keeps the checkpoint's shape.
        self.layerdrop = 0.0
        self.layerdrop_generator = torch.Generator().manual_seed(int(seed))
        cfg = encoder.config
        self.layer_weighting = LayerWeighting(cfg.encoder_layers + 1) if states == "all" else None
        self.pool = ConvPool(cfg.d_model, dim=conv_dim, layers=conv_layers, dropout=conv_dropout)
        self.heads = heads

    def positions(self, lengths: Tensor) -> Tensor:
        """Valid encoder frames per clip, counted as the authors' code counts them."""
        w = _whisper_constants()
        if self.window == "window":
            lengths = lengths.clamp(max=w.WINDOW_SAMPLES)
        return w.frame_positions(lengths)

    def _input(self, audio: Tensor, lengths: Tensor) -> Tensor:
        """The window: every clip padded or cut to 15 s. Trimmed: the longest clip plus N_FFT of zeros
        (the STFT reflects the last samples; a valid frame must see only zeros), to whole positions."""
        w = _whisper_constants()
        if self.window == "window":
            target = w.WINDOW_SAMPLES
        else:
            need = int(lengths.max()) + w.N_FFT
            target = math.ceil(need / w.POSITION_SAMPLES) * w.POSITION_SAMPLES
        audio = audio[:, :min(audio.shape[1], int(lengths.max()), target)]
        valid = torch.arange(audio.shape[1], device=audio.device)[None, :] < lengths[:, None]
        audio = audio * valid  # the loader's padding is zeros already; this makes it so for any caller
        return F.pad(audio, (0, target - audio.shape[1]))

    def hidden_states(self, audio: Tensor, lengths: Tensor) -> list[Tensor]:
        """The encoder's states: [last] after the final layer norm, or every layer's input and that last."""
        w = _whisper_constants()
        enc = self.whisper
        with torch.autocast(device_type=audio.device.type, enabled=False):
            mel = w.log_mel(self._input(audio, lengths), self.mel_filters)
        n_pos = mel.shape[-1] // 2
        mask = None
        if self.window == "trimmed":
            keep = torch.arange(n_pos, device=mel.device)[None, :] < self.positions(lengths)[:, None]
            mask = keep[:, None, None, :]
        h = F.gelu(enc.conv1(mel.to(enc.conv1.weight.dtype)))
        h = F.gelu(enc.conv2(h)).permute(0, 2, 1)
        h = h + enc.embed_positions.weight[:n_pos]
        h = F.dropout(h, p=float(enc.config.dropout), training=self.training)
        states = []
        for layer in enc.layers:
            if self.states == "all":
                states.append(h)
            h = layer(h, mask)
        states.append(enc.layer_norm(h))
        return states

    def pooled(self, audio: Tensor, lengths: Tensor) -> Tensor:
        """(B, T) waveforms → (B, conv_dim), the mean over each clip's valid frames."""
        with self.encoder_context():
            states = self.hidden_states(audio, lengths)
        if self.layer_weighting is None:
            mixed = states[-1]
        else:
            mixed = sum(wt.to(h.dtype) * h for wt, h in zip(self.layer_weighting.weights, states))
        frames = self.positions(lengths).clamp(max=mixed.shape[1]).long()
        return self.pool(mixed, frames)


# --------------------------------------------------------------------------- loading


def load_whisper(name: str):
    """(WhisperEncoder, ResolvedModel, mel filters) for a short name, hub id or local directory."""
    from transformers import WhisperForAudioClassification

    from ser_cache.encoders import HUB_IDS, read_model_config
    from ser_cache.encoders.base import EncoderError, load_pretrained, resolve_model

    resolved = resolve_model(name, HUB_IDS)
    try:
        config = read_model_config(name, allow_network=False)
    except EncoderError:
        config = None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if isinstance(model_type, str) and model_type and model_type != "whisper":
        raise EncoderError(f"model '{name}' holds a {model_type} model; `finetune whisper` fine-tunes a Whisper "
                           "model: give --model whisper-large-v3 or a directory holding a Whisper model")
    model = load_pretrained(WhisperForAudioClassification, resolved, required_prefixes=("encoder.",),
                            attn_implementation="sdpa")
    encoder = model.encoder
    filters = _whisper_constants().mel_filters(resolved.source, encoder.config.num_mel_bins, resolved.local_only)
    return encoder, resolved, torch.from_numpy(filters)


def encoder_from_config(config: dict) -> nn.Module:
    """An (untrained) WhisperEncoder of a recorded configuration."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    cfg = dict(config)
    for key in ("architectures", "model_type", "transformers_version"):
        cfg.pop(key, None)
    wc = WhisperConfig(**cfg)
    wc._attn_implementation = "sdpa"
    return WhisperEncoder(wc)


def check_window(window: str, max_seconds: float, encoder: nn.Module) -> str | None:
    """The one problem with the window and the encoder's positions, or None."""
    w = _whisper_constants()
    if window not in w.WINDOWS:
        return f"--window {window}: expected one of {', '.join(w.WINDOWS)}"
    if window == "window" and max_seconds > w.WINDOW_SECONDS:
        return (f"--max-seconds {max_seconds}: the Whisper window is {w.WINDOW_SECONDS} s; use --window trimmed "
                "for longer inputs")
    need = (w.WINDOW_POSITIONS if window == "window"
            else int(math.ceil(max_seconds * audio_lib.SAMPLE_RATE / w.POSITION_SAMPLES)) + 2)
    have = int(encoder.config.max_source_positions)
    if need > have:
        return f"the model has {have} positions; {need} are needed for --max-seconds {max_seconds}"
    return None


def architecture(model: WhisperEmotionModel, resolved, *, revision: str) -> dict:
    """config.json's "whisper" entry: everything needed to rebuild the model without the hub."""
    pool = model.pool
    return {
        "model_id": resolved.model_id,
        "revision": revision,
        "config": model.whisper.config.to_dict(),
        "window": model.window,
        "states": model.states,
        "conv_dim": pool.dim,
        "conv_layers": pool.layers,
        "conv_dropout": pool.dropout,
        "max_seconds": model.max_seconds,
        "sample_rate": audio_lib.SAMPLE_RATE,
        "input": AUDIO_INPUT,
    }


def build_from_config(config: dict, encoder: nn.Module | None = None) -> WhisperEmotionModel:
    """The (untrained) model a run's config.json describes; `encoder`: the pretrained one a run of
    adapters and heads stands on. The mel filters are a buffer of the run's weights."""
    from ser_cache.system.heads import MultitaskHeads

    arch = config["whisper"]
    encoder = encoder if encoder is not None else encoder_from_config(arch["config"])
    n_mels = int(encoder.config.num_mel_bins)
    filters = torch.zeros(1 + _whisper_constants().N_FFT // 2, n_mels)  # replaced by the run's own
    heads = MultitaskHeads.from_config(config["heads"])
    return WhisperEmotionModel(encoder, heads, filters, window=arch["window"], states=arch["states"],
                               max_seconds=float(arch["max_seconds"]), conv_dim=arch["conv_dim"],
                               conv_layers=arch["conv_layers"], conv_dropout=arch["conv_dropout"])
