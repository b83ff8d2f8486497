"""Whisper as `transcribe` runs it: a checkpoint found by short name, hub id or folder, and its
generate on batches of 16-kHz clips (log-mel on the device, English, no timestamps, greedy or beam
search), each text on one line. The command around it (which utterances, batches, the resumable
table) is transcribe.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ser_cache.data import audio as audio_lib
from ser_cache.infra.runtime import (
    AUTO_CUDA_BF16,
    TRANSCRIBE_PRECISIONS,
    autocast,
    precision_dtype,
    resolve_device,
    resolve_precision,
)

WHISPER_SECONDS = 30.0  # Whisper's input window: every clip is cut to it, then padded to it
LANGUAGE = "en"  # forced when the model knows the <|en|> token; MSP-Podcast is English
DEFAULT_MAX_NEW_TOKENS = 224  # openai/whisper's sample_len (half the decoder's 448 positions)
PROMPT_TOKENS = 4  # <|startoftranscript|><|en|><|transcribe|><|notimestamps|>


class WhisperTranscriber:
    """Whisper's generate on batches of 16-kHz clips: log-mel on the device, English, no timestamps.

    `load` finds a checkpoint by short name, hub id or directory; the constructor takes a model
    and tokenizer already in memory (the benchmark builds random ones).
    """

    def __init__(self, model, tokenizer, *, model_id: str, revision: str, filters: np.ndarray, beams: int = 1,
                 max_new_tokens: int | None = None, device: str = "auto", precision: str = "auto"):
        import torch

        from ser_cache.encoders import EncoderError

        # A folder without tokenizer files still yields a tokenizer, an empty one that decodes
        # everything to "": refuse it rather than write a table of empty rows.
        needed = max(t for t in (model.config.decoder_start_token_id, model.config.eos_token_id, 0)
                     if isinstance(t, int)) + 1
        if len(tokenizer) < needed:
            raise EncoderError(f"model '{model_id}': its tokenizer has {len(tokenizer)} token(s), fewer than the "
                               f"{needed} the model's special tokens need; transcribe needs Whisper's tokenizer files "
                               "(tokenizer.json, or vocab.json and merges.txt) beside the weights")
        self.device = resolve_device(device, check=False)
        self.precision = resolve_precision(precision, self.device, allowed=TRANSCRIBE_PRECISIONS, auto=AUTO_CUDA_BF16)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.revision = revision
        self.filters = torch.from_numpy(np.asarray(filters, dtype=np.float32)).to(self.device)
        gen = model.generation_config
        # Force English only where the model has the language token; a checkpoint without Whisper's
        # language table (an English-only or home-made one) generates with its own prompt.
        self.language = LANGUAGE if f"<|{LANGUAGE}|>" in (getattr(gen, "lang_to_id", None) or {}) else None
        self.beams = beams
        room = model.config.max_target_positions - PROMPT_TOKENS
        self.max_new_tokens = min(max_new_tokens or DEFAULT_MAX_NEW_TOKENS, room)
        if self.max_new_tokens < 1:
            raise EncoderError(f"model '{model_id}': its decoder has {model.config.max_target_positions} positions, "
                               "no room for text after the prompt")

    @classmethod
    def load(cls, name: str, **options) -> WhisperTranscriber:
        """A checkpoint by short name (whisper-large-v3), hub id (cached) or local directory."""
        from transformers import AutoTokenizer, WhisperForConditionalGeneration

        from ser_cache.encoders import HUB_IDS, EncoderError
        from ser_cache.encoders.base import load_pretrained, quiet_loading, read_json, resolve_model, weights_revision
        from ser_cache.encoders.whisper import mel_filters

        resolved = resolve_model(name, HUB_IDS)
        if resolved.is_local_dir:
            model_type = read_json(Path(resolved.source) / "config.json").get("model_type")
            if model_type != "whisper":
                raise EncoderError(f"model '{name}': transcribe needs a Whisper model; its config.json says "
                                   f"model_type {model_type!r}")
        model = load_pretrained(WhisperForConditionalGeneration, resolved)
        try:
            with quiet_loading():
                tokenizer = AutoTokenizer.from_pretrained(resolved.source, local_files_only=resolved.local_only)
        except (OSError, ValueError, TypeError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EncoderError(f"model '{name}': no usable tokenizer with the weights ({reason}); transcribe "
                               "needs Whisper's tokenizer files (tokenizer.json, or vocab.json and "
                               "merges.txt)") from None
        filters = mel_filters(resolved.source, model.config.num_mel_bins, resolved.local_only)
        return cls(model, tokenizer, model_id=resolved.model_id, revision=weights_revision(model, resolved),
                   filters=filters, **options)

    def settings(self, max_seconds: float) -> dict:
        return {"model_id": self.model_id, "revision": self.revision, "language": self.language, "beams": self.beams,
                "max_new_tokens": self.max_new_tokens, "max_seconds": max_seconds, "precision": self.precision,
                "timestamps": False}

    def features(self, waves: list[np.ndarray]):
        """(B, n_mels, 3000) log-mel of the clips, each padded with zeros to 30 s, as Whisper was trained."""
        from ser_cache.encoders.base import pad_waves
        from ser_cache.encoders.whisper import log_mel

        x, _ = pad_waves(waves, min_length=int(WHISPER_SECONDS * audio_lib.SAMPLE_RATE))
        return log_mel(x.to(self.device), self.filters)

    def transcribe(self, waves: list[np.ndarray]) -> list[str]:
        import torch

        from ser_cache.encoders.base import quiet_loading

        kwargs = {"num_beams": self.beams, "do_sample": False, "max_new_tokens": self.max_new_tokens,
                  "return_timestamps": False}
        if self.language is not None:
            kwargs["language"] = self.language
            if "transcribe" in (getattr(self.model.generation_config, "task_to_id", None) or {}):
                kwargs["task"] = "transcribe"
        dtype = precision_dtype(self.precision)
        with torch.inference_mode():
            feats = self.features(waves)  # in float32, outside autocast: the mel projection is a matmul
            with autocast(self.device, dtype), quiet_loading():  # quiet: generate warns about options it does not use
                out = self.model.generate(feats, **kwargs)
        ids = out.sequences if hasattr(out, "sequences") else out
        texts = self.tokenizer.batch_decode(ids.cpu(), skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]  # one line per row: the journal relies on it
