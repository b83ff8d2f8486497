"""Stage two's recipe: `train_heads(cfg)` — load the rows, set the run up, fit, write the run directory."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ser_cache.infra.runtime import resolve_device, torch_threads
from ser_cache.runs import staging
from ser_cache.system.epoch_log import tensorboard_problem
from ser_cache.system.errors import TrainError
from ser_cache.system.rows import TrainingData, load_rows
from ser_cache.system.scoring import selection_text
from ser_cache.system.setup import set_up
from ser_cache.train.options import TrainHeadsConfig, TrainResult

if TYPE_CHECKING:
    pass
log = logging.getLogger(__name__)


def load_training_data(cfg: TrainHeadsConfig) -> TrainingData:
    """Read corpus and stores, join them, drop unusable rows (counting why); frames within the budget."""
    return load_rows(cfg.data, cfg.train_split, cfg.dev_split, cfg.features, speaker_weight=cfg.speaker_weight,
                     frames=True, memory_budget_gb=cfg.memory_budget_gb, layer=cfg.layer)


def train_heads(cfg: TrainHeadsConfig) -> TrainResult:
    """Train the heads as configured and write the run directory; returns where, and the kept epoch."""
    cfg.verify()
    staging.check_run_target(cfg.out, cfg.overwrite)  # refuse before minutes of loading, not after
    if cfg.tensorboard is not None and tensorboard_problem():
        raise TrainError(tensorboard_problem())
    with torch_threads(cfg.threads):
        return _train_heads(cfg)


def _train_heads(cfg: TrainHeadsConfig) -> TrainResult:
    import torch

    from ser_cache.system.sampling import EpochSampler
    from ser_cache.train.fit import Diverged, Job, fit

    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    data = load_training_data(cfg)
    data.place(device)
    run = set_up(cfg, data, device)
    per_epoch = len(EpochSampler(data.emotions[run.train_idx], undersample=cfg.undersample, seed=cfg.seed))
    log.info("training on %d rows (%d per epoch%s), validating on %d %s rows; inputs: %s; %s on %s",
             run.train_idx.size, per_epoch, ", undersampled" if cfg.undersample else "", run.dev_idx.size,
             data.dev_split, ", ".join(f"{s.name} {s.shape}" for s in data.inputs),
             str(run.model.compute_dtype or torch.float32).removeprefix("torch."), device)
    # The one loop (fit.py) with one job: what a sweep does with K.
    (done,) = fit([Job(cfg, data, run, title=Path(cfg.out).name, overwrite=cfg.overwrite)], device,
                  progress=cfg.progress)
    if isinstance(done, Diverged):
        raise TrainError(done.message())
    wall = time.perf_counter() - t0
    if cfg.task == "attributes":
        log.info("kept epoch %d of %d (%s %s CCC %.4f) in %.1f s; run written to %s", done.best_epoch, cfg.epochs,
                 data.dev_split, "balanced" if cfg.select == "balanced" else "mean", done.score, wall, cfg.out)
    else:
        log.info("kept epoch %d of %d (%s %s %.4f) in %.1f s; run written to %s", done.best_epoch, cfg.epochs,
                 data.dev_split, selection_text(cfg.task, cfg.select), done.score, wall, cfg.out)
    return TrainResult(run_dir=Path(cfg.out), best_epoch=done.best_epoch, metrics=done.metrics, wall_seconds=wall,
                       history=done.history)
