"""A text encoder on transcripts (RoBERTa-large, or any AutoModel text encoder): masked mean of the last layer."""

from __future__ import annotations

import torch

from ser_cache.encoders.base import (
    Encoder,
    ResolvedModel,
    RuntimeOptions,
    load_error,
    load_pretrained,
    masked_pool,
    pooled_dim,
    quiet_loading,
)

MAX_TOKENS = 512  # RoBERTa's and BERT's position table; longer transcripts are truncated


class TextEncoder(Encoder):
    kind = "text"
    modality = "text"

    def __init__(self, resolved: ResolvedModel, runtime: RuntimeOptions, *, pooling: str = "mean"):
        from transformers import AutoModel, AutoTokenizer

        try:
            with quiet_loading():
                self.tokenizer = AutoTokenizer.from_pretrained(resolved.source, local_files_only=resolved.local_only)
        except (OSError, ValueError) as exc:
            raise load_error(resolved, exc) from None
        # A pooler that the checkpoint lacks is never used: the pooling is ours.
        model = load_pretrained(AutoModel, resolved, optional=lambda k: "pooler" in k)
        self.tokenizer.padding_side = "right"  # masked_pool counts the first `length` tokens
        self.pooling = pooling
        self.hidden = model.config.hidden_size
        limit = getattr(self.tokenizer, "model_max_length", MAX_TOKENS) or MAX_TOKENS
        self.max_tokens = int(min(limit, MAX_TOKENS, getattr(model.config, "max_position_embeddings", MAX_TOKENS)))
        super().__init__(resolved, model, runtime)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return (pooled_dim(self.hidden, self.pooling),)

    def settings(self) -> dict:
        return {**super().settings(), "pooling": self.pooling, "layer": "last", "max_tokens": self.max_tokens}

    def describe(self) -> dict:
        states = getattr(self.model.config, "num_hidden_layers", None)
        return {**super().describe(), "n_states": None if states is None else states + 1,
                "layers": None if states is None else [states], "hidden_size": self.hidden, "input": "text",
                "attention_mask": True, "last_state": "last_hidden_state"}

    def cost(self, seconds: float) -> float:
        return 1.0

    def prepare(self, texts: list[str]) -> dict:
        tok = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_tokens,
                             return_tensors="pt")
        if self.pin:
            tok = {k: v.pin_memory() for k, v in tok.items()}
        return dict(tok)

    def _forward(self, tok: dict) -> torch.Tensor:
        tok = {k: v.to(self.device, non_blocking=True) for k, v in tok.items()}
        out = self.model(**tok)
        lengths = tok["attention_mask"].sum(1)
        return masked_pool(out.last_hidden_state, lengths, self.pooling)
