"""The `check-submission` command: a Task 2 CSV checked against the split it is meant for."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import typer

from ser_cache.cli.app import KNOWN_ERRORS, app, guarded, out

KNOWN_ERRORS.append("ser_cache.runs.submission:SubmissionError")

SubmissionTask = Literal["attributes", "categorical"]  # runs.submission.SUBMISSION_TASKS


@app.command("check-submission")
def check_submission(
    file: Path = typer.Argument(..., help="The submission: FileName,EmoAct,EmoVal,EmoDom."),
    data: Path = typer.Option(..., "--data", "-d", help="MSP-Podcast directory or CSV manifest."),
    split: str = typer.Option("Test3", "--split", "-s", help="The split the submission is for."),
    task: SubmissionTask = typer.Option("attributes", "--task", metavar="TASK",
                                        help="attributes (Task 2) or categorical (Task 1: FileName,EmoClass, one of "
                                             "the 8 codes A,S,H,U,F,D,C,N per file; O and X refused)."),
) -> None:
    """Check a Task 2 submission: exact header, every utterance of the split once, values in [1, 7].

    Lists every problem with its line, then a one-line verdict; exits 0 when the file is fine,
    1 when it has a problem, 2 when it cannot be checked (no --data, an unknown split).
    """
    from ser_cache.runs.submission import check_submission as run_check

    result = guarded(run_check, file, data=data, split=split, task=task)
    for line in result.report():
        out.print(line, markup=False, highlight=False, soft_wrap=True)
    out.print(result.verdict(), markup=False, highlight=False, soft_wrap=True)
    if not result.ok:
        raise typer.Exit(1)
