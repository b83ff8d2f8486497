"""Options that `train-heads`, `sweep` and `finetune wavlm` share word for word (splits, epochs, the
objective, the sampler, the epoch selection, the heads): each declared once, its default the
library's own (TRAINING: the options every recipe shares, system/options.py; HEADS: train-heads'
and sweep's, train/options.py); and the fixed choices of every command's options.

Nothing here imports torch or numpy (nor do the two option modules): `ser-cache --help` must not
load torch (tests/cli/test_trust_cli.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from ser_cache.infra.environment import default_memory_budget_gb
from ser_cache.system.options import TrainingOptions
from ser_cache.train.options import TrainHeadsConfig

# Options with fixed values: --help lists them and click refuses any other before work starts.
# The library checks the same values for its Python callers; tests/cli/test_trust_cli.py keeps the
# two lists equal (the library's constants live in modules that import torch).
OxMode = Literal["keep", "drop", "only", "train+dev", "train+dev-nonox"]  # sampling.OX_MODES
SelectMode = Literal["balanced", "ccc"]  # system.options.SELECT_MODES
TaskMode = Literal["attributes", "categorical", "both"]  # system.tasks.TASKS
ClassWeightMode = Literal["balanced", "none"]  # system.options.CLASS_WEIGHT_MODES
HeadsPrecisionMode = Literal["auto", "fp32", "bf16"]  # infra.runtime.HEADS_PRECISIONS
EncoderPrecisionMode = Literal["auto", "fp32", "bf16", "fp16"]  # infra.runtime.ENCODER_PRECISIONS
TranscribePrecisionMode = Literal["auto", "fp32", "bf16"]  # infra.runtime.TRANSCRIBE_PRECISIONS
PoolingMode = Literal["mean", "mean+std", "frames"]  # encoders.base.POOLINGS
WindowMode = Literal["window", "trimmed"]  # encoders.whisper.WINDOWS
KindName = Literal["whisper", "ssl", "wavlm", "xvector", "text"]  # encoders.SHOWN_KINDS
OnErrorMode = Literal["skip", "fail"]  # extract.ON_ERROR
ExportFormat = Literal["hdf5"]
TRANSCRIBE_MODEL = "whisper-large-v3"  # transcribe.DEFAULT_MODEL

# The defaults of the commands' training options: the library's, read from its dataclasses.
TRAINING = TrainingOptions  # of the options every recipe shares
HEADS = TrainHeadsConfig  # of train-heads' own (which sweep's base options are)

ShardSpec = Annotated[str | None, typer.Option(
    "--shard", metavar="I/N|slurm",
    help="Do shard I of N of the work (I from 0 to N-1), for Slurm job arrays: the shards together write what one "
         "process writes; 'slurm': I and N from the array's SLURM_ARRAY_TASK_* variables (docs/cluster.md).")]
TrainSplit = Annotated[str, typer.Option(help="Split to train on.")]
DevSplit = Annotated[str, typer.Option(help="Split to validate on and select the epoch with.")]
Epochs = Annotated[int, typer.Option(help="Epochs (paper: 50).")]
WeightDecay = Annotated[float, typer.Option(help="AdamW weight decay (AdamW's default).")]
NoUndersample = Annotated[bool, typer.Option(
    "--no-undersample",
    help="Train on every row each epoch instead of undersampling (the default: each epoch draws m rows of every "
         "emotion class, m the size of the smallest class).")]
Ox = Annotated[OxMode, typer.Option(help="O/X handling (paper Table 5; docs/training.md).")]
AamMargin = Annotated[float, typer.Option(help="AAM-softmax margin, radians.")]
AamScale = Annotated[float, typer.Option(help="AAM-softmax scale.")]
Select = Annotated[SelectMode, typer.Option(help="Epoch kept: best mean balanced CCC (paper) or plain CCC.")]
GenderWeight = Annotated[float, typer.Option(help="Gender head loss weight alpha (paper: 1); 0 turns the head off.")]
SpeakerWeight = Annotated[float, typer.Option(
    help="Speaker head AAM loss weight beta (paper: 0.1); 0 turns the head off.")]
BalancedTrials = Annotated[int, typer.Option(help="Balanced-CCC trials.")]
BalancedPerClass = Annotated[int | None,
                             typer.Option(help="Utterances per emotion and trial (default: smallest class).")]
Hidden = Annotated[int, typer.Option(help="Hidden units of each 2-layer head.")]
Dropout = Annotated[float, typer.Option(help="Dropout in the heads (the authors' heads have none).")]
Progress = Annotated[bool, typer.Option(help="Show a progress bar.")]
TensorBoard = Annotated[Path | None, typer.Option(
    metavar="DIR", help="Also log each epoch's history.csv row as TensorBoard scalars in DIR "
                        "(pip install 'ser-cache[tensorboard]').")]
Task = Annotated[TaskMode, typer.Option(
    help="What the heads learn: arousal/valence/dominance (attributes, Task 2), the emotion class (categorical, "
         "Task 1), or both on one body. Under a class task O/X rows have no class target (docs/categorical.md); "
         "the epoch is kept by Development macro-F1 (categorical) or by the mean of macro-F1 and the --select "
         "CCC (both).")]
Classes = Annotated[int, typer.Option(
    help="Emotion classes: 8 (A S H U F D C N, the challenge's) or 9 (and O, the authors' layout).")]
ClassWeights = Annotated[ClassWeightMode, typer.Option(
    help="Class weights of the cross-entropy: balanced, the baseline's N/(classes*n_c) over the rows an epoch "
         "draws (all 1 when undersampled), or none.")]
ClassLossWeight = Annotated[float, typer.Option(
    help="Weight of the class cross-entropy beside the CCC losses under --task both.")]

# The options of a heads run, which `train-heads` and `sweep` (its base options) take word for word.
HeadsLr = Annotated[float, typer.Option(help="AdamW learning rate (paper: 5e-5).")]
HeadsBatchSize = Annotated[int, typer.Option(help="Rows per update (the paper does not say; 64).")]
ConvDim = Annotated[int, typer.Option(
    help="Width of the point-wise convolutions over a frame store's frames (authors: 256).")]
ConvDropout = Annotated[float, typer.Option(help="Dropout between those convolutions (authors: 0.1).")]
MemoryBudget = Annotated[float | None, typer.Option(
    "--memory-budget", metavar="GB",
    help="Memory for the inputs; frame stores that do not fit are streamed in blocks. "
         f"Default: half the physical memory ({default_memory_budget_gb():.1f} GB here).")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")]
HeadsPrecision = Annotated[HeadsPrecisionMode, typer.Option(
    help="Matrix products in bf16 or fp32; auto: bf16 on a CUDA GPU with bf16 or a CPU with AMX/AVX512-BF16, "
         "else fp32. Weights, loss and metrics stay fp32.")]
Threads = Annotated[int | None, typer.Option(
    help="CPU threads for training; 0: torch's default (all cores). Default 1: on a busy machine threads "
         "that wait for each other made training 1.3-4.7x slower, while a second thread gained at most "
         "1.45x on an idle one (docs/performance.md).")]


# The options every training recipe's command takes, in --help order, each declared once: Typer reads a
# command's options from its signature, so `training_options` splices each group into the signature of
# train-heads, sweep and finetune wavlm where a parameter of the group's name stands.
OBJECTIVE_OPTIONS = (
    ("no_undersample", NoUndersample, not TRAINING.undersample),
    ("ox", Ox, TRAINING.ox),
    ("gender_weight", GenderWeight, TRAINING.gender_weight),
    ("speaker_weight", SpeakerWeight, TRAINING.speaker_weight),
    ("aam_margin", AamMargin, TRAINING.aam_margin),
    ("aam_scale", AamScale, TRAINING.aam_scale),
    ("select", Select, TRAINING.select),
    ("balanced_trials", BalancedTrials, TRAINING.balanced_trials),
    ("balanced_per_class", BalancedPerClass, TRAINING.balanced_per_class),
    ("hidden", Hidden, TRAINING.hidden),
    ("dropout", Dropout, TRAINING.dropout),
)
TASK_OPTIONS = (
    ("task", Task, TRAINING.task),
    ("classes", Classes, TRAINING.classes),
    ("class_weights", ClassWeights, TRAINING.class_weights),
    ("class_loss_weight", ClassLossWeight, TRAINING.class_loss_weight),
)
OPTION_GROUPS = {"objective": OBJECTIVE_OPTIONS, "task_options": TASK_OPTIONS}


def training_options(command):
    """`command` with the OPTION_GROUPS spliced into its signature where its parameters `objective` and
    `task_options` stand (the same place in --help); it receives each group's values as a dict under
    that name, which recipe_config reads."""
    import functools
    import inspect

    signature = inspect.signature(command, eval_str=True)
    params = []
    for param in signature.parameters.values():
        if param.name in OPTION_GROUPS:
            params += [inspect.Parameter(name, param.kind, default=default, annotation=annotation)
                       for name, annotation, default in OPTION_GROUPS[param.name]]
        else:
            params.append(param)

    @functools.wraps(command)
    def with_groups(**options):
        for group, members in OPTION_GROUPS.items():
            options[group] = {name: options.pop(name) for name, _, _ in members}
        return command(**options)

    with_groups.__signature__ = signature.replace(parameters=params)
    with_groups.__annotations__ = {p.name: p.annotation for p in params}
    return with_groups


def recipe_config(config_class, options: dict):
    """A recipe's config (TrainHeadsConfig, FinetuneConfig) from a command's options (its locals()): the
    same names, but for --out, --no-undersample, --memory-budget and the repeated --features."""
    import dataclasses

    options = {**options, **{k: v for group in OPTION_GROUPS for k, v in options.get(group, {}).items()}}
    renamed = {**options, "out": options["out_dir"], "undersample": not options["no_undersample"]}
    if "features" in options:
        renamed["features"] = tuple(options["features"])
    if "memory_budget" in options:
        renamed["memory_budget_gb"] = options["memory_budget"]
    # A field the command does not take (e.g. --task, which sweep and finetune do not have yet) keeps its default.
    return config_class(**{f.name: renamed[f.name] for f in dataclasses.fields(config_class) if f.name in renamed})


def heads_config(options: dict):
    """A TrainHeadsConfig from the options of `train-heads` or `sweep` (their locals())."""
    return recipe_config(HEADS, options)


# Every command that writes output files: one option, one wording (outputs.py, docs/troubleshooting.md).
OverwriteFiles = Annotated[bool,
                           typer.Option("--overwrite", help="Replace output files that exist (refused otherwise).")]
