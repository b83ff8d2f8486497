"""What a trained run's directory records: config.json (options, inputs, label range, provenance) and the files
written with it."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ser_cache.infra import atomic
from ser_cache.runs import layout, prediction_file
from ser_cache.system.metrics import ATTRIBUTES as AVD  # the heads' "avd" column order, too
from ser_cache.system.rows import TrainingData
from ser_cache.version import __version__

if TYPE_CHECKING:
    pass
log = logging.getLogger(__name__)


def run_config(train: dict, data: TrainingData, lo: Sequence[float], hi: Sequence[float], gender_labels: list[str],
               speaker_labels: list[str], heads_config: dict, best_epoch: int, **extra) -> dict:
    """config.json of a run: the training options, every cached input, labels, and the heads' arguments.

    `extra` adds fields of other run kinds (a fine-tuned encoder's `system` and architecture) and
    "frame_inputs", the ConvPool arguments of every frame store (model.FeatureModel.config()).
    The options' paths are recorded absolute, and "provenance" says what trained the run on which
    labels (provenance.py).
    """
    from ser_cache.runs import provenance

    return {
        "format": layout.RUN_FORMAT,
        "format_version": layout.format_version(extra.get("frame_inputs")),
        "package_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
        "provenance": provenance.record(train.get("data")),
        "train": provenance.absolute_paths(train),
        "inputs": [s.record() for s in data.inputs],
        "excluded_stores": data.excluded_stores,
        "labels": {"attributes": list(AVD), "min": list(lo), "max": list(hi)},
        "gender_labels": gender_labels,
        "n_speakers": len(speaker_labels),
        "speakers": speaker_labels,
        "heads": heads_config,
        "data": data.counts,
        "best_epoch": best_epoch,
    }


def write_run_files(directory: Path, config: dict, metrics: dict, history: list[dict], dev_ids: list[str],
                    pred: np.ndarray | None, probs: np.ndarray | None, gender_labels: list[str], *,
                    class_probs: np.ndarray | None = None, classes: Sequence[str] = ()) -> None:
    """Everything of a run directory but the weights: metrics, history, Development predictions, config last.

    `pred` None: no attribute heads, no predictions_dev.csv. With `classes` and `class_probs`, the
    class predictions go to predictions_dev_categorical.csv (prediction_file.write_class_predictions)."""
    directory = Path(directory)
    atomic.write_json_atomic(directory / layout.METRICS, metrics)
    atomic.write_csv_atomic(directory / layout.HISTORY, list(history[0]), [list(r.values()) for r in history])
    if pred is not None:
        prediction_file.write_predictions(directory / layout.DEV_PREDICTIONS, dev_ids, pred,
                                          gender_labels=gender_labels or None,
                               gender_probs=probs)
    if classes and class_probs is not None:
        probs = np.asarray(class_probs, dtype=np.float64)
        codes = [classes[int(k)] for k in np.argmax(probs, axis=1)]
        prediction_file.write_class_predictions(directory / layout.DEV_CLASS_PREDICTIONS, dev_ids, codes, probs,
                                                classes=tuple(classes))
    # config.json makes the directory a finished run (layout.is_run_dir), so it comes last.
    atomic.write_json_atomic(directory / layout.CONFIG, config)
