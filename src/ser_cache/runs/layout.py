"""What a run directory holds: its files' names, its format and version, RunError, and whether a
folder is a finished run or one being trained in place. Writing a run into place: runs.staging;
reading its config.json and weights: runs.rundir; its prediction files: runs.prediction_file.

Layout (documented for users in docs/training.md):

    <run>/
        config.json          the full training config, every input store (path, fingerprint, model
                             id, revision, kind, settings), label min/max, gender labels, speakers,
                             the heads' constructor arguments, the ConvPool arguments of every frame
                             store ("frame_inputs"), package version
        model.safetensors    the model.FeatureModel's weights: heads ("heads.*") and the ConvPool of
                             each frame store ("pools.{i}.*"; "frame_weightings.{j}.*" for the layer
                             weighting of each frame store of several states), plus the AAM-softmax
                             class weights ("aam.*")
        metrics.json         Development scores of the kept epoch
        history.csv          one row per epoch: losses, Development CCCs, balanced CCC, gender
        predictions_dev.csv  the kept epoch's Development predictions, challenge format
                             (a run with attribute heads)
        predictions_dev_categorical.csv  with a class head (train-heads --task categorical|both): the
                             kept epoch's Development classes, FileName,EmoClass,prob_<code>...
                             (the rows with a class target under categorical, every row under both)

A fine-tuned run (`finetune wavlm`, docs/finetune.md) has the same files plus the full encoder
weights in model.safetensors. It trains for hours, so its in-progress state lives inside the run
directory (IN_PROGRESS marker, checkpoint.safetensors, the best weights so far) and the finished files
appear at the end, config.json last; `--resume` continues such a directory.
"""

from __future__ import annotations

import json
from pathlib import Path

RUN_FORMAT = "ser-cache-run"
RUN_FORMAT_VERSION = 2  # the newest this version reads
# A run with frame inputs needs a reader that builds their ConvPools, so it says version 2; every
# other run stays version 1, which older ser-cache versions still read.
POOLED_RUN_FORMAT_VERSION = 1
FRAME_RUN_FORMAT_VERSION = 2
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
METRICS = "metrics.json"
HISTORY = "history.csv"
DEV_PREDICTIONS = "predictions_dev.csv"
DEV_CLASS_PREDICTIONS = "predictions_dev_categorical.csv"
IN_PROGRESS = "in_progress.json"  # marks a run being trained in place (fine-tuning); config.json marks it done


class RunError(Exception):
    """A run directory cannot be written or read as asked; the message names the path and the reason."""


def is_run_dir(path: Path) -> bool:
    try:
        return json.loads((Path(path) / CONFIG).read_text()).get("format") == RUN_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def is_unfinished_run(path: Path) -> bool:
    """A run directory being trained in place (or killed while it was): the marker, no config.json yet."""
    path = Path(path)
    return (path / IN_PROGRESS).is_file() and not (path / CONFIG).is_file()


def format_version(frame_inputs: dict | None) -> int:
    return FRAME_RUN_FORMAT_VERSION if frame_inputs else POOLED_RUN_FORMAT_VERSION
