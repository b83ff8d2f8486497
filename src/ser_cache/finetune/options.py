"""`finetune wavlm`'s options (FinetuneConfig) and their checks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ser_cache.data import audio as audio_lib
from ser_cache.infra import atomic
from ser_cache.system.options import TrainingOptions
from ser_cache.system.rows import TrainError


@dataclass(frozen=True)
class FinetuneConfig(TrainingOptions):
    """Everything `finetune wavlm` needs; the paper's values where it gives them, documented where not.

    The options every recipe shares (splits, epochs, objective, sampler, selection, heads, device)
    are TrainingOptions' (system/options.py); these are finetune wavlm's own.
    lr_encoder, lr_heads, epochs: the paper's 5e-5 and 50.
    batch_seconds: audio seconds per (global) batch, summed over ranks; the paper gives no batch
    size. 160 s is about 29 MSP-Podcast clips (mean 5.5 s).
    layerdrop: None keeps the checkpoint's own (0.1 for microsoft/wavlm-large), as the authors trained.
    init_from: a fine-tuned run (e.g. `ser-cache import vox-profile`) whose weights start this one.
    """

    RECORD_ORDER: ClassVar[tuple[str, ...]] = (
        "data", "out", "model", "text_features", "speaker_features", "train_split", "dev_split", "epochs",
        "lr_encoder", "lr_heads", "weight_decay", "batch_seconds", "grad_accum", "max_seconds", "freeze_cnn",
        "gradient_checkpointing", "precision", "seed", "undersample", "ox", "gender_weight", "speaker_weight",
        "aam_margin", "aam_scale", "select", "balanced_trials", "balanced_per_class", "hidden", "dropout",
        "conv_dim", "conv_dropout", "layerdrop", "init_from", "workers", "device", "threads", "resume", "overwrite",
        "progress", "tensorboard", "task", "classes", "class_weights", "class_loss_weight")

    data: Path
    out: Path
    model: str = "wavlm-large"
    text_features: Path | None = None
    speaker_features: Path | None = None
    lr_encoder: float = 5e-5
    lr_heads: float = 5e-5
    batch_seconds: float = 160.0
    grad_accum: int = 1
    max_seconds: float = audio_lib.DEFAULT_MAX_SECONDS
    freeze_cnn: bool = True
    gradient_checkpointing: bool = False
    layerdrop: float | None = None
    init_from: Path | None = None
    workers: int | None = None  # None: up to 4 per rank on a GPU, none on a CPU
    resume: bool = False

    def verify(self) -> None:
        """Raise one TrainError listing every problem with the options."""
        from ser_cache.infra.runtime import ENCODER_PRECISIONS, precision_problem

        problems = []
        for name, value in (("--lr-encoder", self.lr_encoder), ("--lr-heads", self.lr_heads),
                            ("--batch-seconds", self.batch_seconds), ("--max-seconds", self.max_seconds)):
            if not value > 0:
                problems.append(f"{name} {value}: expected a positive number")
        if self.grad_accum < 1:
            problems.append(f"--grad-accum {self.grad_accum}: expected 1 or more")
        if problem := precision_problem(self.precision, ENCODER_PRECISIONS):
            problems.append(problem)
        problems += self.conv_problems()
        if self.layerdrop is not None and not 0 <= self.layerdrop < 1:
            problems.append(f"--layerdrop {self.layerdrop}: expected a probability in [0, 1)")
        if self.workers is not None and self.workers < 0:
            problems.append(f"--workers {self.workers}: expected 0 or more")
        if self.resume and self.overwrite:
            problems.append("--resume and --overwrite: give one (continue the run, or start it again)")
        if self.text_features is not None and self.text_features == self.speaker_features:
            problems.append("--text-features and --speaker-features name the same store")
        problems += self.common_problems()
        if problems:
            raise TrainError("; ".join(problems))

    @property
    def stores(self) -> tuple[Path, ...]:
        return tuple(Path(p) for p in (self.text_features, self.speaker_features) if p is not None)

    def to_dict(self) -> dict:
        # Where TensorBoard logs go is no setting of the run: --resume may add, move or drop it.
        d = self.recorded()
        d.pop("tensorboard")
        return atomic.jsonable(d)
