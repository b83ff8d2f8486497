"""`finetune wavlm`'s options (FinetuneConfig) and their checks."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from ser_cache.data import audio as audio_lib
from ser_cache.infra import atomic
from ser_cache.system.rows import TrainError


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything `finetune wavlm` needs; the paper's values where it gives them, documented where not.

    lr_encoder, lr_heads, epochs: the paper's 5e-5 and 50.
    batch_seconds: audio seconds per (global) batch, summed over ranks; the paper gives no batch
    size. 160 s is about 29 MSP-Podcast clips (mean 5.5 s).
    gender_weight, speaker_weight: Eq. 1's alpha = 1 and beta = 0.1, the one default of train-heads
    and finetune wavlm (docs/training.md says why); 0 turns a head off (the paper's plain WavLM
    system is 0 and 0, its "G Pred" 1 and 0).
    weight_decay: AdamW's default, as in train-heads.
    dropout: of the heads; 0, as the authors' heads (Linear–ReLU–Linear). conv_dropout: between the
    point-wise convolutions, the authors' fixed 0.1.
    layerdrop: None keeps the checkpoint's own (0.1 for microsoft/wavlm-large), as the authors trained.
    init_from: a fine-tuned run (e.g. `ser-cache import vox-profile`) whose weights start this one.
    """

    data: Path
    out: Path
    model: str = "wavlm-large"
    text_features: Path | None = None
    speaker_features: Path | None = None
    train_split: str = "Train"
    dev_split: str = "Development"
    epochs: int = 50
    lr_encoder: float = 5e-5
    lr_heads: float = 5e-5
    weight_decay: float = 0.01
    batch_seconds: float = 160.0
    grad_accum: int = 1
    max_seconds: float = audio_lib.DEFAULT_MAX_SECONDS
    freeze_cnn: bool = True
    gradient_checkpointing: bool = False
    precision: str = "auto"
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
    layerdrop: float | None = None
    init_from: Path | None = None
    workers: int | None = None  # None: up to 4 per rank on a GPU, none on a CPU
    device: str = "auto"
    threads: int | None = None
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    tensorboard: Path | None = None  # a folder for TensorBoard scalars (the history rows)

    def verify(self) -> None:
        """Raise one TrainError listing every problem with the options."""
        from ser_cache.encoders.base import PRECISIONS
        from ser_cache.train.options import common_problems

        problems = []
        for name, value in (("--lr-encoder", self.lr_encoder), ("--lr-heads", self.lr_heads),
                            ("--batch-seconds", self.batch_seconds), ("--max-seconds", self.max_seconds)):
            if not value > 0:
                problems.append(f"{name} {value}: expected a positive number")
        if self.grad_accum < 1:
            problems.append(f"--grad-accum {self.grad_accum}: expected 1 or more")
        if self.precision not in PRECISIONS:
            problems.append(f"--precision {self.precision}: expected one of {', '.join(PRECISIONS)}")
        if self.conv_dim < 1:
            problems.append(f"--conv-dim {self.conv_dim}: expected 1 or more")
        if not 0 <= self.conv_dropout < 1:
            problems.append(f"--conv-dropout {self.conv_dropout}: expected a probability in [0, 1)")
        if self.layerdrop is not None and not 0 <= self.layerdrop < 1:
            problems.append(f"--layerdrop {self.layerdrop}: expected a probability in [0, 1)")
        if self.workers is not None and self.workers < 0:
            problems.append(f"--workers {self.workers}: expected 0 or more")
        if self.resume and self.overwrite:
            problems.append("--resume and --overwrite: give one (continue the run, or start it again)")
        if self.text_features is not None and self.text_features == self.speaker_features:
            problems.append("--text-features and --speaker-features name the same store")
        problems += common_problems(self)
        if problems:
            raise TrainError("; ".join(problems))

    @property
    def stores(self) -> tuple[Path, ...]:
        return tuple(Path(p) for p in (self.text_features, self.speaker_features) if p is not None)

    def to_dict(self) -> dict:
        # Where TensorBoard logs go is no setting of the run: --resume may add, move or drop it.
        d = asdict(self)
        d.pop("tensorboard")
        return atomic._jsonable(d)
