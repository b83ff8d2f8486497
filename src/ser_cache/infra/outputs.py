"""Output locations checked before any work: a command that would run for an hour and then find it
cannot write its result should say so at once, naming its option.

One rule for every command that writes (docs/troubleshooting.md, "Outputs"):
1. the output can be written (a file where a file is wanted, a folder that can be made);
2. it is not one of the command's inputs (the same file after resolving links and `..`, or the
   same inode), nor inside a run directory, store or corpus folder the command reads: writing
   there would destroy or damage what the command is reading. --overwrite does not lift this;
3. an existing output file is not replaced unless the command was given --overwrite.
Folder outputs with a life of their own (a run directory, a store, a sweep) keep their own rules
for what is already there (runs.check_run_target, extract's settings check); 1 and 2 apply to them.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


class OutputError(Exception):
    """An output location cannot be written; the message names the option and the path."""


@dataclass(frozen=True)
class Input:
    """A path a command reads, and how a refusal names it ("--data corpus", "the audio file a.wav").

    A folder input (a run, a store, a corpus) takes nothing written inside it but `own`: the files the
    command itself keeps there by design (evaluate's RUN/eval_<split>.json, plot run's RUN/curves.png).
    """

    path: Path
    label: str
    own: tuple[Path, ...] = ()


def given(option: str, *paths) -> list[Input]:
    """Inputs named by an option as the user gave them ("--data corpus"); None and "" are left out."""
    return [Input(Path(p), f"{option} {p}") for p in paths if p is not None and str(p) != ""]


def local_folder(option: str, name) -> list[Input]:
    """A --model or checkpoint given as a local folder is an input; a hub id is not a path."""
    return given(option, name) if name is not None and Path(str(name)).is_dir() else []


def run_inputs(run, *, features_dir=None, own: Iterable = ()) -> list[Input]:
    """A run directory and the feature stores it reads its features from (config.json's "inputs", or the
    same names in `features_dir`). An unreadable config.json adds no store: reading the run reports it."""
    run = Path(run)
    found = [Input(run, f"the run {run}", own=tuple(Path(p) for p in own))]
    try:
        config = json.loads((run / "config.json").read_text(encoding="utf-8"))
        records = [r for r in config.get("inputs", []) if isinstance(r, dict) and r.get("path")]
    except (OSError, ValueError, AttributeError, TypeError):
        return found
    for record in records:
        path = Path(str(record["path"]))
        store = Path(features_dir) / path.name if features_dir is not None else path
        found.append(Input(store, f"the store {store} that the run reads"))
    return found


def _nearest_existing(path: Path) -> Path:
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _same(a: Path, b: Path) -> bool:
    """One file: the same path once links and `..` are resolved, or the same inode (a hard link)."""
    if _real(a) == _real(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _inside(path: Path, folder: Path) -> bool:
    return _real(folder) in _real(path).parents


def refuse_inputs(path, option: str, inputs: Iterable[Input], *, contains: bool = False) -> None:
    """Raise OutputError when `path` is one of `inputs` or lies inside a folder input (but for the
    input's `own` files). `contains`: `path` is a folder that will be replaced as a whole, so no input
    may lie inside it either."""
    path = Path(path)
    for i in inputs:
        if _same(path, i.path):
            raise OutputError(f"{option} {path}: is also an input ({i.label}); writing it would destroy that input; "
                              f"choose another {option}")
        if _inside(path, i.path) and not any(_same(path, o) for o in i.own):
            raise OutputError(f"{option} {path}: lies inside an input ({i.label}); writing there could damage it; "
                              f"choose another {option}")
        if contains and _inside(i.path, path):
            raise OutputError(f"{option} {path}: holds an input ({i.label}), which replacing it would destroy; "
                              f"choose another {option}")


def refuse_existing(paths: Iterable, option: str, given_path) -> None:
    """Raise OutputError for the first of `paths` that exists: replacing it needs --overwrite."""
    for p in paths:
        p = Path(p)
        if os.path.lexists(p):
            where = f"{given_path}:" if Path(given_path) == p else f"{given_path}: {p}"
            raise OutputError(f"{option} {where} exists; pass --overwrite to replace it, or choose another {option}")


def check_writable(path: str | Path, option: str, *, folder: bool = False, inputs: Iterable[Input] = (),
                   overwrite: bool | None = None, files: Iterable[str | Path] = (), replaced: bool = False) -> None:
    """Raise OutputError unless `path` can be written: a file (or, with `folder`, a folder to
    create or write into) whose missing parent folders can be made, that is none of `inputs` nor
    inside one, and (with `overwrite` False) no file it would replace exists.

    `files`: what the command writes besides `path` itself (the files it puts into a folder output, a
    figure's SVG beside its PNG); they are checked against `inputs` and for existing files too. A folder
    output without `files` is checked as a whole, and with `replaced` (a run directory replaced by
    --overwrite) no input may lie inside it. `overwrite` None: the command has its own rule for what
    is already there.

    Nothing is left behind: the check creates and removes one empty file in the nearest folder
    that exists, the only test that the file system, not only the permission bits, agrees
    (root passes every permission check, a read-only mount or /proc refuses the file).
    """
    path = Path(path)
    inputs = list(inputs)
    files = [Path(f) for f in files]

    def refuse(reason: str) -> None:
        raise OutputError(f"{option} {path}: cannot write there ({reason})")

    if path.is_dir() and not folder:
        refuse("it is a folder; expected a file name")
    if path.exists() and not path.is_dir() and folder:
        refuse("it is a file; expected a folder")
    target = path if folder else path.parent
    base = _nearest_existing(target.absolute())
    if not base.is_dir():
        refuse(f"{base} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".ser-cache-write-check-", dir=base)
    except OSError as exc:
        refuse(f"cannot create a file in {base}: {exc.strerror or exc}")
    os.close(fd)
    os.unlink(probe)
    written = files if folder and files else [path, *files]
    for p in written:
        refuse_inputs(p, option, inputs, contains=replaced and p == path)
    if overwrite is False:
        refuse_existing([p for p in written if not (folder and p == path)], option, path)
