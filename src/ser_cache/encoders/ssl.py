"""Self-supervised speech encoders, frozen: WavLM, HuBERT, wav2vec 2.0 (XLS-R), data2vec-audio and
W2V-BERT 2.0, any of their hidden states, pooled per utterance or kept frame by frame.

One class for the five families (`FAMILIES`): they share transformers' interface (a model called
with its input and attention mask returns `hidden_states`, L + 1 of them) and differ in their input:
- WavLM, HuBERT, wav2vec 2.0, data2vec-audio take the 16-kHz waveform, normalised to zero mean
  and unit variance per utterance or not, with an attention mask or without, as the checkpoint's
  Wav2Vec2FeatureExtractor (preprocessor_config.json) says (`input_conventions`);
- W2V-BERT 2.0 takes 80 Kaldi log-mel filter banks normalised per bin, stacked in pairs (160
  values every 20 ms) with their attention mask: exactly what its SeamlessM4TFeatureExtractor
  computes, which `prepare` calls on the host.

The last hidden state is the encoder's output *after* its final layer norm (`LAST_STATE`) for
checkpoints with `do_stable_layer_norm` (the pre-norm Large models: WavLM Large, wav2vec 2.0 Large
LV-60, XLS-R, HuBERT Large): transformers 5 returns `hidden_states[-1]` before that norm and
`last_hidden_state` after it; the authors' WavLM model (trained on transformers 4.46, which returned
the latter) used it. Post-norm models (the Base ones, data2vec-audio) and W2V-BERT have no final norm
outside their layers: their `hidden_states[-1]` is their output.

A checkpoint trained without an attention mask (group-norm CNN: wav2vec 2.0 Base, HuBERT Base) is run
as its family runs it, on zero-padded input without a mask; padding would then enter the CNN's group
norm and the attention, so each batch is run in groups of clips of one length and every row is what
its clip gives alone. data2vec-audio's positional embedding (a stack of convolutions) would carry
padding into a clip's last frames; padded frames are zeroed after each of its layers, which gives
what the clip alone gives. Every row is thus independent of its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

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
from ser_cache.encoders.wavlm import LAST_STATE, input_conventions, normalise, quiet_attention, use_sdpa_attention

WAVEFORM = "waveform"
WAVEFORM_NORMALISED = "waveform, normalised"
FBANK = "fbank"
ENCODER_OUTPUT = "encoder-output"  # describe()'s last state where no final layer norm follows the layers


@dataclass(frozen=True)
class Family:
    """A transformers model type that `SSLEncoder` runs."""

    model_type: str  # config.model_type, and the kind its stores record
    model_class: str  # the transformers class with the encoder alone
    name: str  # for people
    fbank: bool = False  # input: the SeamlessM4T filter banks (W2V-BERT), else the waveform


FAMILIES = {f.model_type: f for f in (
    Family("wavlm", "WavLMModel", "WavLM"),
    Family("hubert", "HubertModel", "HuBERT"),
    Family("wav2vec2", "Wav2Vec2Model", "wav2vec 2.0"),
    Family("data2vec-audio", "Data2VecAudioModel", "data2vec-audio"),
    Family("wav2vec2-bert", "Wav2Vec2BertModel", "W2V-BERT 2.0", fbank=True),
)}
SSL_FAMILIES = tuple(FAMILIES)

FBANK_WINDOW = 400  # Kaldi's 25-ms frame
FBANK_HOP = 160  # 10 ms


def fbank_frames(n_samples, stride: int):
    """Frames W2V-BERT's extractor gives a clip of `n_samples` (ints, arrays or tensors): whole Kaldi
    frames (no centring), then pairs of them (`stride`); a last odd frame is padding-masked."""
    if isinstance(n_samples, torch.Tensor):
        frames = ((n_samples - FBANK_WINDOW).div(FBANK_HOP, rounding_mode="floor") + 1).clamp_min(0)
    else:
        frames = np.maximum((np.asarray(n_samples, dtype=np.int64) - FBANK_WINDOW) // FBANK_HOP + 1, 0)
    return frames // stride


class SSLEncoder(Encoder):
    """Hidden states of a WavLM, HuBERT, wav2vec 2.0, data2vec-audio or W2V-BERT model.

    Pooled (mean, mean+std): one vector per chosen state, (L_sel, D') with a layer axis (every state
    by default, for a learned layer weighting), (D',) for one state. Frames: the chosen states at
    every valid frame, (T_max, D) for one state (the last by default), (T_max, L_sel, D) for several;
    zeros past each clip's `frame_counts`; 50 frames per second.
    """

    modality = "audio"

    def __init__(self, resolved: ResolvedModel, runtime: RuntimeOptions, *, family: str, pooling: str = "mean",
                 layers: str | None = None, max_seconds: float = 15.0):
        import transformers

        if family not in FAMILIES:
            raise EncoderError(f"model '{resolved.name}': {family} is not a self-supervised speech family "
                               f"({', '.join(SSL_FAMILIES)})")
        self.family = FAMILIES[family]
        self.kind = family
        model = load_pretrained(getattr(transformers, self.family.model_class), resolved)
        if family == "wavlm":
            use_sdpa_attention(model)
        self._frame_mask: torch.Tensor | None = None
        if family == "data2vec-audio":
            for layer in model.encoder.pos_conv_embed.layers:
                layer.register_forward_hook(self._zero_padding)
        config = model.config
        self.pooling = pooling
        self.max_seconds = max_seconds
        self.max_samples = int(round(max_seconds * SAMPLE_RATE))
        self.hidden = config.hidden_size
        self.n_states = config.num_hidden_layers + 1
        if layers is None:
            layers = "last" if pooling == FRAMES else "all"
        self.layers = parse_layers(layers, self.n_states)
        self.layer = layer_setting(self.layers, self.n_states)
        self.stable = bool(getattr(config, "do_stable_layer_norm", False))
        if self.family.fbank:
            self.extractor = _fbank_extractor(resolved)
            self.stride = int(self.extractor.stride)
            self.do_normalize, self.uses_mask = True, True
            self.samples_per_frame = FBANK_HOP * self.stride
        else:
            self.extractor = None
            self.do_normalize, self.uses_mask = input_conventions(resolved, config)
            self.samples_per_frame = int(np.prod(config.conv_stride))
        super().__init__(resolved, model, runtime)
        self.t_max = int(self._counts_of(torch.tensor(self.max_samples)))

    @property
    def layer_axis(self) -> bool:
        return has_layer_axis(self.layer)

    @property
    def frame_level(self) -> bool:
        return self.pooling == FRAMES

    @property
    def feature_shape(self) -> tuple[int, ...]:
        axis = (len(self.layers),) if self.layer_axis else ()
        if self.frame_level:
            return (self.t_max, *axis, self.hidden)
        return (*axis, pooled_dim(self.hidden, self.pooling))

    def settings(self) -> dict:
        # The keys and their order are those of the stores built before other families existed:
        # a WavLM store's fingerprint does not change. "last_state": see the module's docstring
        # (stores built before it was followed held the state before that norm, and are refused
        # by their fingerprint).
        # The "last_state" rule is the same for every family (where no final norm follows the
        # layers, the last state is the encoder's output either way). W2V-BERT's input, its filter
        # banks, is recorded as such (a new family: a new key).
        extra = {"input": FBANK} if self.family.fbank else {}
        return {**super().settings(), "max_seconds": self.max_seconds, "sample_rate": SAMPLE_RATE,
                "normalize": self.do_normalize, "attention_mask": self.uses_mask, "pooling": self.pooling,
                "layer": self.layer, "last_state": LAST_STATE, **extra}

    def describe(self) -> dict:
        return {**super().describe(), "family": self.kind, "n_states": self.n_states, "layers": list(self.layers),
                "hidden_size": self.hidden, "frame_rate": SAMPLE_RATE / self.samples_per_frame,
                "input": FBANK if self.family.fbank else (WAVEFORM_NORMALISED if self.do_normalize else WAVEFORM),
                "attention_mask": self.uses_mask,
                "last_state": LAST_STATE if self.stable else ENCODER_OUTPUT}

    def frame_counts(self, n_samples: np.ndarray) -> np.ndarray:
        if not self.frame_level:
            return super().frame_counts(n_samples)
        n = torch.from_numpy(np.minimum(np.asarray(n_samples, dtype=np.int64), self.max_samples))
        return self._counts_of(n).clamp(0, self.t_max).numpy().astype(np.int64)

    def _counts_of(self, n_samples: torch.Tensor) -> torch.Tensor:
        """Frames of clips of `n_samples` samples: the CNN's output length (0 for a clip shorter than
        its first kernel), or the filter-bank pairs."""
        if self.family.fbank:  # a clip shorter than one frame pair is padded to one (prepare)
            return fbank_frames(n_samples.clamp_min(self._shortest), self.stride).long()
        return self.model._get_feat_extract_output_lengths(n_samples).long()

    @property
    def _shortest(self) -> int:
        """W2V-BERT: the samples of one frame pair (two 25-ms frames 10 ms apart)."""
        return FBANK_WINDOW + FBANK_HOP * (self.stride - 1)

    def prepare(self, waves: list[np.ndarray]):
        if self.frame_level:
            # The crop audio.load applies: a clip handed to `encode` directly is cut the same way as
            # one decoded by extract, so both give the same row.
            waves = [w[:self.max_samples] for w in waves]
        if not self.family.fbank:
            return pad_waves(waves, pin=self.pin)
        lengths = torch.tensor([len(w) for w in waves], dtype=torch.long)
        short = self._shortest
        waves = [w if len(w) >= short else np.pad(w, (0, short - len(w))) for w in waves]
        with quiet_loading():
            batch = self.extractor([np.asarray(w, dtype=np.float32) for w in waves], sampling_rate=SAMPLE_RATE,
                                   padding=True, return_attention_mask=True, return_tensors="pt")
        features, mask = batch["input_features"], batch["attention_mask"].long()
        if self.pin:
            features, mask, lengths = features.pin_memory(), mask.pin_memory(), lengths.pin_memory()
        return features, mask, lengths

    @quiet_attention
    def _forward(self, prepared) -> torch.Tensor:
        if self.family.fbank:
            features, mask, _ = prepared
            features = features.to(self.device, non_blocking=True)
            mask = mask.to(self.device, non_blocking=True)
            states = self._states(features, mask)
            counts = mask.sum(1)
        else:
            audio, lengths = prepared
            audio = audio.to(self.device, non_blocking=True)
            lengths = lengths.to(self.device, non_blocking=True)
            if self.do_normalize:
                audio = normalise(audio, lengths)
            if self.uses_mask:
                mask = (torch.arange(audio.shape[1], device=self.device)[None, :] < lengths[:, None]).long()
                states = self._states(audio, mask)
            else:
                states = self._states_by_length(audio, lengths)
            counts = self._counts_of(lengths)
        if self.frame_level:
            counts = counts.clamp(0, self.t_max)
            kept = [keep_frames(h, counts, self.t_max) for h in states]
        else:
            kept = [masked_pool(h, counts, self.pooling) for h in states]
        if not self.layer_axis:
            return kept[0]
        return torch.stack(kept, dim=-2)

    def _zero_padding(self, module, inputs, output: torch.Tensor) -> torch.Tensor:
        """data2vec-audio's positional embedding is a stack of convolutions: past the first, padded
        frames would carry values into a clip's last frames. Zeroing them after every layer gives
        each layer what it sees on the clip alone (zeros past its end), so a row does not depend on
        its batch."""
        if self._frame_mask is None:
            return output
        return output * self._frame_mask[:, None, : output.shape[-1]].to(output.dtype)

    def _states(self, inputs: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
        """The chosen hidden states, in order; the last one after the final layer norm (see above)."""
        if mask is not None and self.kind == "data2vec-audio":
            frames = self._counts_of(mask.sum(1))
            t = int(self._counts_of(torch.tensor(inputs.shape[1])))
            self._frame_mask = torch.arange(t, device=inputs.device)[None, :] < frames[:, None]
        try:
            out = self.model(inputs, attention_mask=mask, output_hidden_states=True)
        finally:
            self._frame_mask = None
        states = out.hidden_states
        last = self.n_states - 1
        picked = []
        for k in self.layers:
            h = states[k]
            if k == last and self.stable:
                # last_hidden_state, unless an adapter follows the encoder (it changes the frame rate).
                adapter = getattr(self.model, "adapter", None)
                h = out.last_hidden_state if adapter is None else self.model.encoder.layer_norm(h)
            picked.append(h)
        return picked

    def _states_by_length(self, audio: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        """`_states` of a model run without an attention mask, one group of equal lengths at a time,
        each cut to its length: a clip's frames never see another clip's padding."""
        if bool((lengths == audio.shape[1]).all()):
            return self._states(audio, None)
        t_frames = int(self._counts_of(torch.tensor(audio.shape[1])))
        out: list[torch.Tensor] | None = None
        for n in torch.unique(lengths).tolist():
            rows = (lengths == n).nonzero().flatten()
            part = self._states(audio[rows, :n], None)
            if out is None:
                out = [h.new_zeros((audio.shape[0], t_frames, h.shape[-1])) for h in part]
            for dst, h in zip(out, part):
                dst[rows, : h.shape[1]] = h
        return out


def _fbank_extractor(resolved: ResolvedModel):
    """The checkpoint's own SeamlessM4TFeatureExtractor (its defaults where it has no preprocessor)."""
    from transformers import SeamlessM4TFeatureExtractor

    try:
        with quiet_loading():
            return SeamlessM4TFeatureExtractor.from_pretrained(resolved.source, local_files_only=resolved.local_only)
    except (OSError, ValueError):
        return SeamlessM4TFeatureExtractor()

