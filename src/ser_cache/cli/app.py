"""The `ser-cache` command line: each command builds a typed config and calls one library function.

Commands live in one module per stage (stage_one: extract, info, export); this module holds the
app and the one place where failures become a clear line and an exit code (`one_line_failures`):
the app's group runs every command, sub-commands included, inside it, so a new command inherits
it without doing anything.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import traceback
from collections.abc import Iterator

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from ser_cache.infra.atomic import is_disk_full
from ser_cache.version import __version__

# pyproject.toml names no issue page; when it does, put its address here.
ISSUES = "the project's issue tracker"
INTERRUPTED = "interrupted — rerun the same command to continue (rows already written are kept)"

err = Console(stderr=True)
out = Console()


def log_to_stderr() -> None:
    """Show the library's info lines (rows left out and why, where features came from) on stderr."""
    from rich.logging import RichHandler

    logger = logging.getLogger("ser_cache")
    if not any(isinstance(h, RichHandler) for h in logger.handlers):
        handler = RichHandler(console=err, show_time=False, show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def fail(message: str, code: int = 2) -> None:
    # Escaped: a path or a reason may hold brackets ("[Errno 28]", "take[2].wav") that rich would eat as markup.
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


# The library's error classes that become one line: a class, or "module:Class" for a module the
# command imports only when it runs, so that importing the CLI (`--help`, `--version`) loads no
# library module and no torch. A class whose module was never imported cannot have been raised.
KNOWN_ERRORS: list[type[Exception] | str] = []


def _known_errors() -> tuple[type[Exception], ...]:
    import sys

    from ser_cache.data.audio import AudioError
    from ser_cache.data.records import CorpusError
    from ser_cache.encoders import EncoderError
    from ser_cache.features.errors import ExtractError, StoreError
    from ser_cache.infra.outputs import OutputError
    from ser_cache.infra.runtime import DeviceError

    named = []
    for known in KNOWN_ERRORS:
        if isinstance(known, str):
            module, _, name = known.partition(":")
            known = getattr(sys.modules.get(module), name, None)  # None: not imported (or not yet defined)
        if known is not None:
            named.append(known)
    return (AudioError, CorpusError, DeviceError, EncoderError, ExtractError, OutputError, StoreError, *named)


def disk_full_message(path) -> str:
    where = f"writing {path}" if path else "writing the output"
    return f"no space left on device {where}; nothing written before was lost; free space and rerun to continue"


@contextlib.contextmanager
def one_line_failures() -> Iterator[None]:
    """Known failures become one line (exit 2), Ctrl-C one line (exit 130); anything else is a bug:
    one line that says so, then the traceback (exit 1).

    Typer's own exits and usage errors pass through untouched.
    """
    try:
        yield
    except (typer.Exit, typer.Abort, typer.TyperException):
        raise
    except KeyboardInterrupt:
        err.print(f"[bold red]{INTERRUPTED}[/]", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    except Exception as exc:
        if isinstance(exc, _known_errors()):
            fail(str(exc))
        if is_disk_full(exc):
            fail(disk_full_message(getattr(exc, "filename", None)))
        if isinstance(exc, OSError) and exc.errno == errno.EPIPE:
            raise  # the reader went away (`| head`): typer ends quietly
        if isinstance(exc, OSError) and exc.filename:
            names = f"{exc.filename} → {exc.filename2}" if exc.filename2 else str(exc.filename)
            fail(f"{names}: {exc.strerror or type(exc).__name__}")
        message = str(exc).splitlines()[0] if str(exc) else ""
        err.print(f"[bold red]internal error:[/] {escape(f'{type(exc).__name__}: {message}')} — this is a bug in "
                  f"ser-cache {__version__}; please report it at {ISSUES} with the traceback below",
                  highlight=False, soft_wrap=True)
        err.print(traceback.format_exc().rstrip(), markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


# Below this many columns `--help` is click's plain layout: rich's option table gives the
# description what its five name and type columns leave, about 20 characters at 80 columns.
RICH_HELP_COLUMNS = 120


def _plain_help(cmd) -> None:
    """Click's own help layout for `cmd` and every command under it (names, then wrapped text)."""
    if hasattr(cmd, "rich_markup_mode"):
        cmd.rich_markup_mode = None
    for sub in getattr(cmd, "commands", {}).values():
        _plain_help(sub)


def _no_list_types(cmd) -> None:
    """Hide the Python type typer prints after a variadic argument (`FILE <list[Path]>`): its
    metavar (FILE, CSV) says what it takes. Options set a metavar instead (SPLIT, STORE)."""
    for param in getattr(cmd, "params", []):
        if param.param_type_name == "argument" and param.nargs == -1 and param.metavar:
            param.display_type_rich = lambda ctx: None
    for sub in getattr(cmd, "commands", {}).values():
        _no_list_types(sub)


class _GuardedGroup(TyperGroup):
    """The app's group: every command (and sub-group) runs inside `one_line_failures`."""

    def main(self, *args, **kwargs):
        import shutil

        if shutil.get_terminal_size().columns < RICH_HELP_COLUMNS:
            _plain_help(self)
        _no_list_types(self)
        return super().main(*args, **kwargs)

    def invoke(self, ctx):
        with one_line_failures():
            return super().invoke(ctx)


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, cls=_GuardedGroup,
                  help="Speech emotion recognition with cached encoder features: extract once, train heads in minutes.")


def _print_version(value: bool) -> None:
    if value:
        out.print(f"ser-cache {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    pass


def guarded(fn, *args, **kwargs):
    """Run a library call after checking the environment; its failures become one line (see `one_line_failures`)."""
    from ser_cache.infra.environment import torchaudio_problem

    problem = torchaudio_problem()
    if problem:
        fail(problem)
    with one_line_failures():
        return fn(*args, **kwargs)


def writable(path, option: str, *, folder: bool = False, **rule) -> None:
    """Fail now, before any work, when the output `path` of `option` cannot be written, is one of the
    command's inputs or inside one, or would replace a file without --overwrite (outputs.check_writable:
    `rule` takes its inputs, overwrite, files and replaced)."""
    from ser_cache.infra.outputs import check_writable

    with one_line_failures():
        check_writable(path, option, folder=folder, **rule)


def main() -> None:
    app()

