"""The `ser-cache` command line. The app and its one place where failures become a clear line live
in `cli.app`; each command family lives in a module of its own, which registers its commands on
the app when imported. Importing this package imports them all: `ser_cache.cli.app:main` (the
`ser-cache` script) and `python -m ser_cache` find every command.
"""

from __future__ import annotations

# The import order is the order of the commands in `ser-cache --help`: not sorted.
# isort: off
from ser_cache.cli import (  # noqa: F401 (each registers its commands on cli.app.app)
    stage_one,
    stage_two,
    demo,
    bench,
    finetune,
    imports,
    transcribe,
    submission,
    plot,
    sweep,
    probe,
    slurm,
)
# isort: on
