"""The fine-tuning checkpoint of an unfinished run: its file name, its format, and reading it with every entry
checked (finetune resumes from it, `plot run` draws it)."""

from __future__ import annotations

from pathlib import Path

from ser_cache.infra import statefile
from ser_cache.system.errors import TrainError

CHECKPOINT = "checkpoint.safetensors"


LEGACY_CHECKPOINT = "checkpoint.pt"  # pickled, by ser-cache 0.1.0: refused, never loaded


CHECKPOINT_FORMAT = "ser-cache-finetune-checkpoint"


CHECKPOINT_VERSION = 1


# The entries of a checkpoint, with the type each must have: a file that decodes but lacks one, or
# holds another type, is refused naming the entry instead of failing deep in a module's loader.
ENTRIES = {"epoch": int, "train": dict, "world": int, "model": dict, "aam": (dict, type(None)),
           "optimizer": dict, "scaler": dict, "sampler": dict, "rng": list, "best": dict, "history": list}


class CheckpointError(TrainError):
    """A run's checkpoint cannot be used: the message names the file and what to do."""


def refuse_legacy(out: Path) -> None:
    """Refuse a run whose only checkpoint is the pickled checkpoint.pt of ser-cache 0.1.0 (never loaded)."""
    legacy = Path(out) / LEGACY_CHECKPOINT
    if legacy.exists() and not (Path(out) / CHECKPOINT).exists():
        raise CheckpointError(f"{legacy}: a pickled checkpoint (as ser-cache 0.1.0 wrote them), which is not loaded "
                              "because unpickling a file can run any code in it; start the run again with --overwrite")


def read_checkpoint(out: Path, *, tensors: bool = True) -> dict:
    """The checkpoint of the unfinished run at `out`, every entry checked; CheckpointError naming the file.

    tensors=False reads the header alone (history, best epoch, options): what a plot needs.
    """
    refuse_legacy(out)
    path = Path(out) / CHECKPOINT
    try:
        ckpt = statefile.load(path, fmt=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION, tensors=tensors,
                              what="fine-tuning checkpoint")
    except statefile.StateFileError as exc:
        raise CheckpointError(f"{exc}; start the run again with --overwrite") from None
    problems = [f"\"{k}\" must be {t.__name__ if isinstance(t, type) else ' or '.join(x.__name__ for x in t)}"
                for k, t in ENTRIES.items() if not isinstance(ckpt, dict) or not isinstance(ckpt.get(k), t)]
    if not problems and not isinstance(ckpt["best"].get("epoch"), int):
        problems.append("\"best\" must hold the best epoch")
    if not problems and not all(isinstance(row, dict) for row in ckpt["history"]):
        problems.append("every row of \"history\" must be an object")
    if problems:
        raise CheckpointError(f"{path}: not a complete fine-tuning checkpoint ({'; '.join(problems)}); "
                              "start the run again with --overwrite")
    return ckpt
