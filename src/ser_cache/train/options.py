"""train-heads' options (TrainHeadsConfig: the shared TrainingOptions and its own), their checks, and
what a run returns. Nothing here imports torch or numpy: the CLI reads the defaults for --help."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from ser_cache.infra.runtime import HEADS_PRECISIONS, precision_problem
from ser_cache.system.options import TrainingOptions


@dataclass(frozen=True)
class TrainHeadsConfig(TrainingOptions):
    """Everything `train-heads` needs; defaults follow the paper where it says, documented where it does not.

    The options every recipe shares (splits, epochs, objective, sampler, selection, heads, device)
    are TrainingOptions' (system/options.py); these are train-heads' own.
    batch_size: the paper does not give it; 64 keeps per-step overhead low on CPU while an
    undersampled MSP-Podcast epoch (~12k rows) still gets ~190 updates.
    threads: 1 by default, from benchmarks/threads_bench.py (docs/performance.md): on a busy 2-core
    machine two threads made pooled heads 4.7x slower and frame heads 1.3x slower, while on the
    same machine idle they made a full MSP-Podcast-scale run 1.45x faster; threads that wait for
    each other lose far more on a shared machine than a second thread gains on an idle one.
    memory_budget_gb: memory for the inputs (pooled stores whole, frame stores' kept rows packed);
    frames that do not fit are streamed in blocks. None: half the physical memory.
    precision: of the matrix products (heads and ConvPools), see `compute_dtype`; auto is bf16
    where the hardware does bf16 fast (`bf16_fast`), fp32 elsewhere.
    """

    RECORD_ORDER: ClassVar[tuple[str, ...]] = (
        "features", "data", "out", "train_split", "dev_split", "epochs", "lr", "batch_size", "weight_decay", "seed",
        "undersample", "ox", "gender_weight", "speaker_weight", "aam_margin", "aam_scale", "select",
        "balanced_trials", "balanced_per_class", "hidden", "dropout", "conv_dim", "conv_dropout", "memory_budget_gb",
        "tensorboard", "device", "precision", "threads", "overwrite", "progress", "task", "classes", "class_weights",
        "class_loss_weight", "layer")

    features: tuple[Path, ...]
    data: Path
    out: Path
    lr: float = 5e-5
    batch_size: int = 64
    memory_budget_gb: float | None = None
    threads: int | None = field(default=1, kw_only=True)
    # --layer: "K" (every input with a layer axis) or "NAME=K"; none: a layered input is weighted
    # (LayerWeighting). Recorded in config.json only when given.
    layer: tuple[str, ...] = field(default=(), kw_only=True)

    def verify(self) -> None:
        """Raise one TrainError listing every problem with the options."""
        from ser_cache.system.errors import TrainError
        from ser_cache.system.layer_choice import parse_layer_options

        problems = []
        if not self.features:
            problems.append("--features: give at least one feature store")
        if len(set(map(str, self.features))) != len(self.features):
            problems.append("--features: the same store is given twice")
        if not self.lr > 0:
            problems.append(f"--lr {self.lr}: expected a positive learning rate")
        if self.batch_size < 2:
            problems.append(f"--batch-size {self.batch_size}: expected 2 or more (CCC needs two rows)")
        problems += self.conv_problems()
        if self.memory_budget_gb is not None and not self.memory_budget_gb > 0:
            problems.append(f"--memory-budget {self.memory_budget_gb}: expected a positive number of GB")
        if problem := precision_problem(self.precision, HEADS_PRECISIONS):
            problems.append(problem)
        problems += self.common_problems()
        try:
            parse_layer_options(self.layer)
        except TrainError as exc:
            problems.append(str(exc))
        if problems:
            raise TrainError("; ".join(problems))

    def to_dict(self) -> dict:
        d = self.recorded()
        d["features"] = [str(p) for p in self.features]
        d["data"] = str(self.data)
        d["out"] = str(self.out)
        d["tensorboard"] = None if self.tensorboard is None else str(self.tensorboard)
        if self.layer:
            d["layer"] = list(self.layer)
        else:
            d.pop("layer")
        return d


@dataclass
class TrainResult:
    run_dir: Path
    best_epoch: int
    metrics: dict
    wall_seconds: float = 0.0
    history: list[dict] = field(default_factory=list)
