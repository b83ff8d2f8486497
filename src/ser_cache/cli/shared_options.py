"""Options that `train-heads` and `finetune wavlm` share word for word (splits, epochs, the
objective, the sampler, the epoch selection, the heads): declared once, each command keeps its
own default."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ser_cache.rows import default_memory_budget_gb

TrainSplit = Annotated[str, typer.Option(help="Split to train on.")]
DevSplit = Annotated[str, typer.Option(help="Split to validate on and select the epoch with.")]
Epochs = Annotated[int, typer.Option(help="Epochs (paper: 50).")]
WeightDecay = Annotated[float, typer.Option(help="AdamW weight decay (AdamW's default).")]
NoUndersample = Annotated[bool, typer.Option("--no-undersample",
                                             help="Train on every row each epoch instead of m per emotion class.")]
Ox = Annotated[str, typer.Option(help="O/X handling (paper Table 5): keep, drop, only, train+dev, train+dev-nonox.")]
AamMargin = Annotated[float, typer.Option(help="AAM-softmax margin, radians.")]
AamScale = Annotated[float, typer.Option(help="AAM-softmax scale.")]
Select = Annotated[str, typer.Option(help="Epoch kept: best mean 'balanced' CCC (paper) or plain 'ccc'.")]
BalancedTrials = Annotated[int, typer.Option(help="Balanced-CCC trials.")]
BalancedPerClass = Annotated[Optional[int],
                             typer.Option(help="Utterances per emotion and trial (default: smallest class).")]
Hidden = Annotated[int, typer.Option(help="Hidden units of each 2-layer head.")]

# The options of a heads run, which `train-heads` and `sweep` (its base options) take word for word.
HeadsLr = Annotated[float, typer.Option(help="AdamW learning rate (paper: 5e-5).")]
HeadsBatchSize = Annotated[int, typer.Option(help="Rows per update (the paper does not say; 64).")]
HeadsGenderWeight = Annotated[float, typer.Option(help="Gender head loss weight alpha (paper: 1); 0 turns the head off.")]
HeadsSpeakerWeight = Annotated[float, typer.Option(
    help="Speaker head AAM loss weight beta (paper: 0.1); 0 turns the head off.")]
HeadsDropout = Annotated[float, typer.Option(help="Dropout in the heads (the authors' heads have none).")]
ConvDim = Annotated[int, typer.Option(
    help="Width of the point-wise convolutions over a frame store's frames (authors: 256).")]
ConvDropout = Annotated[float, typer.Option(help="Dropout between those convolutions (authors: 0.1).")]
MemoryBudget = Annotated[Optional[float], typer.Option(
    "--memory-budget", metavar="GB",
    help="Memory for the inputs; frame stores that do not fit are streamed in blocks. "
         f"Default: half the physical memory ({default_memory_budget_gb():.1f} GB here).")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")]
HeadsPrecision = Annotated[str, typer.Option(
    help="Matrix products in auto (bf16 on a CUDA GPU with bf16 or a CPU with AMX/AVX512-BF16, else fp32), "
         "fp32, bf16; weights, loss and metrics stay fp32.")]
Threads = Annotated[Optional[int], typer.Option(
    help="CPU threads for training; 0: torch's default (all cores). Default 1: on a busy machine threads "
         "that wait for each other made training 1.3-4.7x slower, while a second thread gained at most "
         "1.45x on an idle one (docs/performance.md).")]


def heads_config(options: dict):
    """A TrainHeadsConfig from a command's options (its locals()): the same names, but for --out,
    --no-undersample, --memory-budget and the repeated --features."""
    import dataclasses

    from ser_cache.training import TrainHeadsConfig

    renamed = {**options, "features": tuple(options["features"]), "out": options["out_dir"],
               "undersample": not options["no_undersample"], "memory_budget_gb": options["memory_budget"]}
    return TrainHeadsConfig(**{f.name: renamed[f.name] for f in dataclasses.fields(TrainHeadsConfig)})
