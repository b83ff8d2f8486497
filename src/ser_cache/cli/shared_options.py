"""Options that `train-heads` and `finetune wavlm` share word for word (splits, epochs, the
objective, the sampler, the epoch selection, the heads): declared once, each command keeps its
own default."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

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
