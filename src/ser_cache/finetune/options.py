"""`finetune wavlm`'s options (FinetuneConfig) and their checks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ser_cache.data import audio as audio_lib
from ser_cache.infra import atomic
from ser_cache.system.errors import TrainError
from ser_cache.system.options import TrainingOptions


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
        "progress", "tensorboard", "task", "classes", "class_weights", "class_loss_weight", "encoder", "window",
        "states", "lora", "lora_alpha", "lora_dropout", "lora_targets", "lora_layers", "freeze_encoder")
    # Options added with `finetune whisper` and LoRA: recorded only when given, so that a run of
    # `finetune wavlm` without them records (and --resume compares) exactly what it did before.
    RECORDED_WHEN_GIVEN: ClassVar[dict] = {"encoder": "wavlm", "window": None, "states": None, "lora": None,
                                          "lora_alpha": None, "lora_dropout": None, "lora_targets": None,
                                          "lora_layers": None, "freeze_encoder": False}

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
    encoder: str = "wavlm"  # the encoder component: "wavlm" or "whisper" (`finetune wavlm|whisper`)
    window: str | None = None  # Whisper: "window" (15 s, the default) or "trimmed"
    states: str | None = None  # Whisper: "last" (the default, the authors') or "all" (a learned weighting)
    lora: int | None = None  # LoRA rank (None or 0: no adapters)
    lora_alpha: float | None = None  # None: 1, loralib's default (the authors')
    lora_dropout: float | None = None  # None: 0
    lora_targets: tuple[str, ...] | None = None  # None: the feed-forward linears (system.lora.DEFAULT_TARGETS)
    lora_layers: str | None = None  # None: upper-half (index > L // 2)
    freeze_encoder: bool = False

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
        problems += self.encoder_problems()
        problems += self.common_problems()
        if problems:
            raise TrainError("; ".join(problems))

    def encoder_problems(self) -> list[str]:
        problems = []
        if self.encoder not in ("wavlm", "whisper"):
            problems.append(f"encoder {self.encoder!r}: expected wavlm or whisper")
        if self.encoder != "whisper":
            for name, value in (("--window", self.window), ("--states", self.states)):
                if value is not None:
                    problems.append(f"{name} {value}: a Whisper option (`finetune whisper`)")
        if self.window is not None and self.window not in ("window", "trimmed"):
            problems.append(f"--window {self.window}: expected window or trimmed")
        if self.states is not None and self.states not in ("last", "all"):
            problems.append(f"--states {self.states}: expected last or all")
        if self.encoder == "whisper" and self.layerdrop is not None:
            problems.append("--layerdrop: a WavLM option (Whisper's encoder runs every layer)")
        if self.lora is not None and self.lora < 0:
            problems.append(f"--lora {self.lora}: expected a rank of 1 or more (0: no adapters)")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            problems.append(f"--lora-alpha {self.lora_alpha}: expected a positive number")
        if self.lora_dropout is not None and not 0 <= self.lora_dropout < 1:
            problems.append(f"--lora-dropout {self.lora_dropout}: expected a probability in [0, 1)")
        if not self.lora and any(v is not None for v in (self.lora_alpha, self.lora_dropout, self.lora_targets,
                                                         self.lora_layers)):
            problems.append("--lora-alpha, --lora-dropout, --lora-targets, --lora-layers: they need --lora RANK")
        if self.lora and self.freeze_encoder:
            problems.append("--lora and --freeze-encoder: give one (adapters train, or nothing of the encoder does)")
        return problems

    @property
    def stores(self) -> tuple[Path, ...]:
        return tuple(Path(p) for p in (self.text_features, self.speaker_features) if p is not None)

    def to_dict(self) -> dict:
        # Where TensorBoard logs go is no setting of the run: --resume may add, move or drop it.
        d = self.recorded()
        d.pop("tensorboard")
        for key, absent in self.RECORDED_WHEN_GIVEN.items():
            if d.get(key) == absent:
                d.pop(key)
        return atomic.jsonable(d)
