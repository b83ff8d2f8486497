"""Decoders for the worker-crash tests, in a module light enough for a spawned worker to import
(no torch): module-level, so that the worker can find them."""

import os
from pathlib import Path

from ser_cache.data import audio


def decode_or_die(paths: list[str], **kwargs):
    """`audio.load_many`, except that a file named die.wav kills the (worker) process, as a
    decoder segfault would."""
    if any(Path(p).name == "die.wav" for p in paths):
        os._exit(11)
    return audio.load_many(paths, **kwargs)


def always_die(paths: list[str], **kwargs):
    """A decoder whose worker process dies whatever it is given, as when workers cannot start."""
    os._exit(12)
