"""Where a run came from: the software that trained it and the labels it learned from.

`training.run_config`, the one writer of config.json for `train-heads`, `sweep` members and
`finetune wavlm`, records `record(data)` as "provenance": the Python, torch and transformers
versions, the ser-cache package's git commit (when it runs from a git checkout), the corpus as
an absolute path, and its label file with a sha256 digest. `absolute_paths` makes the paths of
the recorded options absolute, so that a run read elsewhere (or rerun with `train-heads --config`)
names the same files. Nothing reads provenance back as a setting: a run written before it existed
loads as before.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

# The options of a run that name files or folders (train-heads: data, features; finetune wavlm:
# data and the cached stores, the run it starts from). A model is a name or a folder, so it stays as given.
PATH_OPTIONS = ("data", "features", "text_features", "speaker_features", "init_from")


def absolute_paths(options: dict) -> dict:
    """`options` with every path of PATH_OPTIONS absolute (os.path.abspath: symlinks kept, as typed)."""
    out = dict(options)
    for key in PATH_OPTIONS:
        value = out.get(key)
        if isinstance(value, (list, tuple)):
            out[key] = [os.path.abspath(v) for v in value]
        elif value is not None:
            out[key] = os.path.abspath(value)
    return out


def record(data: str | Path | None) -> dict:
    """The provenance of a run trained now on the corpus `data` (a folder or a manifest)."""
    commit, dirty = package_commit()
    labels = label_file(data) if data is not None else None
    return {
        "python": platform.python_version(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "git_commit": commit,
        "git_dirty": dirty,
        "data": None if data is None else os.path.abspath(data),
        "label_file": None if labels is None else os.path.abspath(labels),
        "label_file_sha256": None if labels is None or not labels.is_file() else file_sha256(labels),
    }


def label_file(data: str | Path) -> Path:
    """The file that holds a corpus's labels: MSP-Podcast's labels_consensus.csv, or the manifest itself."""
    from ser_cache.data.msp_podcast import MSP_LABEL_FILE

    data = Path(data)
    return data / MSP_LABEL_FILE if data.is_dir() else data


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes (hex); cached by path, size and modification time, since every
    member of a sweep records the same label file."""
    stat = os.stat(path)
    return _sha256(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def package_commit() -> tuple[str | None, bool | None]:
    """(commit, whether the package's files differ from it) when ser-cache runs from a git checkout
    that tracks this very package; (None, None) for an installed wheel, no git, or any failure.

    The check that git tracks this file keeps a checkout that merely contains an installed copy
    (a virtual environment inside someone's project) from lending its commit.
    """
    here = Path(__file__).resolve().parent

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True, timeout=10,
                              env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})

    try:
        if git("ls-files", "--error-unmatch", Path(__file__).name).returncode != 0:
            return None, None
        head = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return None, None
    if head.returncode != 0 or status.returncode != 0:
        return None, None
    return head.stdout.strip() or None, bool(status.stdout.strip())
