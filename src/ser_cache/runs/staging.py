"""Writing a run directory into place, and undoing an interrupted `--overwrite`: the target checked
(check_run_target), the run written beside it and renamed in (staged_run_dir), leftovers of a killed
command put back or removed (recover_staging).

Why the whole (heads) directory is written beside the target and renamed into place: a run killed in
epoch 40 must not leave a directory that looks finished, and `--overwrite` must not destroy the
old run before the new one exists. A kill between the two renames of an --overwrite (old run aside,
new run in) leaves `.NAME.replaced-PID` and `.NAME.training-PID` beside NAME: the next command on
NAME puts the old run back (`recover_staging`), as if the interrupted command had not run. Single
files written later (eval_<split>.json) go through a temporary file and os.replace for the same reason.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from ser_cache.runs.layout import RunError, is_run_dir, is_unfinished_run

log = logging.getLogger(__name__)


def check_run_target(path: str | Path, overwrite: bool, *, resumable: bool = False) -> None:
    """Refuse a target that exists (unless overwrite), and never overwrite a folder that is not a run.

    `resumable`: the command has --resume, so the messages offer it.
    """
    path = Path(path)
    recover_staging(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise RunError(f"--out {path}: exists and is not a directory")
    if not any(path.iterdir()):
        return  # an empty folder is as good as none
    unfinished = is_unfinished_run(path)
    if not (is_run_dir(path) or unfinished):
        raise RunError(f"--out {path}: exists and is not a ser-cache run directory; choose another --out")
    if not overwrite:
        if unfinished:
            hint = "pass --resume to continue it, " if resumable else ""
            raise RunError(f"--out {path}: an unfinished run is there; {hint}--overwrite to start again, "
                           "or choose another --out")
        raise RunError(f"--out {path}: a run already exists there; pass --overwrite to replace it, or choose another "
                       "--out")


STAGES = ("training", "replaced")  # .NAME.training-PID: the run being written; .NAME.replaced-PID: the old one


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def staging_leftovers(path: str | Path) -> list[tuple[str, Path]]:
    """(stage, folder) of every `.NAME.training-PID` / `.NAME.replaced-PID` beside `path` whose process has ended."""
    path = Path(path)
    prefix = f".{path.name}."
    found = []
    try:
        names = sorted(p.name for p in path.parent.iterdir() if p.name.startswith(prefix))
    except OSError:
        return []
    for name in names:
        stage, _, pid = name[len(prefix):].rpartition("-")
        if stage in STAGES and pid.isdigit() and not _alive(int(pid)):
            found.append((stage, path.parent / name))
    return found


def recover_staging(path: str | Path) -> None:
    """Undo what an `--overwrite` killed between its renames left beside `path` (see staged_run_dir):
    with no run at `path`, its old run (`.NAME.replaced-PID`) goes back; then the unfinished new run
    (`.NAME.training-PID`) and any old run kept aside are removed. Each step is logged. Folders of a
    process still running are left alone."""
    path = Path(path)
    # A symlinked --out: beside the link (an older version's leftovers) and beside its target.
    for target in dict.fromkeys([path, Path(os.path.realpath(path))]):
        leftovers = staging_leftovers(target)
        replaced = [p for stage, p in leftovers if stage == "replaced"]
        if replaced and not os.path.lexists(target):
            newest = max(replaced, key=lambda p: p.lstat().st_ctime)  # the rename aside set its ctime
            os.replace(newest, target)
            log.warning("%s: restored the run an interrupted --overwrite had moved aside (%s); the new run "
                        "was never put in place, so this is the run as it was before that command", target, newest.name)
            replaced.remove(newest)
        for p in replaced:
            _remove(p)
            log.warning("%s: removed %s, a run an earlier --overwrite replaced (that command ended before removing it)",
                        target, p.name)
        for p in (p for stage, p in leftovers if stage == "training"):
            _remove(p)
            log.warning("%s: removed %s, the unfinished folder of a run that was interrupted", target, p.name)


def _staging_target(path: Path) -> Path:
    """Where the run goes: a symlinked --out keeps its link and gets its target replaced, as writing
    through a link does; replacing the link itself would leave the old run, unnamed, where it pointed."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


@contextmanager
def staged_run_dir(path: str | Path, overwrite: bool):
    """Yield a temporary directory beside `path`; on success it replaces `path` in one rename.

    On failure the temporary directory is removed and `path` is left as it was. A symlink at `path`
    stays: the folder it points to is replaced.
    """
    check_run_target(path, overwrite)
    path = _staging_target(Path(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.training-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        check_run_target(path, overwrite)  # another process may have written there meanwhile
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno == errno.ENOSPC:  # name the run the user asked for, not the staging folder
            raise OSError(errno.ENOSPC, exc.strerror or "No space left on device", str(path)) from exc
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.lexists(path):
        old = path.with_name(f".{path.name}.replaced-{os.getpid()}")
        if os.path.lexists(old):
            _remove(old)
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:  # the old run goes back; only a kill -9 here needs recover_staging
        if old is not None:
            os.replace(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        _remove(old)
