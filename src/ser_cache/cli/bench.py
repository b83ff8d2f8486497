"""`ser-cache bench extract`: measure extraction against the hardware, with synthetic audio and random weights."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ser_cache.cli import shared_options as shared
from ser_cache.cli.app import KNOWN_ERRORS, app, err, guarded, out, writable

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that report figures (no hub, no real data needed).")
app.add_typer(bench_app, name="bench")


@bench_app.command("extract")
def bench_extract_cmd(
    model: str = typer.Option("whisper-large-v3", "--model", "-m",
                              help="whisper-large-v3, wavlm-large, roberta-large, wavlm-base-plus-sv."),
    config: Path | None = typer.Option(None, help="An architecture config.json instead of a shipped one."),
    random_init: bool = typer.Option(False, "--random-init",
                                     help="Build the architecture with random weights (required)."),
    utterances: int = typer.Option(2000, help="Synthetic utterances (durations: mean 5.5 s, 1.5–15 s)."),
    window: shared.WindowMode = typer.Option("window", help="Whisper: 'window' (15 s) or 'trimmed'."),
    pooling: shared.PoolingMode = typer.Option("mean",
                                               help="'mean', 'mean+std' or 'frames' (every frame of the last layer)."),
    device: str = typer.Option("auto", help="Where the encoder runs: auto (a GPU if there is one), cpu, cuda, cuda:N."),
    precision: shared.EncoderPrecisionMode = typer.Option("auto", help="auto: bf16 on CUDA, fp32 on CPU."),
    batch_seconds: float = typer.Option(600.0, help="Padded audio seconds per batch."),
    workers: int | None = typer.Option(None, help="Decoding worker processes."),
    naive: bool = typer.Option(False, "--naive",
                               help="Also time the naive way (one at a time, fp32, Whisper padded to 30 s)."),
    naive_utterances: int = typer.Option(32, help="Utterances for the naive timing."),
    seed: int = typer.Option(0, help="Seed of the random weights and the synthetic corpus."),
    workdir: Path | None = typer.Option(None, help="Keep the random model and synthetic corpus here and reuse them "
                                                      "next time (same model, --utterances, --seed); default: a "
                                                      "temporary folder."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the report as JSON."),
    overwrite: shared.OverwriteFiles = False,
) -> None:
    """Run `extract`'s pipeline on synthetic audio with a full-size random-weight encoder; report throughput and \
utilisation."""
    from ser_cache.features.bench import BenchConfig, BenchError, bench_extract

    if BenchError not in KNOWN_ERRORS:
        KNOWN_ERRORS.append(BenchError)
    if workdir is not None:
        writable(workdir, "--workdir", folder=True)
    if json_out is not None:
        from ser_cache.infra.outputs import given

        writable(json_out, "--json", inputs=given("--config", config), overwrite=overwrite)
    cfg = BenchConfig(model=model, config=config, random_init=random_init, utterances=utterances, window=window,
                      pooling=pooling, device=device, precision=precision, batch_seconds=batch_seconds,
                      workers=workers, naive=naive, naive_utterances=naive_utterances, seed=seed,
                      workdir=workdir)
    report = guarded(bench_extract, cfg)
    if report is None:
        return
    table = Table(title=f"bench extract: {report.model} ({report.kind}, {report.parameters / 1e6:.0f} M parameters)",
                  show_header=False)
    rows = [
        ("device", report.device), ("precision", report.precision), ("window", report.window),
        ("utterances", f"{report.utterances} ({report.audio_seconds:.0f} s of audio)"),
        ("wall", f"{report.wall_seconds:.2f} s (set-up {report.setup_seconds:.2f} s, "
                 f"encoding loop {report.loop_seconds:.2f} s)"),
        ("throughput (loop)",
         f"{report.utterances_per_second:.4g} utt/s, {report.audio_seconds_per_second:.4g} audio-s/s"),
        ("throughput (whole call)", f"{report.end_to_end_utterances_per_second:.4g} utt/s"),
        ("model FLOPs", f"{report.tflop_per_utterance_mean:.4g} TFLOP/utt, {report.model_tflops:.4g} TFLOP/s"),
        ("measured matmul peak", f"{report.peak_tflops:.4g} TFLOP/s (best of 3)"),
        ("utilisation", f"{100 * report.utilisation:.1f} %"),
        ("peak GPU memory", "-" if report.peak_gpu_memory_gib is None else f"{report.peak_gpu_memory_gib:.1f} GiB"),
        ("time split (s)", ", ".join(f"{k} {v}" for k, v in report.time_split.items())),
        ("CPU decode per core", f"{report.cpu_decode_per_core['utterances_per_second']:.0f} utt/s, "
                                f"{report.cpu_decode_per_core['audio_seconds_per_second']:.0f} audio-s/s"),
    ]
    if report.naive:
        n = report.naive
        rows.append(("naive", f"{n.get('utterances_per_second', 0):.4g} utt/s; speed-up {n.get('speedup') or 0:.1f}×"
                     if "skipped" not in n else n["skipped"]))
    for k, v in rows:
        table.add_row(k, str(v))
    out.print(table)
    if json_out:
        from ser_cache.infra.atomic import write_text_atomic

        write_text_atomic(json_out, report.to_json())
        err.print(f"wrote {json_out}", highlight=False)
