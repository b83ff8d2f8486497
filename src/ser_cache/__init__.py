"""ser-cache: cache frozen speech/text encoder features once, train emotion heads from the cache."""

__version__ = "0.1.0"
