"""Whisper's encoder, frozen: log-mel on the device, last hidden layer, pooled over the real frames.

Two windows:
- "window" (default, as the challenge winner): every input padded or cut to WINDOW_SECONDS. The
  stock encoder insists on its native 30 s (1,500 positions); here it runs on 15 s by keeping the
  first 750 rows of its positional table. Whisper's positions are fixed sinusoids indexed from 0,
  so the first 750 rows are exactly what a model built for 750 positions would hold.
- "trimmed": only the real frames, in length-bucketed batches, padding masked out of attention.
  About 3× less compute on 5.5-s clips; its features drift a little from the window's because
  frames no longer attend to the padding (docs/performance.md reports by how much).

Pooling "frames" keeps the last layer (after the final layer norm) at every valid position instead
of pooling it: (T_max, D) per clip, zeros past its `frame_counts`, T_max = 750 in the window and
the positions of --max-seconds when trimmed.

`layers` (--layers) keeps other hidden states, numbered as transformers numbers them: 0 the input of
the first layer (convolutions plus positions), k the output of layer k, and the last one the
encoder's output after its final layer norm (`layer_norm`), which is also what transformers 5's
WhisperEncoder returns as hidden_states[-1] (it ties the last hidden state to last_hidden_state).
One state gives the shapes above; several give a layer axis: (L_sel, D') pooled, (T_max, L_sel, D)
frames. The encoder runs once whatever the choice.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ser_cache.data.audio import SAMPLE_RATE
from ser_cache.encoders.base import (
    FRAMES,
    Encoder,
    EncoderError,
    ResolvedModel,
    RuntimeOptions,
    keep_frames,
    load_pretrained,
    masked_pool,
    pad_waves,
    pooled_dim,
    quiet_loading,
)
from ser_cache.encoders.layers import has_layer_axis, layer_setting, parse_layers

N_FFT = 400  # 25 ms window at 16 kHz
HOP_LENGTH = 160  # 10 ms: 100 mel frames per second
POSITION_SAMPLES = 2 * HOP_LENGTH  # conv2 has stride 2: one encoder position per 20 ms
WINDOW_SECONDS = 15  # the challenge winner's window
WINDOW_SAMPLES = WINDOW_SECONDS * SAMPLE_RATE
WINDOW_FRAMES = WINDOW_SAMPLES // HOP_LENGTH  # 1,500 mel frames
WINDOW_POSITIONS = WINDOW_FRAMES // 2  # 750 encoder positions
WINDOWS = ("window", "trimmed")
LAST_STATE = "after-final-layer-norm"  # the encoder's output, as hidden_states[-1] in transformers 5


def mel_filters(source: str, n_mels: int, local_only: bool) -> np.ndarray:
    """The model's mel filter bank (n_freqs, n_mels), from its preprocessor config when there is one."""
    from transformers import WhisperFeatureExtractor

    try:
        with quiet_loading():
            fe = WhisperFeatureExtractor.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError):
        fe = WhisperFeatureExtractor(feature_size=n_mels)
    if fe.feature_size != n_mels:
        raise EncoderError(f"{source}: preprocessor has {fe.feature_size} mel bins, the model expects {n_mels}")
    return np.asarray(fe.mel_filters, dtype=np.float32)


def log_mel(audio: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """Whisper's log-mel spectrogram of (B, T) audio → (B, n_mels, T // HOP_LENGTH), in float32.

    Same recipe as the reference implementation: power STFT, mel projection, log10 floored at
    the utterance's maximum minus 8, then scaled by (x + 4) / 4.
    """
    window = torch.hann_window(N_FFT, device=audio.device)
    stft = torch.stft(audio.float(), N_FFT, HOP_LENGTH, window=window, return_complex=True)
    power = (stft[..., :-1].abs() ** 2).contiguous()
    mel = filters.T @ power
    log_spec = torch.clamp(mel, min=1e-10).log10()
    peak = log_spec.amax(dim=(1, 2), keepdim=True)
    log_spec = torch.maximum(log_spec, peak - 8.0)
    return (log_spec + 4.0) / 4.0


def valid_positions(n_samples: torch.Tensor) -> torch.Tensor:
    """Encoder positions that see real audio: one per 20 ms, rounded up (what pooled stores pool over)."""
    return (n_samples + POSITION_SAMPLES - 1) // POSITION_SAMPLES


def frame_positions(n_samples):
    """Valid frames of a frame store, counted as the challenge winner's code counts them: whole
    mel frames (n // HOP_LENGTH), then conv2's output length (kernel 3, padding 1, stride 2).
    For ints, numpy arrays and tensors alike; 0 for a clip shorter than one mel frame.

    It can be one less than `valid_positions`, which counts a last partial 20 ms; pooled stores
    keep that rule, so that their fingerprints and numbers do not change.
    """
    return (n_samples // HOP_LENGTH - 1) // 2 + 1


class WhisperAudioEncoder(Encoder):
    kind = "whisper"
    modality = "audio"

    def __init__(self, resolved: ResolvedModel, runtime: RuntimeOptions, *, window: str = "window",
                 pooling: str = "mean", max_seconds: float = WINDOW_SECONDS, layers: str | None = None):
        if window not in WINDOWS:
            raise EncoderError(f"--window {window}: expected one of {', '.join(WINDOWS)}")
        if window == "window" and max_seconds > WINDOW_SECONDS:
            raise EncoderError(
                f"--max-seconds {max_seconds}: the Whisper window is {WINDOW_SECONDS} s; use --window trimmed for "
                "longer inputs"
            )
        from transformers import WhisperForAudioClassification

        model = load_pretrained(WhisperForAudioClassification, resolved, required_prefixes=("encoder.",),
                                attn_implementation="sdpa")
        encoder = model.encoder
        self.window = window
        self.pooling = pooling
        self.max_seconds = max_seconds
        self.max_positions = encoder.config.max_source_positions
        need = WINDOW_POSITIONS if window == "window" else int(math.ceil(max_seconds * SAMPLE_RATE / POSITION_SAMPLES))
        if need > self.max_positions:
            raise EncoderError(f"model '{resolved.name}' has {self.max_positions} positions; {need} are needed")
        super().__init__(resolved, encoder, runtime)
        self.filters = torch.from_numpy(mel_filters(resolved.source, encoder.config.num_mel_bins,
                                                    resolved.local_only)).to(self.device)
        self.hidden = encoder.config.d_model
        self.attn_impl = encoder.config._attn_implementation
        self.t_max = need  # the most positions a (cropped) clip can fill
        self.n_states = len(encoder.layers) + 1
        self.layers = parse_layers("last" if layers is None else layers, self.n_states)
        self.layer = layer_setting(self.layers, self.n_states)

    @property
    def frame_level(self) -> bool:
        return self.pooling == FRAMES

    @property
    def layer_axis(self) -> bool:
        return has_layer_axis(self.layer)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        axis = (len(self.layers),) if self.layer_axis else ()
        if self.frame_level:
            return (self.t_max, *axis, self.hidden)
        return (*axis, pooled_dim(self.hidden, self.pooling))

    def frame_counts(self, n_samples: np.ndarray) -> np.ndarray:
        if not self.frame_level:
            return super().frame_counts(n_samples)
        n = np.asarray(n_samples, dtype=np.int64)
        if self.window == "window":
            n = np.minimum(n, WINDOW_SAMPLES)  # prepare() cuts every clip to the window
        return np.minimum(frame_positions(n), self.t_max)

    def _positions(self, lengths: torch.Tensor, n_pos: int) -> torch.Tensor:
        """Positions of each row that count: kept frames (frame stores), or the pooled ones."""
        if self.frame_level:
            return frame_positions(lengths).clamp(max=min(n_pos, self.t_max))
        return valid_positions(lengths).clamp_max(n_pos)

    def settings(self) -> dict:
        return {**super().settings(), "window": self.window, "pooling": self.pooling, "max_seconds": self.max_seconds,
                "sample_rate": SAMPLE_RATE, "layer": self.layer}

    def describe(self) -> dict:
        return {**super().describe(), "family": "whisper", "n_states": self.n_states, "layers": list(self.layers),
                "hidden_size": self.hidden, "frame_rate": SAMPLE_RATE / POSITION_SAMPLES, "input": "log-mel",
                "attention_mask": self.window == "trimmed", "last_state": LAST_STATE}

    def cost(self, seconds: float) -> float:
        return float(WINDOW_SECONDS) if self.window == "window" else seconds

    def prepare(self, waves: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.window == "window":
            return pad_waves([w[:WINDOW_SAMPLES] for w in waves], min_length=WINDOW_SAMPLES, pin=self.pin)
        # At least N_FFT of zeros after the longest input: the STFT reflects the array's last
        # samples at its end, and a valid frame must only ever see zeros there, whatever the
        # batch. Otherwise an utterance's last frames would depend on its neighbours' lengths.
        longest = max(len(w) for w in waves)
        return pad_waves(waves, multiple=POSITION_SAMPLES, min_length=longest + N_FFT, pin=self.pin)

    def _forward(self, prepared: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        audio, lengths = prepared
        audio = audio.to(self.device, non_blocking=True)
        lengths = lengths.to(self.device, non_blocking=True)
        with torch.autocast(device_type=self.device.type, enabled=False):
            mel = log_mel(audio, self.filters)
        n_pos = mel.shape[-1] // 2
        positions = self._positions(lengths, n_pos)
        mask = None
        if self.window == "trimmed":
            keep = torch.arange(n_pos, device=self.device)[None, :] < positions[:, None]
            mask = keep[:, None, None, :]
            if self.attn_impl == "eager":
                mask = torch.zeros(mask.shape, device=self.device).masked_fill(~mask, torch.finfo(torch.float32).min)
        states = self._encode_mel(mel, n_pos, mask)
        if self.frame_level:
            kept = [keep_frames(h, positions, self.t_max) for h in states]
        else:
            kept = [masked_pool(h, positions, self.pooling) for h in states]
        return torch.stack(kept, dim=-2) if self.layer_axis else kept[0]

    def _encode_mel(self, mel: torch.Tensor, n_pos: int, mask: torch.Tensor | None) -> list[torch.Tensor]:
        """The encoder's own layers, run on any number of positions up to its table's length: the
        chosen hidden states (`self.layers`), in order, the last after the final layer norm."""
        enc = self.model
        wanted = set(self.layers)
        last = len(enc.layers)
        states = []
        h = F.gelu(enc.conv1(mel.to(enc.conv1.weight.dtype)))
        h = F.gelu(enc.conv2(h)).permute(0, 2, 1)
        h = h + enc.embed_positions.weight[:n_pos]
        for k, layer in enumerate(enc.layers):
            if k in wanted:
                states.append(h)
            h = layer(h, mask)
        if last in wanted:
            states.append(enc.layer_norm(h))
        return states
