"""`ser-cache import vox-profile`: the challenge winner's released checkpoints as runs (vox_profile.py)."""

from __future__ import annotations

from pathlib import Path

import typer

from ser_cache.cli.app import KNOWN_ERRORS, app, guarded, out, writable

KNOWN_ERRORS.append("ser_cache.runs.vox_profile_checkpoint:ImportError_")

import_app = typer.Typer(no_args_is_help=True, help="Turn released checkpoints into ser-cache runs.")
app.add_typer(import_app, name="import")


@import_app.command("vox-profile")
def vox_profile(
    source: str = typer.Argument(..., help="Hub id (e.g. tiantiaf/wavlm-large-msp-podcast-emotion-dim) or a local "
                                          "directory with the authors' config.json and model.safetensors."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Run directory to create."),
    backbone: str | None = typer.Option(None, help="The encoder's configuration and preprocessor: short name, hub id "
                                                      "or directory (default: microsoft/wavlm-large or "
                                                      "openai/whisper-large-v3, as the checkpoint's pretrain_model "
                                                      "says)."),
    label_range: tuple[float, float] = typer.Option((1.0, 7.0), metavar="LOW HIGH",
                                                    help="The scale the sigmoid outputs in [0, 1] are mapped onto "
                                                         "(MSP-Podcast: 1 7)."),
    gender_labels: str = typer.Option("Female,Male", help="Names of the gender head's two outputs, in order."),
    overwrite: bool = typer.Option(False, help="Replace a run already in --out."),
) -> None:
    """Import a vox-profile dimensional-emotion checkpoint (the IS25-SER Task 2 winner's WavLM or Whisper
    model) as a run that predict, evaluate, ensemble and `finetune wavlm --init-from` use.

    A categorical checkpoint (their 9-way emotion_layer, e.g. tiantiaf/wavlm-large-categorical-emotion)
    becomes a class run of task both: classes A S H U F D C N O beside the A/V/D heads (docs/categorical.md)."""
    from ser_cache.cli.app import log_to_stderr
    from ser_cache.infra.outputs import local_folder
    from ser_cache.runs.vox_profile import ImportConfig, import_vox_profile

    inputs = local_folder("the checkpoint", source) + local_folder("--backbone", backbone)
    writable(out_dir, "--out", folder=True, inputs=inputs, replaced=overwrite)
    log_to_stderr()
    cfg = ImportConfig(source=source, out=out_dir, backbone=backbone, label_range=tuple(label_range),
                       gender_labels=tuple(g.strip() for g in gender_labels.split(",") if g.strip()),
                       overwrite=overwrite)
    result = guarded(import_vox_profile, cfg)
    if result is not None:
        task = "" if result.task == "attributes" else f", task {result.task} (the classes and the attributes)"
        out.print(f"imported {source} ({result.pretrain_model}) as a {result.system} run{task}: {result.run_dir}")
