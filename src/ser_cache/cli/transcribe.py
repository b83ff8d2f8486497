"""The `transcribe` command: Whisper transcripts for the utterances that have none (Test3)."""

from __future__ import annotations

from pathlib import Path

import typer

from ser_cache.cli.app import KNOWN_ERRORS, app, err, fail, guarded, writable
from ser_cache.cli.shared_options import TRANSCRIBE_MODEL, TranscribePrecisionMode as TranscribePrecision

KNOWN_ERRORS.append("ser_cache.features.transcript_table:TranscribeError")


@app.command()
def transcribe(
    files: list[Path] | None = typer.Argument(None, metavar="FILE",
                                              help="Audio files to transcribe (instead of --data)."),
    out: Path = typer.Option(..., "--out", "-o",
                             help="The table to write: FileName,text (a .csv; settings in OUT.json)."),
    model: str = typer.Option(TRANSCRIBE_MODEL, "--model", "-m",
                              help="Whisper: short name, Hugging Face id, or local directory."),
    data: Path | None = typer.Option(None, "--data", "-d", help="MSP-Podcast directory or CSV manifest."),
    split: list[str] | None = typer.Option(None, "--split", "-s", metavar="SPLIT",
                                           help="Split(s) of --data (repeatable); default all."),
    all_rows: bool = typer.Option(False, "--all",
                                  help="Transcribe every utterance, not only those without a transcript."),
    beams: int = typer.Option(1, help="Beam search width; 1 is greedy."),
    max_new_tokens: int | None = typer.Option(None, help="Tokens generated per clip at most (default 224)."),
    batch_seconds: float = typer.Option(300.0,
                                        help="Audio seconds per batch (clips sorted by length; at most 64 clips)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    precision: TranscribePrecision = typer.Option("auto", help="auto: bf16 autocast on CUDA, fp32 on CPU."),
    overwrite: bool = typer.Option(False, help="Start again when OUT was made with other settings."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    shard: str | None = typer.Option(None, "--shard", metavar="I/N|slurm",
                                     help="Only part I of N of the batches (0-based; 'slurm': from the job array's "
                                          "SLURM_ARRAY_TASK_* variables); the last shard to finish writes OUT."),
) -> None:
    """Transcribe utterances with Whisper (English, no timestamps) into a FileName,text table (resumable).

    By default only the utterances without a transcript (e.g. MSP-Podcast's Test3) are transcribed;
    rerun the same command after an interruption to continue where it stopped. With --shard I/N,
    N processes (a Slurm job array) share the work and together write the table one process writes.
    """
    from ser_cache.data.transcripts import sidecar_path
    from ser_cache.features.transcribe import TranscribeConfig, report_path, transcribe as run_transcribe
    from ser_cache.infra.outputs import given, local_folder
    from ser_cache.infra.shards import ShardError, parse_shard

    try:
        part = parse_shard(shard)
    except ShardError as exc:
        fail(str(exc))
    inputs = given("--data", data) + local_folder("--model", model) + given("the audio file", *(files or ()))
    # A table with its settings file beside it is this command's own: a rerun continues it (or refuses other settings).
    writable(out, "--out", inputs=inputs, overwrite=overwrite or sidecar_path(out).is_file())
    cfg = TranscribeConfig(out=out, model=model, data=data, splits=tuple(split or ()), files=tuple(files or ()),
                           all=all_rows, beams=beams, max_new_tokens=max_new_tokens, batch_seconds=batch_seconds,
                           device=device, precision=precision, overwrite=overwrite, progress=progress,
                           shard=part)
    r = guarded(run_transcribe, cfg)
    left_out = (f", {r.have_transcript} left out (they have a transcript; --all includes them)"
                if r.have_transcript else "")
    # A rerun with every row done transcribed nothing: no rates to report ("0.00 utt/s").
    if r.transcribed:
        rates = (f"{r.wall_seconds:.1f} s — {r.utterances_per_second:.2f} utt/s, real-time factor "
                 f"{r.real_time_factor:.4f} ({r.audio_seconds:.0f} s of audio)")
    elif r.shard:
        rates = "nothing to do: every row of this shard was done before"
    else:
        rates = "nothing to do: every selected utterance was transcribed before"
    who = f"[bold]{r.out}[/]" + (f", shard {r.shard}" if r.shard else "")
    if r.complete:
        state = f"the table is complete: {r.rows} rows" if r.shard else f"{r.rows} rows in the table"
    else:
        left = ", ".join(f"{label} ({n} rows)" for label, n in r.pending_by_shard.items())
        state = (f"the table is not written yet: shard(s) {left} still have rows to transcribe (the last shard "
                 f"to finish writes it); {r.rows} rows done so far")
    err.print(
        f"{who}: {r.transcribed} transcribed, {r.skipped} skipped as already done, {r.failed} failed"
        f"{left_out}; {state}. {rates}",
        highlight=False, soft_wrap=True,
    )
    if r.failed and r.report:
        err.print(f"[yellow]{r.failed} utterance(s) could not be read; see {r.report}[/]", highlight=False,
                  soft_wrap=True)
    elif r.failed:
        err.print(f"[yellow]{r.failed} utterance(s) could not be read; the last shard lists them in "
                  f"{report_path(r.out)}[/]", highlight=False, soft_wrap=True)
