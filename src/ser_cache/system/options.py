"""The options every training recipe shares (TrainingOptions), declared once with their defaults and checks.

train-heads' TrainHeadsConfig (train/options.py) and finetune wavlm's FinetuneConfig
(finetune/options.py) are TrainingOptions with their own options added; a run's set-up
(setup.py) reads only these. The CLI reads the defaults from here for --help
(cli/shared_options.py), so nothing here imports torch or numpy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

SELECT_MODES = ("balanced", "ccc")
CLASS_WEIGHT_MODES = ("balanced", "none")
# The options of the categorical task: config.json records them only for a run that has one, so an
# attribute run's file is what it always was.
CLASS_TASK_FIELDS = ("task", "classes", "class_weights", "class_loss_weight")


@dataclass(frozen=True, kw_only=True)
class TrainingOptions:
    """The splits, the epochs, the objective, the sampler, the epoch selection, the heads, and where
    and how a run trains: the same name, default and check in every recipe.

    Keyword-only, so that a recipe's own fields without a default (train-heads' features, data and
    out) stay its positional arguments, as they were.
    weight_decay: AdamW's own default (0.01); the paper names AdamW and nothing more.
    gender_weight, speaker_weight: Eq. 1's alpha = 1 and beta = 0.1, the one default of every
    recipe (docs/training.md, "Options and defaults", says why); 0 turns a head off (the paper's
    plain WavLM system is 0 and 0, its "G Pred" 1 and 0).
    dropout: of the heads; 0, as the authors' heads (Linear–ReLU–Linear, no dropout). It was 0.1
    before frame inputs came; the option stays, for older runs' setting and for experiments.
    conv_dim, conv_dropout: the point-wise convolutions over frames (a frame store's ConvPool,
    fine-tuned WavLM's hidden states), the authors' 256 and 0.1.
    precision: "auto" in every recipe; which values a recipe takes is its own check.
    threads: CPU threads for torch; None or 0: torch's default (all cores). A recipe may choose
    another default (train-heads: 1).
    task: "attributes" (arousal/valence/dominance, Task 2), "categorical" (the emotion class, Task
    1) or "both" (system/tasks.py). classes: 8 (the challenge's) or 9 (and O, the authors' layout).
    class_weights: "balanced", the baseline's N / (n_classes * n_c) over the class counts of the
    rows one epoch draws, or "none". class_loss_weight: the class loss's weight beside the CCC
    losses under "both". select under a class task: docs/categorical.md ("balanced": macro-F1 for
    categorical, the mean of balanced CCC and macro-F1 for both; "ccc": plain CCC in that mean).
    """

    # The order in which config.json lists a recipe's options (dataclasses put these shared fields
    # first); a field left out of it follows, in the fields' order.
    RECORD_ORDER: ClassVar[tuple[str, ...]] = ()

    train_split: str = "Train"
    dev_split: str = "Development"
    epochs: int = 50
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
    device: str = "auto"
    precision: str = "auto"
    threads: int | None = None
    overwrite: bool = False
    progress: bool = True
    tensorboard: Path | None = None  # a folder for TensorBoard scalars (the history rows)
    task: str = "attributes"
    classes: int = 8
    class_weights: str = "balanced"
    class_loss_weight: float = 1.0

    def recorded(self) -> dict:
        """dataclasses.asdict, its keys in RECORD_ORDER."""
        d = asdict(self)
        if self.task == "attributes":
            for key in CLASS_TASK_FIELDS:
                d.pop(key)
        return {**{k: d.pop(k) for k in self.RECORD_ORDER if k in d}, **d}

    def conv_problems(self) -> list[str]:
        """Problems with the point-wise convolutions' options (each recipe lists them where it always did)."""
        problems = []
        if self.conv_dim < 1:
            problems.append(f"--conv-dim {self.conv_dim}: expected 1 or more")
        if not 0 <= self.conv_dropout < 1:
            problems.append(f"--conv-dropout {self.conv_dropout}: expected a probability in [0, 1)")
        return problems

    def task_problems(self) -> list[str]:
        """Problems with the task's options (the categorical task's among them)."""
        from ser_cache.system.tasks import TASKS

        problems = []
        if self.task not in TASKS:
            problems.append(f"--task {self.task}: expected one of {', '.join(TASKS)}")
        if self.classes not in (8, 9):
            problems.append(f"--classes {self.classes}: expected 8 (the challenge's) or 9 (and O)")
        if self.class_weights not in CLASS_WEIGHT_MODES:
            problems.append(f"--class-weights {self.class_weights}: expected one of {', '.join(CLASS_WEIGHT_MODES)}")
        if not (self.class_loss_weight > 0 and math.isfinite(self.class_loss_weight)):
            problems.append(f"--class-loss-weight {self.class_loss_weight}: expected a positive weight")
        return problems

    def common_problems(self) -> list[str]:
        """Problems with the options every training loop shares (heads, loss, sampling, selection)."""
        from ser_cache.system.sampling import OX_MODES

        problems = []
        if self.epochs < 1:
            problems.append(f"--epochs {self.epochs}: expected 1 or more")
        if self.weight_decay < 0:
            problems.append(f"--weight-decay {self.weight_decay}: expected 0 or more")
        if self.ox not in OX_MODES:
            problems.append(f"--ox {self.ox}: expected one of {', '.join(OX_MODES)}")
        if self.gender_weight < 0:
            problems.append(f"--gender-weight {self.gender_weight}: expected 0 (head off) or more")
        if self.speaker_weight < 0:
            problems.append(f"--speaker-weight {self.speaker_weight}: expected 0 (head off) or more")
        if not 0 <= self.aam_margin < math.pi / 2:
            problems.append(f"--aam-margin {self.aam_margin}: expected radians in [0, pi/2)")
        if not self.aam_scale > 0:
            problems.append(f"--aam-scale {self.aam_scale}: expected a positive scale")
        if self.select not in SELECT_MODES:
            problems.append(f"--select {self.select}: expected one of {', '.join(SELECT_MODES)}")
        if self.balanced_trials < 1:
            problems.append(f"--balanced-trials {self.balanced_trials}: expected 1 or more")
        if self.balanced_per_class is not None and self.balanced_per_class < 1:
            problems.append(f"--balanced-per-class {self.balanced_per_class}: expected 1 or more")
        if self.hidden < 1:
            problems.append(f"--hidden {self.hidden}: expected 1 or more")
        if not 0 <= self.dropout < 1:
            problems.append(f"--dropout {self.dropout}: expected a probability in [0, 1)")
        if self.threads is not None and self.threads < 0:
            problems.append(f"--threads {self.threads}: expected 1 or more, or 0 for torch's default (all cores)")
        problems += self.task_problems()
        if self.train_split == self.dev_split:
            problems.append(f"--train-split and --dev-split are both {self.train_split}")
        return problems
