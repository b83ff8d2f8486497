"""The run directory that `train-heads` writes and `evaluate`/`predict` read.

Layout (documented for users in docs/training.md):

    <run>/
        config.json          the full training config, every input store (path, fingerprint, model
                             id, revision, kind, settings), label min/max, gender labels, speakers,
                             the heads' constructor arguments, the ConvPool arguments of every frame
                             store ("frame_inputs"), package version
        model.safetensors    the model.FeatureModel's weights: heads ("heads.*") and the ConvPool of
                             each frame store ("pools.{i}.*"), plus the AAM-softmax class weights ("aam.*")
        metrics.json         Development scores of the kept epoch
        history.csv          one row per epoch: losses, Development CCCs, balanced CCC, gender
        predictions_dev.csv  the kept epoch's Development predictions, challenge format

A fine-tuned run (`finetune wavlm`, docs/finetune.md) has the same files plus the full encoder
weights in model.safetensors. It trains for hours, so its in-progress state lives inside the run
directory (IN_PROGRESS marker, checkpoint.safetensors, the best weights so far) and the finished files
appear at the end, config.json last; `--resume` continues such a directory.

Why the whole (heads) directory is written beside the target and renamed into place: a run killed in
epoch 40 must not leave a directory that looks finished, and `--overwrite` must not destroy the
old run before the new one exists. A kill between the two renames of an --overwrite (old run aside,
new run in) leaves `.NAME.replaced-PID` and `.NAME.training-PID` beside NAME: the next command on
NAME puts the old run back (`recover_staging`), as if the interrupted command had not run. Single
files written later (eval_<split>.json) go through a temporary file and os.replace for the same reason.
"""

from __future__ import annotations

import csv
import errno
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ser_cache.infra.atomic import atomic_path
from ser_cache.infra.atomic import write_csv_atomic

log = logging.getLogger(__name__)

RUN_FORMAT = "ser-cache-run"
RUN_FORMAT_VERSION = 2  # the newest this version reads
# A run with frame inputs needs a reader that builds their ConvPools, so it says version 2; every
# other run stays version 1, which older ser-cache versions still read.
POOLED_RUN_FORMAT_VERSION = 1
FRAME_RUN_FORMAT_VERSION = 2
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
METRICS = "metrics.json"
HISTORY = "history.csv"
DEV_PREDICTIONS = "predictions_dev.csv"
IN_PROGRESS = "in_progress.json"  # marks a run being trained in place (fine-tuning); config.json marks it done

# The challenge's submission columns, in order: arousal, valence, dominance.
ID_COLUMN = "FileName"
AVD_COLUMNS = ("EmoAct", "EmoVal", "EmoDom")
GENDER_COLUMN = "Gender"
GENDER_PROB_PREFIX = "GenderProb_"


class RunError(Exception):
    """A run directory cannot be written or read as asked; the message names the path and the reason."""


# --------------------------------------------------------------------------- atomic files


# --------------------------------------------------------------------------- the directory


def is_run_dir(path: Path) -> bool:
    try:
        return json.loads((Path(path) / CONFIG).read_text()).get("format") == RUN_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def is_unfinished_run(path: Path) -> bool:
    """A run directory being trained in place (or killed while it was): the marker, no config.json yet."""
    path = Path(path)
    return (path / IN_PROGRESS).is_file() and not (path / CONFIG).is_file()


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
        raise RunError(f"--out {path}: a run already exists there; pass --overwrite to replace it, or choose another --out")


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


def format_version(frame_inputs: dict | None) -> int:
    return FRAME_RUN_FORMAT_VERSION if frame_inputs else POOLED_RUN_FORMAT_VERSION


def save_weights(directory: Path, model, aam=None) -> Path:
    """A FeatureModel's weights ('heads.*', 'pools.*'; bare MultitaskHeads are saved as 'heads.*')
    and the AAM-softmax's ('aam.*'), in one safetensors file."""
    from ser_cache.system.model import FeatureModel

    state = model.state_dict()
    if not isinstance(model, FeatureModel):
        state = {f"heads.{k}": v for k, v in state.items()}
    return write_weights(Path(directory) / WEIGHTS, state, aam)


def write_weights(path: Path, state, aam=None) -> Path:
    """`state` (name → tensor) and the AAM-softmax's weights ('aam.*') as one safetensors file, atomically:
    the one writer of every run's weights (heads runs, fine-tuned runs, imported runs, checkpoints' best)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    if aam is not None:
        tensors.update({f"aam.{k}": v.detach().cpu().contiguous() for k, v in aam.state_dict().items()})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
    return Path(path)


def read_config(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    cfg_path = run_dir / CONFIG
    if not cfg_path.is_file():
        recover_staging(run_dir)
    if not cfg_path.is_file():
        raise RunError(f"{run_dir}: not a run directory (no {CONFIG}); train one with `ser-cache train-heads`")
    return read_config_file(cfg_path)


def read_config_file(cfg_path: Path) -> dict:
    """A run's config.json, checked: JSON, a run's format, a version this reader knows, entries' types."""
    try:
        config = json.loads(cfg_path.read_text())
    except (ValueError, OSError) as exc:
        raise RunError(f"{cfg_path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise RunError(f"{cfg_path}: expected a JSON object, found {type(config).__name__}")
    if config.get("format") != RUN_FORMAT:
        raise RunError(f"{cfg_path}: not a ser-cache run config (format={config.get('format')!r})")
    try:
        version = int(config.get("format_version", 0))
    except (TypeError, ValueError):
        raise RunError(f"{cfg_path}: \"format_version\" must be a whole number, found "
                       f"{config.get('format_version')!r}") from None
    if version > RUN_FORMAT_VERSION:
        raise RunError(f"{cfg_path}: run format version {config.get('format_version')} is newer than this "
                       f"ser-cache understands ({RUN_FORMAT_VERSION}); upgrade ser-cache")
    _check_config_types(cfg_path, config)
    return config


# What the readers of config.json take each entry to be, when present: a hand-edited value of
# another type must be refused here, naming the file, not fail as a TypeError deep in a reader.
CONFIG_TYPES: dict[str, tuple[type, ...]] = {
    "heads": (dict,),
    "train": (dict,),
    "inputs": (list,),
    "frame_inputs": (dict, type(None)),
    "gender_labels": (list, type(None)),
    "speakers": (list, dict, type(None)),
    "wavlm": (dict,),
}


def _check_config_types(cfg_path: Path, config: dict) -> None:
    names = {dict: "an object", list: "a list", type(None): "null"}
    for key, types in CONFIG_TYPES.items():
        if key in config and not isinstance(config[key], types):
            expected = " or ".join(names[t] for t in types)
            raise RunError(f"{cfg_path}: \"{key}\" must be {expected}, found {config[key]!r:.60}; "
                           "the file was edited or damaged: restore it, or train the run again")
    if isinstance(config.get("inputs"), list) and not all(isinstance(i, dict) for i in config["inputs"]):
        raise RunError(f"{cfg_path}: every entry of \"inputs\" must be an object; the file was edited or damaged")


def read_weights(weights: Path) -> dict:
    """The tensors of a run's model.safetensors; a RunError naming the file when it is truncated or damaged."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise RunError(f"{weights}: not a readable safetensors file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                       "it is truncated or damaged: copy it again from where the run was trained, or train the run again") from None


def load_run(run_dir: str | Path, *, device: str = "cpu"):
    """(model, config): the trained model.FeatureModel in eval mode on `device`, and config.json as a dict.

    The model takes {name: tensor} for pooled inputs and {name: (frames, lengths)} for frame
    inputs; a run without "frame_inputs" (every run before them) has no ConvPool, and its
    "heads.*" weights load as they always did. `model.heads` is the MultitaskHeads.
    """
    import torch

    from ser_cache.system.model import FeatureModel

    run_dir = Path(run_dir)
    config = read_config(run_dir)
    weights = run_dir / WEIGHTS
    if not weights.is_file():
        raise RunError(f"{run_dir}: {WEIGHTS} is missing; the run is incomplete")
    if "heads" not in config:
        raise RunError(f"{run_dir / CONFIG}: no \"heads\" entry; the file was edited or damaged: restore it, "
                       "or train the run again")
    try:
        model = FeatureModel.from_config(config["heads"], config.get("frame_inputs") or {})
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise RunError(f"{run_dir / CONFIG}: \"heads\" or \"frame_inputs\" do not describe a model "
                       f"({type(exc).__name__}: {exc}); the file was edited or damaged: restore it, "
                       "or train the run again") from None
    tensors = read_weights(weights)
    state = {k: v for k, v in tensors.items() if k.startswith(("heads.", "pools."))}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise RunError(f"{weights}: weights do not fit the model in {CONFIG} ({str(exc).splitlines()[0]})") from None
    model.to(torch.device(device)).eval()
    return model, config


# --------------------------------------------------------------------------- prediction files


def prediction_header(gender_labels: Sequence[str] | None) -> list[str]:
    header = [ID_COLUMN, *AVD_COLUMNS]
    if gender_labels:
        header += [GENDER_COLUMN, *(f"{GENDER_PROB_PREFIX}{g}" for g in gender_labels)]
    return header


def write_predictions(path: str | Path, ids: Sequence[str], avd: np.ndarray, *,
                      gender_labels: Sequence[str] | None = None, gender_probs: np.ndarray | None = None) -> Path:
    """The challenge format FileName,EmoAct,EmoVal,EmoDom; with gender labels and probabilities given,
    Gender and GenderProb_<label> columns after them (not part of the challenge's format)."""
    avd = np.asarray(avd, dtype=np.float64)
    if avd.shape != (len(ids), 3):
        raise ValueError(f"avd must be ({len(ids)}, 3), got {avd.shape}")
    with_gender = bool(gender_labels) and gender_probs is not None

    def rows():
        for i, uid in enumerate(ids):
            row = [uid, *(f"{x:.6f}" for x in avd[i])]
            if with_gender:
                p = gender_probs[i]
                row += [gender_labels[int(np.argmax(p))], *(f"{x:.6f}" for x in p)]
            yield row

    return write_csv_atomic(path, prediction_header(gender_labels if with_gender else None), rows())


def read_gender_probabilities(path: str | Path) -> tuple[list[str], list[str], np.ndarray] | None:
    """(ids, gender labels, (N, G) probabilities) of a prediction file written `--with-gender`; None
    when it has no GenderProb_* columns. Raises ValueError if they are malformed."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c for c in (reader.fieldnames or []) if c.startswith(GENDER_PROB_PREFIX)]
        if not columns:
            return None
        labels = [c.removeprefix(GENDER_PROB_PREFIX) for c in columns]
        ids, probs = [], []
        for lineno, row in enumerate(reader, start=2):
            try:
                p = [float(row[c]) for c in columns]
            except (TypeError, ValueError):
                raise ValueError(f"{path}, line {lineno}: {', '.join(columns)} must be numbers") from None
            ids.append((row[ID_COLUMN] or "").strip())
            probs.append(p)
    return ids, labels, np.asarray(probs, dtype=np.float64).reshape(-1, len(columns))


# Slack for a prediction at the edge of its range: the heads compute lo/hi in float32 (1e-6 at 7).
RANGE_SLACK = 1e-5


def bad_value(avd: np.ndarray, lo, hi) -> tuple[int, int, float, str] | None:
    """The first (row, column, value, why) of the (N, 3) `avd` that is not finite or lies outside
    [lo, hi] (numbers, or one per column); None when every value is fine. Each prediction a command
    writes or reads goes through it: a NaN or a 99 must never be written or averaged silently."""
    avd = np.asarray(avd, dtype=np.float64).reshape(-1, 3)
    lo = np.broadcast_to(np.asarray(lo, dtype=np.float64), (3,))
    hi = np.broadcast_to(np.asarray(hi, dtype=np.float64), (3,))
    finite = np.isfinite(avd)
    inside = (avd >= lo - RANGE_SLACK) & (avd <= hi + RANGE_SLACK)
    wrong = np.argwhere(~(finite & inside))
    if not wrong.size:
        return None
    i, j = (int(x) for x in wrong[0])
    if not finite[i, j]:
        return i, j, float(avd[i, j]), "not a finite number"
    return i, j, float(avd[i, j]), f"outside the label range [{lo[j]:g}, {hi[j]:g}]"


def label_range(config: dict) -> tuple[list[float], list[float]]:
    """A run's label range (config.json "labels": its training labels' min and max), else the 1-7 scale."""
    labels = config.get("labels") if isinstance(config.get("labels"), dict) else {}
    try:
        lo, hi = [float(x) for x in labels["min"]], [float(x) for x in labels["max"]]
        if len(lo) == len(hi) == 3:
            return lo, hi
    except (KeyError, TypeError, ValueError):
        pass
    return [1.0] * 3, [7.0] * 3


def read_predictions(path: str | Path, scale: tuple[float, float] | None = None) -> tuple[list[str], np.ndarray]:
    """(ids, (N, 3) arousal/valence/dominance) from a challenge-format CSV; raises ValueError if malformed.

    Every value must be a number in plain decimal notation (`plain_number`), finite, and with
    `scale` (low, high) within it. A byte-order mark (a file saved by Excel) is read past."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: a folder, not a prediction file (a CSV written by `ser-cache predict`)")
    if not path.is_file():
        raise ValueError(f"{path}: no such prediction file")
    ids: list[str] = []
    values: list[list[float]] = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        try:
            missing = [c for c in (ID_COLUMN, *AVD_COLUMNS) if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; expected "
                                 f"{','.join((ID_COLUMN, *AVD_COLUMNS))}")
            seen: set[str] = set()
            for lineno, row in enumerate(reader, start=2):
                uid = (row[ID_COLUMN] or "").strip()
                if not uid:
                    raise ValueError(f"{path}, line {lineno}: empty {ID_COLUMN}")
                if uid in seen:
                    raise ValueError(f"{path}, line {lineno}: {uid} is listed twice")
                seen.add(uid)
                ids.append(uid)
                values.append(_prediction_row(path, lineno, uid, row, scale))
        except csv.Error as exc:
            raise ValueError(f"{path}, line {reader.line_num}: not readable as CSV ({exc}); a quote (\") opened "
                             "there and never closed makes the rest of the file one field") from None
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return ids, np.asarray(values, dtype=np.float64).reshape(-1, 3)


def _prediction_row(path: Path, lineno: int, uid: str, row: dict, scale) -> list[float]:
    vals = []
    for column in AVD_COLUMNS:
        text = row.get(column)
        value = plain_number(text)
        if value is None:
            raise ValueError(f"{path}, line {lineno} ({uid}): {column} is {text!r}, expected a number in plain "
                             "decimal notation")
        vals.append(value)
    bad = bad_value(vals, *(scale or (-math.inf, math.inf)))
    if bad is not None:
        _, j, _, why = bad
        raise ValueError(f"{path}, line {lineno} ({uid}): {AVD_COLUMNS[j]} is {row[AVD_COLUMNS[j]].strip()}, {why}")
    return vals


# A number as a CSV reader that converts columns (pandas, R, a spreadsheet) reads one: optional
# sign, ASCII digits with an optional decimal point, optional exponent; spaces around it. Python's
# float() takes more ("4_5" is 45, Arabic-Indic digits are digits), which no scorer reading the
# CSV does; nan and inf are read (as pandas reads them) and refused for not being finite.
PLAIN_NUMBER = re.compile(r"[ \t]*[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?[ \t]*"
                          r"|[ \t]*[+-]?(?:nan|inf|infinity)[ \t]*", re.IGNORECASE | re.ASCII)


def plain_number(text: str | None) -> float | None:
    """`text` as a float when it is a number in plain decimal notation (PLAIN_NUMBER), else None."""
    if text is None or not PLAIN_NUMBER.fullmatch(text):
        return None
    return float(text)
