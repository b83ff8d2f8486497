"""The encoders researchers compare, by short name: hub id, family, hidden states, hidden size, frame
rate, input convention, and whether the checkpoint was trained on emotion labels.

The figures are those of each checkpoint's config.json and preprocessor_config.json on the Hugging
Face hub (docs/encoders.md lists the sources); a short name is only a shortcut to its hub id, and
the encoder reads everything that changes the numbers from the checkpoint itself. `input` is the
family's input as its feature extractor prepares it: "waveform, normalised" (zero mean, unit
variance per utterance), "waveform" (as decoded), "log-mel" (Whisper's 80 or 128 bins), "fbank"
(W2V-BERT's 80 Kaldi filter banks, normalised per bin, stacked in pairs). `attention_mask`: whether
padding is masked (False: the checkpoint was trained on zero-padded batches without a mask, and is
run so, one length at a time).

The challenge forbids encoders pre-trained on emotion: `emotion_trained` is False for every
self-supervised or speech-recognition checkpoint here (none of them saw emotion labels).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RegistryEntry:
    name: str  # the short name
    hub_id: str
    kind: str  # what `detect_kind` gives: an SSL family, "whisper", "xvector" or "text"
    states: int | None  # hidden states, the embedding output included (layers + 1); None: text, x-vector
    hidden_size: int
    frame_rate: float | None  # frames per second of the hidden states; None for text
    input: str
    attention_mask: bool | None
    emotion_trained: bool = False
    note: str = ""


def _ssl(name, hub_id, kind, layers, hidden, input, mask, note=""):
    return RegistryEntry(name, hub_id, kind, layers + 1, hidden, 50.0, input, mask, note=note)


def _whisper(name, layers, hidden, note=""):
    return RegistryEntry(name, f"openai/{name}", "whisper", layers + 1, hidden, 50.0, "log-mel", False, note=note)


NORMALISED, RAW = "waveform, normalised", "waveform"

ENTRIES = (
    _ssl("wavlm-base", "microsoft/wavlm-base", "wavlm", 12, 768, RAW, True),
    _ssl("wavlm-base-plus", "microsoft/wavlm-base-plus", "wavlm", 12, 768, RAW, True),
    _ssl("wavlm-large", "microsoft/wavlm-large", "wavlm", 24, 1024, NORMALISED, True),
    _ssl("hubert-base-ls960", "facebook/hubert-base-ls960", "hubert", 12, 768, NORMALISED, False),
    _ssl("hubert-large-ll60k", "facebook/hubert-large-ll60k", "hubert", 24, 1024, NORMALISED, True),
    _ssl("hubert-xlarge-ll60k", "facebook/hubert-xlarge-ll60k", "hubert", 48, 1280, NORMALISED, True),
    _ssl("wav2vec2-base", "facebook/wav2vec2-base", "wav2vec2", 12, 768, NORMALISED, False),
    _ssl("wav2vec2-large", "facebook/wav2vec2-large", "wav2vec2", 24, 1024, NORMALISED, False),
    _ssl("wav2vec2-large-lv60", "facebook/wav2vec2-large-lv60", "wav2vec2", 24, 1024, NORMALISED, True),
    _ssl("wav2vec2-large-robust", "facebook/wav2vec2-large-robust", "wav2vec2", 24, 1024, NORMALISED, True),
    _ssl("xls-r-300m", "facebook/wav2vec2-xls-r-300m", "wav2vec2", 24, 1024, NORMALISED, True),
    _ssl("xls-r-1b", "facebook/wav2vec2-xls-r-1b", "wav2vec2", 48, 1280, NORMALISED, True),
    _ssl("xls-r-2b", "facebook/wav2vec2-xls-r-2b", "wav2vec2", 48, 1920, NORMALISED, True),
    _ssl("data2vec-audio-base", "facebook/data2vec-audio-base", "data2vec-audio", 12, 768, NORMALISED, True),
    _ssl("data2vec-audio-large", "facebook/data2vec-audio-large", "data2vec-audio", 24, 1024, NORMALISED, True),
    _ssl("w2v-bert-2.0", "facebook/w2v-bert-2.0", "wav2vec2-bert", 24, 1024, "fbank", True),
    _whisper("whisper-tiny", 4, 384),
    _whisper("whisper-base", 6, 512),
    _whisper("whisper-small", 12, 768),
    _whisper("whisper-medium", 24, 1024),
    _whisper("whisper-large", 32, 1280),
    _whisper("whisper-large-v2", 32, 1280),
    _whisper("whisper-large-v3", 32, 1280, note="128 mel bins"),
    _whisper("whisper-large-v3-turbo", 32, 1280, note="128 mel bins; large-v3 with a 4-layer decoder, fine-tuned"),
    RegistryEntry("roberta-large", "FacebookAI/roberta-large", "text", None, 1024, None, "text", True),
    RegistryEntry("wavlm-base-plus-sv", "microsoft/wavlm-base-plus-sv", "xvector", None, 512, None, RAW, True,
                  note="WavLMForXVector: a speaker embedding (trained on speaker labels, not emotion)"),
)
REGISTRY = {e.name: e for e in ENTRIES}
_BY_HUB_ID = {e.hub_id.lower(): e for e in ENTRIES}


def by_hub_id(model_id: str) -> RegistryEntry | None:
    """The entry of a hub id (any case), or None."""
    return _BY_HUB_ID.get(str(model_id).lower())
