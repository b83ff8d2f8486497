"""The error of every training path, below every module that raises it (`ser_cache.system.errors.TrainError`,
where the training code imports it from)."""

from __future__ import annotations


class TrainError(Exception):
    """Training cannot start or go on as asked; the message names the option, store or utterance."""
