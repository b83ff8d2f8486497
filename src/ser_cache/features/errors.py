"""The errors of stage one, below every module that raises them (each module re-exports its own:
`ser_cache.features.extract.ExtractError`)."""

from __future__ import annotations


class ExtractError(Exception):
    """Extraction stopped (--on-error fail) or cannot start; the message names the file or option."""
