"""The `demo` command: the whole pipeline on a synthetic corpus, offline, in under a minute."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ser_cache.cli import KNOWN_ERRORS, app, err, guarded, out, writable
from ser_cache.demo import DemoError

KNOWN_ERRORS.append(DemoError)


@app.command()
def demo(
    workdir: Optional[Path] = typer.Option(
        None, help="Keep the corpus, models, stores and run here (default: a temporary folder, removed)."),
    seed: int = typer.Option(0, help="Seed of the corpus, the tiny models and training."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Synthesise a small corpus and tiny models, extract features, train heads, print the Development CCC.

    Runs offline on a CPU in under a minute: the first thing to try after installing.
    """
    from ser_cache.cli.stage_two import scores_table
    from ser_cache.demo import run_demo

    if workdir is not None:
        writable(workdir, "--workdir", folder=True)
    result = guarded(run_demo, workdir, seed=seed, progress=progress)
    s = result["seconds"]
    err.print(f"synthesised the corpus in {s['synthesise']:.1f} s, built the models in {s['models']:.1f} s "
              f"(text: {result['text_model']}), extracted in {s['extract']:.1f} s, trained in {s['train']:.1f} s",
              highlight=False)
    metrics = result["metrics"]
    out.print(scores_table(f"{metrics['split']} (best epoch {metrics['best_epoch']})", metrics))
    if result["run_dir"] is not None:
        err.print(f"run written to {result['run_dir']}; try `ser-cache evaluate {result['run_dir']} "
                  f"--data {result['workdir'] / 'corpus'} --split Test1`", highlight=False)
