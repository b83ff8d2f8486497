"""What every training loop reports per epoch: the history row, the progress bar and log line, TensorBoard scalars."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ser_cache.system.errors import TrainError
from ser_cache.system.metrics import ATTRIBUTES as AVD  # the heads' "avd" column order, too

if TYPE_CHECKING:
    from typing_extensions import Self
log = logging.getLogger(__name__)


LOSS_KEYS = ("total", "ccc", "gender", "speaker")


def loss_keys(task: str) -> tuple[str, ...]:
    """The loss terms a run of `task` logs (history.csv's loss_* columns): an attribute run's are LOSS_KEYS."""
    return {"attributes": LOSS_KEYS, "categorical": ("total", "class", "gender", "speaker")}.get(
        task, ("total", "ccc", "class", "gender", "speaker"))


def history_row(epoch: int, losses: Mapping[str, float], dev: dict, seconds: float, eval_seconds: float) -> dict:
    row = {"epoch": epoch, "seconds": round(seconds, 3), "eval_seconds": round(eval_seconds, 3)}
    row.update({f"loss_{k}": v for k, v in losses.items()})
    if "ccc" in dev:  # attribute heads
        row.update({f"dev_ccc_{k}": v for k, v in dev["ccc"].items()})
        b = dev.get("balanced_ccc") or {}
        row.update({f"dev_balanced_ccc_{k}": b.get(k, float("nan")) for k in (*AVD, "mean")})
    g = dev.get("gender") or {}
    row.update({"dev_gender_accuracy": g.get("accuracy", float("nan")),
                "dev_gender_macro_f1": g.get("macro_f1", float("nan"))})
    c = dev.get("categorical")
    if c is not None:  # a class head
        row.update({"dev_macro_f1": c["macro_f1"], "dev_accuracy": c["accuracy"],
                    "dev_balanced_accuracy": c["balanced_accuracy"]})
    return row


TENSORBOARD_MISSING = ("--tensorboard: needs the tensorboard package, which is not installed; "
                       "pip install 'ser-cache[tensorboard]'")


def tensorboard_problem() -> str | None:
    """None when torch's SummaryWriter can be used, else the one-line reason."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return TENSORBOARD_MISSING
    return None


class TensorBoardLog:
    """History rows as TensorBoard scalars in a folder: one per history.csv column, at its epoch."""

    def __init__(self, folder: Path) -> None:
        problem = tensorboard_problem()
        if problem:
            raise TrainError(problem)
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(folder))

    def log(self, epoch: int, row: dict) -> None:
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self._writer.add_scalar(key, value, epoch)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class EpochProgress:
    """A rich progress bar over epochs showing the loss and the Development scores.

    With `tensorboard` (a folder), every history row is also logged there as TensorBoard scalars,
    one per history.csv column, at its epoch.
    """

    WIDE_COLUMNS = 110  # narrower consoles get the short line: it fits 80 columns

    def __init__(self, enabled: bool, epochs: int, *, tensorboard: Path | None = None, console=None):
        self.enabled = enabled
        self.epochs = epochs
        self.tensorboard = tensorboard
        self.console = console
        self._progress = None
        self._writer = None
        self._wide = True

    def make_progress(self):
        import sys

        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        console = self.console or Console(file=sys.stderr)
        self._wide = console.width >= self.WIDE_COLUMNS
        if self._wide:
            columns = (TextColumn("[bold]epochs"), BarColumn(), MofNCompleteColumn())
        else:
            columns = (BarColumn(bar_width=10), TextColumn("epoch"), MofNCompleteColumn())
        progress = Progress(*columns, TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console)
        self._task = progress.add_task("train", total=self.epochs, info="")
        return progress

    def __enter__(self) -> Self:
        if self.tensorboard is not None:
            self._writer = TensorBoardLog(self.tensorboard)
        if self.enabled:
            self._progress = self.make_progress()
            self._progress.start()
        return self

    def info(self, row: dict, best_epoch: int) -> str:
        if "dev_macro_f1" in row:
            return self.class_info(row, best_epoch)
        loss, ccc, balanced = row["loss_total"], row["dev_ccc_mean"], row["dev_balanced_ccc_mean"]
        if self._wide:
            return f"loss {loss:.3f} · dev CCC {ccc:.3f} · balanced {balanced:.3f} · best epoch {best_epoch}"
        return f"loss {loss:.3f} CCC {ccc:.3f} bal {balanced:.3f} best {best_epoch}"

    def class_info(self, row: dict, best_epoch: int) -> str:
        loss, f1 = row["loss_total"], row["dev_macro_f1"]
        ccc = f" · dev CCC {row['dev_ccc_mean']:.3f}" if "dev_ccc_mean" in row else ""
        if self._wide:
            return f"loss {loss:.3f}{ccc} · dev macro-F1 {f1:.3f} · best epoch {best_epoch}"
        short = f" CCC {row['dev_ccc_mean']:.3f}" if "dev_ccc_mean" in row else ""
        return f"loss {loss:.3f}{short} F1 {f1:.3f} best {best_epoch}"

    def update(self, epoch: int, row: dict, best_epoch: int) -> None:
        if self._writer is not None:
            self._writer.log(epoch, row)
        if self._progress is not None:
            self._progress.update(self._task, completed=epoch, info=self.info(row, best_epoch))

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._writer is not None:
            self._writer.close()
