"""The error of using a run, below every module that raises it (gather, predict); it is re-exported
where its users know it: `ser_cache.runs.predict.PredictError`."""

from __future__ import annotations


class PredictError(Exception):
    """Prediction or evaluation cannot go on as asked; the message names the run, store, file or setting."""
