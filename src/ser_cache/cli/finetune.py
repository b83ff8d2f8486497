"""`finetune wavlm`: fine-tune WavLM end to end with the stage-two heads (docs/finetune.md)."""

from __future__ import annotations

from pathlib import Path

import typer

from ser_cache.cli import shared_options as shared
from ser_cache.cli.app import app, fail, guarded, log_to_stderr, out, writable
from ser_cache.cli.stage_two import scores_table

DEFAULT_LR = 5e-5  # the paper's, for WavLM and the heads alike

finetune_app = typer.Typer(no_args_is_help=True, help="Fine-tune an encoder end to end with the stage-two heads.")
app.add_typer(finetune_app, name="finetune")


@finetune_app.command("wavlm")
@shared.training_options
def wavlm(
    data: Path = typer.Option(..., "--data", "-d",
                              help="MSP-Podcast directory or CSV manifest (audio, labels, splits)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Run directory to create (or continue with --resume)."),
    model: str = typer.Option("wavlm-large", help="WavLM short name, Hugging Face id or local directory."),
    text_features: Path | None = typer.Option(None,
                                              help="Cached text store (e.g. roberta-large.zarr) joined to the audio: "
                                                   "MMWavLM."),
    speaker_features: Path | None = typer.Option(None,
                                                 help="Cached x-vector store joined as an input (kept out while the "
                                                      "speaker head is on)."),
    train_split: shared.TrainSplit = shared.TRAINING.train_split,
    dev_split: shared.DevSplit = shared.TRAINING.dev_split,
    epochs: shared.Epochs = shared.TRAINING.epochs,
    lr: float | None = typer.Option(None, "--lr", help="AdamW learning rate of WavLM and of the heads alike: "
                                       "sets --lr-encoder and --lr-heads (either, given, wins)."),
    lr_encoder: float | None = typer.Option(None, help="AdamW learning rate of WavLM (default: --lr, else the "
                                               "paper's 5e-5)."),
    lr_heads: float | None = typer.Option(None, help="AdamW learning rate of layer weights, convolutions and heads "
                                             "(default: --lr, else the paper's 5e-5)."),
    weight_decay: shared.WeightDecay = shared.TRAINING.weight_decay,
    batch_seconds: float = typer.Option(160.0,
                                        help="Audio seconds per batch, summed over all GPUs (the paper gives no batch "
                                             "size)."),
    grad_accum: int = typer.Option(1, help="Batches per optimizer step."),
    max_seconds: float = typer.Option(15.0, help="Crop every clip to its first seconds (paper: 15)."),
    freeze_cnn: bool = typer.Option(True, "--freeze-cnn/--train-cnn",
                                    help="Freeze WavLM's CNN feature encoder (default) or train it too."),
    gradient_checkpointing: bool = typer.Option(False,
                                                help="Recompute WavLM's activations in the backward pass: less memory, "
                                                     "~30% slower."),
    precision: shared.EncoderPrecisionMode = typer.Option(shared.TRAINING.precision,
                                                          help="auto: bf16 on CUDA, fp32 on CPU; fp16 with loss "
                                                               "scaling."),
    seed: int = typer.Option(shared.TRAINING.seed,
                             help="Seed for initialisation, sampling, dropout and the balanced-CCC draws."),
    objective: dict | None = None,  # --no-undersample ... --dropout: shared.OBJECTIVE_OPTIONS
    conv_dim: int = typer.Option(shared.TRAINING.conv_dim,
                                 help="Channels of the point-wise convolutions (paper: 256)."),
    conv_dropout: float = typer.Option(shared.TRAINING.conv_dropout,
                                       help="Dropout between the point-wise convolutions (the authors': 0.1)."),
    layerdrop: float | None = typer.Option(None, help="Probability of skipping each WavLM layer in training "
                                                         "(default: the checkpoint's, 0.1 for wavlm-large, as the "
                                                         "authors)."),
    init_from: Path | None = typer.Option(None, help="Start from the weights of a fine-tuned run (e.g. one made by "
                                                        "`ser-cache import vox-profile`)."),
    workers: int | None = typer.Option(None, help="Processes decoding audio per rank; 0 decodes in the training "
                                                     "process (default: up to 4 on a GPU, 0 on a CPU)."),
    device: str = typer.Option(shared.TRAINING.device,
                               help="auto, cpu, cuda, cuda:N (under torchrun each rank takes its own GPU)."),
    threads: int | None = typer.Option(shared.TRAINING.threads, help="CPU threads for torch (default: torch's)."),
    resume: bool = typer.Option(False, help="Continue the unfinished run in --out from its last checkpoint."),
    overwrite: bool = typer.Option(shared.TRAINING.overwrite, help="Delete the run in --out and start again."),
    progress: shared.Progress = shared.TRAINING.progress,
    tensorboard: shared.TensorBoard = shared.TRAINING.tensorboard,
    task_options: dict | None = None,  # --task ... --class-loss-weight: shared.TASK_OPTIONS
) -> None:
    """Fine-tune WavLM (all hidden states weighted, point-wise convolutions, mean pooling) with the
    stage-two heads; write a run directory that evaluate, predict and ensemble use like any other.

    Multi-GPU: torchrun --nproc-per-node 8 -m ser_cache finetune wavlm ...
    """
    from ser_cache.finetune.loop import finetune_wavlm
    from ser_cache.finetune.options import FinetuneConfig
    from ser_cache.infra.outputs import given, local_folder

    inputs = (given("--data", data) + local_folder("--model", model) + given("--text-features", text_features)
              + given("--speaker-features", speaker_features) + given("--init-from", init_from))
    writable(out_dir, "--out", folder=True, inputs=inputs, replaced=overwrite)
    if tensorboard is not None:
        writable(tensorboard, "--tensorboard", folder=True, inputs=inputs)
    from ser_cache.system.epoch_log import tensorboard_problem

    if tensorboard is not None and tensorboard_problem():
        fail(tensorboard_problem())
    lr_encoder = lr_encoder if lr_encoder is not None else (lr if lr is not None else DEFAULT_LR)
    lr_heads = lr_heads if lr_heads is not None else (lr if lr is not None else DEFAULT_LR)
    log_to_stderr()
    cfg = shared.recipe_config(FinetuneConfig, locals())  # lr_encoder and lr_heads as resolved above
    result = guarded(finetune_wavlm, cfg)
    if result is None or not _is_main():
        return
    out.print(scores_table(f"{result.run_dir} — {cfg.dev_split}, epoch {result.best_epoch} of {cfg.epochs}",
                           result.metrics))


def _is_main() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"
