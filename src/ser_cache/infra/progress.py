"""A rich progress bar for extraction: utterances/s (and audio-seconds/s for audio encoders) as they happen."""

from __future__ import annotations

import sys
import time

# Below this many columns the bar drops the audio rate and shortens the store's name, so that
# one line still fits (an 80-column terminal would otherwise cut the rate and the time left).
WIDE_COLUMNS = 110
NARROW_NAME = 24  # characters of the store's name kept on a narrow console


def rate_text(utterances: float, seconds: float | None) -> str:
    """`12.3 utt/s · 456 audio-s/s`; utterances alone for a text encoder (`seconds` None)."""
    utt = f"{utterances:,.1f}" if utterances >= 10 else f"{utterances:.3g}"
    if seconds is None:
        return f"{utt} utt/s"
    secs = f"{seconds:,.0f}" if utterances >= 10 else f"{seconds:.3g}"
    return f"{utt} utt/s · {secs} audio-s/s"


class ExtractProgress:
    def __init__(self, *, enabled: bool, total: int, name: str, audio: bool = True, console=None):
        self.enabled = enabled and total > 0
        self.total = total
        self.name = name
        self.audio = audio  # False for a text encoder: its rows have no audio seconds
        self.console = console
        self.done = 0
        self.seconds = 0.0
        self._t0 = time.perf_counter()
        self._progress = None
        self._task = None
        self._wide = True

    def make_progress(self):
        """The rich Progress, its columns fitted to the console's width."""
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        console = self.console or Console(file=sys.stderr)
        self._wide = console.width >= WIDE_COLUMNS
        name = self.name
        if not self._wide and len(name) > NARROW_NAME:
            name = name[: NARROW_NAME - 1] + "…"
        progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(bar_width=40 if self._wide else 10),
            MofNCompleteColumn(), TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
            console=console, transient=False,
        )
        self._task = progress.add_task(name, total=self.total, rate="")
        return progress

    def __enter__(self) -> ExtractProgress:
        if self.enabled:
            self._progress = self.make_progress()
            self._progress.start()
        self._t0 = time.perf_counter()
        return self

    def rate(self) -> str:
        dt = max(time.perf_counter() - self._t0, 1e-9)
        seconds = self.seconds / dt if self.audio and self._wide else None
        return rate_text(self.done / dt, seconds)

    def advance(self, rows: int, seconds: float) -> None:
        self.done += rows
        self.seconds += seconds
        if self._progress is not None:
            self._progress.update(self._task, advance=rows, rate=self.rate())

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
