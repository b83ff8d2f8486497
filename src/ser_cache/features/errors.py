"""The errors of stage one, below every module that raises them; each is re-exported where its users
know it: `ser_cache.features.errors.StoreError`, `ser_cache.features.errors.ExtractError`."""

from __future__ import annotations


class StoreError(Exception):
    """A feature store cannot be used as asked; the message names the store and the reason."""


class ExtractError(Exception):
    """Extraction stopped (--on-error fail) or cannot start; the message names the file or option."""
