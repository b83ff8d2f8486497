"""A rich progress bar for extraction: utterances/s and audio-seconds/s as they happen."""

from __future__ import annotations

import sys
import time


class ExtractProgress:
    def __init__(self, *, enabled: bool, total: int, name: str):
        self.enabled = enabled and total > 0
        self.total = total
        self.name = name
        self.done = 0
        self.seconds = 0.0
        self._t0 = time.perf_counter()
        self._progress = None
        self._task = None

    def __enter__(self) -> ExtractProgress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                console=Console(file=sys.stderr), transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(self.name, total=self.total, rate="")
        self._t0 = time.perf_counter()
        return self

    def advance(self, rows: int, seconds: float) -> None:
        self.done += rows
        self.seconds += seconds
        if self._progress is not None:
            dt = max(time.perf_counter() - self._t0, 1e-9)
            utt, secs = self.done / dt, self.seconds / dt
            rate = f"{utt:,.1f} utt/s · {secs:,.0f} audio-s/s" if utt >= 10 else f"{utt:.3g} utt/s · {secs:.3g} audio-s/s"
            self._progress.update(self._task, advance=rows, rate=rate)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
