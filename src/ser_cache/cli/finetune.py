"""`finetune wavlm`: fine-tune WavLM end to end with the stage-two heads (docs/finetune.md)."""

from __future__ import annotations

from pathlib import Path

import typer

from ser_cache.cli import shared_options as shared
from ser_cache.cli.app import app, fail, guarded, log_to_stderr, out, writable
from ser_cache.cli.stage_two import scores_table

DEFAULT_LR = 5e-5  # the paper's, for WavLM and the heads alike
AUTHORS_LORA_RANK = 16  # vox-profile-release's Whisper models

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
    lora: int | None = typer.Option(None, "--lora", metavar="RANK",
                                    help="Train LoRA adapters of this rank (peft) instead of the whole encoder; "
                                         "the run keeps adapters and heads only. Needs ser-cache[lora]."),
    lora_alpha: float | None = typer.Option(None, help="LoRA alpha: the update is scaled by alpha / rank "
                                                         "(default 1, loralib's, as the authors)."),
    lora_dropout: float | None = typer.Option(None, help="Dropout on the LoRA input (default 0)."),
    lora_targets: str | None = typer.Option(None, help="Comma-separated module names within each layer that get "
                                                          "adapters (default: feed_forward.intermediate_dense,"
                                                          "feed_forward.output_dense)."),
    lora_layers: str | None = typer.Option(None, help="upper-half (index > L/2, the default, the authors'), all, "
                                                         "or indices and ranges, e.g. 0,4-7."),
    freeze_encoder: bool = typer.Option(False, help="Train no encoder weight (layer weighting, convolutions and "
                                                      "heads only); the run keeps those only."),
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
    _run(locals())


@finetune_app.command("whisper")
@shared.training_options
def whisper(
    data: Path = typer.Option(..., "--data", "-d",
                              help="MSP-Podcast directory or CSV manifest (audio, labels, splits)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Run directory to create (or continue with --resume)."),
    model: str = typer.Option("whisper-large-v3", help="Whisper short name, Hugging Face id or local directory "
                                                        "(its encoder is used)."),
    text_features: Path | None = typer.Option(None, help="Cached text store joined to the audio: MMWhisper."),
    speaker_features: Path | None = typer.Option(None,
                                                 help="Cached x-vector store joined as an input (kept out while the "
                                                      "speaker head is on)."),
    train_split: shared.TrainSplit = shared.TRAINING.train_split,
    dev_split: shared.DevSplit = shared.TRAINING.dev_split,
    epochs: shared.Epochs = shared.TRAINING.epochs,
    lr: float | None = typer.Option(None, "--lr", help="AdamW learning rate of the encoder's trainable weights and "
                                                         "of the heads alike (either of the two below, given, wins)."),
    lr_encoder: float | None = typer.Option(None, help="AdamW learning rate of the adapters (or of the encoder "
                                                         "with --lora 0) (default: --lr, else 5e-5)."),
    lr_heads: float | None = typer.Option(None, help="AdamW learning rate of convolutions and heads (default: --lr, "
                                                       "else 5e-5)."),
    weight_decay: shared.WeightDecay = shared.TRAINING.weight_decay,
    batch_seconds: float = typer.Option(160.0, help="Audio seconds per batch, summed over all GPUs (in the 15-s "
                                                      "window each clip costs 15 s of compute)."),
    grad_accum: int = typer.Option(1, help="Batches per optimizer step."),
    max_seconds: float = typer.Option(15.0, help="Crop every clip to its first seconds (the window: at most 15)."),
    window: str = typer.Option("window", help="window: every clip padded or cut to 15 s, as the authors; "
                                                "trimmed: the real frames only, padding masked out."),
    states: str = typer.Option("last", help="last: the encoder's last state (the authors'); all: a learned "
                                              "softmax weighting of every layer's state."),
    freeze_cnn: bool = typer.Option(True, "--freeze-cnn/--train-cnn",
                                    help="Freeze Whisper's two input convolutions (default) or train them too "
                                         "(with --lora 0)."),
    gradient_checkpointing: bool = typer.Option(False, help="Recompute the encoder's activations in the backward "
                                                              "pass: less memory, slower."),
    precision: shared.EncoderPrecisionMode = typer.Option(shared.TRAINING.precision,
                                                          help="auto: bf16 on CUDA, fp32 on CPU; fp16 with loss "
                                                               "scaling."),
    seed: int = typer.Option(shared.TRAINING.seed,
                             help="Seed for initialisation, sampling, dropout and the balanced-CCC draws."),
    objective: dict | None = None,  # --no-undersample ... --dropout: shared.OBJECTIVE_OPTIONS
    conv_dim: int = typer.Option(shared.TRAINING.conv_dim,
                                 help="Channels of the point-wise convolutions (the authors': 256)."),
    conv_dropout: float = typer.Option(shared.TRAINING.conv_dropout,
                                       help="Dropout between the point-wise convolutions (the authors': 0.1)."),
    lora: int | None = typer.Option(None, "--lora", metavar="RANK",
                                    help="LoRA rank (peft; default 16, the authors'; 0: fine-tune the whole "
                                         "encoder). Needs ser-cache[lora]."),
    lora_alpha: float | None = typer.Option(None, help="LoRA alpha: the update is scaled by alpha / rank "
                                                         "(default 1, loralib's, as the authors)."),
    lora_dropout: float | None = typer.Option(None, help="Dropout on the LoRA input (default 0)."),
    lora_targets: str | None = typer.Option(None, help="Comma-separated module names within each layer that get "
                                                          "adapters (default: fc1,fc2)."),
    lora_layers: str | None = typer.Option(None, help="upper-half (index > L/2, the default, the authors'), all, "
                                                         "or indices and ranges, e.g. 0,4-7."),
    freeze_encoder: bool = typer.Option(False, help="Train no encoder weight (convolutions and heads only; implies "
                                                      "--lora 0)."),
    init_from: Path | None = typer.Option(None, help="Start from the weights of a fine-tuned Whisper run."),
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
    """Fine-tune Whisper's encoder as the authors' released models (LoRA rank 16 on fc1/fc2 of the upper
    half of the layers, the 15-s window, the last state, point-wise convolutions, mean pooling) with the
    stage-two heads; write a run directory that evaluate, predict and ensemble use like any other.

    Multi-GPU: torchrun --nproc-per-node 8 -m ser_cache finetune whisper ...
    """
    options = dict(locals())
    if lora is None:
        options["lora"] = 0 if freeze_encoder else AUTHORS_LORA_RANK
    options["encoder"] = "whisper"
    _run(options)


def _run(options: dict) -> None:
    """The one body of `finetune wavlm` and `finetune whisper`: a FinetuneConfig from the options, trained."""
    from ser_cache.finetune.loop import finetune_wavlm
    from ser_cache.finetune.options import FinetuneConfig
    from ser_cache.infra.outputs import given, local_folder

    data, out_dir, model, init_from = options["data"], options["out_dir"], options["model"], options["init_from"]
    inputs = (given("--data", data) + local_folder("--model", model)
              + given("--text-features", options["text_features"])
              + given("--speaker-features", options["speaker_features"]) + given("--init-from", init_from))
    writable(out_dir, "--out", folder=True, inputs=inputs, replaced=options["overwrite"])
    tensorboard = options["tensorboard"]
    if tensorboard is not None:
        writable(tensorboard, "--tensorboard", folder=True, inputs=inputs)
    from ser_cache.system.epoch_log import tensorboard_problem

    if tensorboard is not None and tensorboard_problem():
        fail(tensorboard_problem())
    lr, lr_encoder, lr_heads = options["lr"], options["lr_encoder"], options["lr_heads"]
    options["lr_encoder"] = lr_encoder if lr_encoder is not None else (lr if lr is not None else DEFAULT_LR)
    options["lr_heads"] = lr_heads if lr_heads is not None else (lr if lr is not None else DEFAULT_LR)
    if options.get("lora_targets") is not None:
        options["lora_targets"] = tuple(t.strip() for t in options["lora_targets"].split(",") if t.strip())
    log_to_stderr()
    cfg = shared.recipe_config(FinetuneConfig, options)  # lr_encoder and lr_heads as resolved above
    result = guarded(finetune_wavlm, cfg)
    if result is None or not _is_main():
        return
    out.print(scores_table(f"{result.run_dir} — {cfg.dev_split}, epoch {result.best_epoch} of {cfg.epochs}",
                           result.metrics))


def _is_main() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"
