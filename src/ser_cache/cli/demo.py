"""The `demo` command: the whole pipeline on a synthetic corpus, offline, in under a minute."""

from __future__ import annotations

from pathlib import Path

import typer

from ser_cache.cli.app import KNOWN_ERRORS, app, err, guarded, out, writable

KNOWN_ERRORS.append("ser_cache.demo:DemoError")


@app.command()
def demo(
    workdir: Path | None = typer.Option(
        None, help="Keep the corpus, models, stores and run here (default: a temporary folder, removed)."),
    seed: int = typer.Option(0, help="Seed of the corpus, the tiny models and training."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Synthesise a small corpus and tiny models, extract features, train heads, print the Development scores.

    Runs offline on a CPU in under a minute: the first thing to try after installing.
    """
    from ser_cache.cli.stage_two import scores_table
    from ser_cache.demo import run_demo

    if workdir is not None:
        writable(workdir, "--workdir", folder=True)
    else:
        err.print("Working in a temporary folder, removed at the end (--workdir DIR keeps it).", highlight=False)
    result = guarded(run_demo, workdir, seed=seed, progress=progress)
    s = result["seconds"]
    err.print(f"synthesised the corpus in {s['synthesise']:.1f} s, built the models in {s['models']:.1f} s "
              f"(text: {result['text_model']}), extracted in {s['extract']:.1f} s, trained in {s['train']:.1f} s",
              highlight=False)
    metrics = result["metrics"]
    out.print(scores_table(f"{metrics['split']} (best epoch {metrics['best_epoch']})", metrics))
    classes = result["class_metrics"]
    out.print(scores_table(f"Emotion classes, {classes['split']} (best epoch {classes['best_epoch']})", classes))
    if result["run_dir"] is None:
        err.print("The corpus, models, stores and run were in a temporary folder, now removed.\n"
                  "To keep them and try the other commands on them: ser-cache demo --workdir DIR", highlight=False)
        return
    err.print(f"Run written to {result['run_dir']}; score it on Test1 with:", highlight=False, soft_wrap=True)
    for line in command_lines(["ser-cache", "evaluate", str(result["run_dir"]), "--data",
                               str(result["workdir"] / "corpus"), "--split", "Test1"], err.width):
        err.print(line, markup=False, highlight=False, soft_wrap=True)


def command_lines(words: list[str], width: int, indent: str = "  ") -> list[str]:
    """A shell command to copy, as lines that fit `width`: broken before an option with a
    backslash, each continuation indented further, so that pasting it runs the same command."""
    import shlex

    words = [shlex.quote(w) for w in words]  # a folder name with a space stays one word
    lines = [indent + words[0]]
    for i, word in enumerate(words[1:], 1):
        starts_option = word.startswith("--")
        rest = " ".join(words[i:i + 2]) if starts_option else word  # an option stays with its value
        if starts_option and len(lines[-1]) + 1 + len(rest) + 2 > width and lines[-1].strip() != words[0]:
            lines[-1] += " \\"
            lines.append(indent * 3 + word)
        else:
            lines[-1] += " " + word
    return lines
