"""The `ser-cache` command line: each command builds a typed config and calls one library function.

Commands live in one module per stage (stage_one: extract, info, export); this module holds the
app and the one place where known errors become a clear line and exit code 2.
"""

from __future__ import annotations

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Speech emotion recognition with cached encoder features: extract once, train heads in minutes.")
err = Console(stderr=True)
out = Console()


def fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


KNOWN_ERRORS: list[type[Exception]] = []


def guarded(fn, *args, **kwargs):
    """Run a library call; known errors become one clear line and exit code 2."""
    from ser_cache.environment import torchaudio_problem

    problem = torchaudio_problem()
    if problem:
        fail(problem)
    from ser_cache.audio import AudioError
    from ser_cache.corpus import CorpusError
    from ser_cache.encoders import EncoderError
    from ser_cache.extract import ExtractError
    from ser_cache.store import StoreError

    known = (AudioError, CorpusError, EncoderError, ExtractError, StoreError, *KNOWN_ERRORS)
    try:
        return fn(*args, **kwargs)
    except known as exc:
        fail(str(exc))


def main() -> None:
    app()


# Command modules register themselves on `app` when imported.
from ser_cache.cli import stage_one  # noqa: E402,F401
from ser_cache.cli import stage_two  # noqa: E402,F401
from ser_cache.cli import demo  # noqa: E402,F401
from ser_cache.cli import bench  # noqa: E402,F401
from ser_cache.cli import finetune  # noqa: E402,F401
from ser_cache.cli import imports  # noqa: E402,F401
from ser_cache.cli import transcribe  # noqa: E402,F401
from ser_cache.cli import submission  # noqa: E402,F401
