"""train-heads' options (TrainHeadsConfig), their checks, and what a run returns."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ser_cache.system.rows import (
    TrainError,
)
from ser_cache.infra.runtime import HEADS_PRECISIONS, precision_problem

if TYPE_CHECKING:
    pass
log = logging.getLogger(__name__)


SELECT_MODES = ("balanced", "ccc")


@dataclass(frozen=True)
class TrainHeadsConfig:
    """Everything `train-heads` needs; defaults follow the paper where it says, documented where it does not.

    batch_size: the paper does not give it; 64 keeps per-step overhead low on CPU while an
    undersampled MSP-Podcast epoch (~12k rows) still gets ~190 updates.
    weight_decay: AdamW's own default (0.01); the paper names AdamW and nothing more.
    threads: CPU threads for torch while training; 0 or None: torch's default (all cores). 1 by
    default, from benchmarks/threads_bench.py (docs/performance.md): on a busy 2-core machine two
    threads made pooled heads 4.7x slower and frame heads 1.3x slower, while on the same machine
    idle they made a full MSP-Podcast-scale run 1.45x faster; threads that wait for each other
    lose far more on a shared machine than a second thread gains on an idle one.
    dropout: of the heads; 0, as the authors' heads (Linear–ReLU–Linear, no dropout). It was 0.1
    before frame inputs came; the option stays, for older runs' setting and for experiments.
    conv_dim, conv_dropout: the ConvPool of every frame store, the authors' 256 and 0.1.
    memory_budget_gb: memory for the inputs (pooled stores whole, frame stores' kept rows packed);
    frames that do not fit are streamed in blocks. None: half the physical memory.
    precision: of the matrix products (heads and ConvPools), see `compute_dtype`; auto is bf16
    where the hardware does bf16 fast (`bf16_fast`), fp32 elsewhere.
    """

    features: tuple[Path, ...]
    data: Path
    out: Path
    train_split: str = "Train"
    dev_split: str = "Development"
    epochs: int = 50
    lr: float = 5e-5
    batch_size: int = 64
    weight_decay: float = 0.01
    seed: int = 0
    undersample: bool = True
    ox: str = "keep"
    gender_weight: float = 1.0
    speaker_weight: float = 0.1
    aam_margin: float = 0.2
    aam_scale: float = 30.0
    select: str = "balanced"
    balanced_trials: int = 10
    balanced_per_class: int | None = None
    hidden: int = 256
    dropout: float = 0.0
    conv_dim: int = 256
    conv_dropout: float = 0.1
    memory_budget_gb: float | None = None
    tensorboard: Path | None = None  # a folder for TensorBoard scalars (the history rows)
    device: str = "auto"
    precision: str = "auto"
    threads: int | None = 1
    overwrite: bool = False
    progress: bool = True

    def verify(self) -> None:
        """Raise one TrainError listing every problem with the options."""
        problems = []
        if not self.features:
            problems.append("--features: give at least one feature store")
        if len(set(map(str, self.features))) != len(self.features):
            problems.append("--features: the same store is given twice")
        if not self.lr > 0:
            problems.append(f"--lr {self.lr}: expected a positive learning rate")
        if self.batch_size < 2:
            problems.append(f"--batch-size {self.batch_size}: expected 2 or more (CCC needs two rows)")
        if self.conv_dim < 1:
            problems.append(f"--conv-dim {self.conv_dim}: expected 1 or more")
        if not 0 <= self.conv_dropout < 1:
            problems.append(f"--conv-dropout {self.conv_dropout}: expected a probability in [0, 1)")
        if self.memory_budget_gb is not None and not self.memory_budget_gb > 0:
            problems.append(f"--memory-budget {self.memory_budget_gb}: expected a positive number of GB")
        if problem := precision_problem(self.precision, HEADS_PRECISIONS):
            problems.append(problem)
        problems += common_problems(self)
        if problems:
            raise TrainError("; ".join(problems))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["features"] = [str(p) for p in self.features]
        d["data"] = str(self.data)
        d["out"] = str(self.out)
        d["tensorboard"] = None if self.tensorboard is None else str(self.tensorboard)
        return d


def common_problems(cfg) -> list[str]:
    """Problems with the options every training loop shares (heads, loss, sampling, selection).

    `cfg` is a TrainHeadsConfig or a FinetuneConfig: both carry these fields under these names.
    """
    from ser_cache.system.sampling import OX_MODES

    problems = []
    if cfg.epochs < 1:
        problems.append(f"--epochs {cfg.epochs}: expected 1 or more")
    if cfg.weight_decay < 0:
        problems.append(f"--weight-decay {cfg.weight_decay}: expected 0 or more")
    if cfg.ox not in OX_MODES:
        problems.append(f"--ox {cfg.ox}: expected one of {', '.join(OX_MODES)}")
    if cfg.gender_weight < 0:
        problems.append(f"--gender-weight {cfg.gender_weight}: expected 0 (head off) or more")
    if cfg.speaker_weight < 0:
        problems.append(f"--speaker-weight {cfg.speaker_weight}: expected 0 (head off) or more")
    if not 0 <= cfg.aam_margin < math.pi / 2:
        problems.append(f"--aam-margin {cfg.aam_margin}: expected radians in [0, pi/2)")
    if not cfg.aam_scale > 0:
        problems.append(f"--aam-scale {cfg.aam_scale}: expected a positive scale")
    if cfg.select not in SELECT_MODES:
        problems.append(f"--select {cfg.select}: expected one of {', '.join(SELECT_MODES)}")
    if cfg.balanced_trials < 1:
        problems.append(f"--balanced-trials {cfg.balanced_trials}: expected 1 or more")
    if cfg.balanced_per_class is not None and cfg.balanced_per_class < 1:
        problems.append(f"--balanced-per-class {cfg.balanced_per_class}: expected 1 or more")
    if cfg.hidden < 1:
        problems.append(f"--hidden {cfg.hidden}: expected 1 or more")
    if not 0 <= cfg.dropout < 1:
        problems.append(f"--dropout {cfg.dropout}: expected a probability in [0, 1)")
    if cfg.threads is not None and cfg.threads < 0:
        problems.append(f"--threads {cfg.threads}: expected 1 or more, or 0 for torch's default (all cores)")
    if cfg.train_split == cfg.dev_split:
        problems.append(f"--train-split and --dev-split are both {cfg.train_split}")
    return problems


@dataclass
class TrainResult:
    run_dir: Path
    best_epoch: int
    metrics: dict
    wall_seconds: float = 0.0
    history: list[dict] = field(default_factory=list)
