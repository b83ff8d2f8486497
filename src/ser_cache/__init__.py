"""ser-cache: cache frozen speech/text encoder features once, train emotion heads from the cache.

The Python API (docs/python.md) is importable from here: `open_store`, `load_features`,
`Predictor` (and the `Store` and `Dataset` they return). They are loaded on first use, so that
`import ser_cache` stays cheap (no torch, no zarr).
"""

from ser_cache.version import __version__

_API = ("Dataset", "Predictor", "Store", "load_features", "open_store")
__all__ = ["Dataset", "Predictor", "Store", "__version__", "load_features", "open_store"]


def __getattr__(name: str):
    if name in _API:
        from ser_cache import api

        return getattr(api, name)
    raise AttributeError(f"module 'ser_cache' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
