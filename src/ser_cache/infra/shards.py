"""Shards: one command's work cut into N independent parts, for Slurm job arrays (docs/cluster.md).

`--shard I/N` (I from 0 to N-1) on extract, transcribe and sweep runs part I of N. The work of a
command is first planned whole — extract's units of chunks, transcribe's batches, sweep's members —
exactly as one process plans it, and shard I takes items I, I+N, I+2N, ... of that plan (`share`).
So:
- the shares partition the plan: every item is in exactly one shard, whatever N;
- a share depends on the plan and on I and N only, never on what is already done: a shard started
  late, rerun after a failure, or run while others run takes the same items, and skips those done;
- what a shard computes is what one process computes for the same items, so N shards together
  write what one process writes.

`--shard slurm` reads I and N from a Slurm job array's environment (`from_environment`):
I = SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN (divided by SLURM_ARRAY_TASK_STEP), N =
SLURM_ARRAY_TASK_COUNT. A script written by `ser-cache slurm` also sets SER_CACHE_SHARDS=N: N is then
fixed and I is the task id itself, so that resubmitting one task (`sbatch --array=K job.sbatch`)
reruns shard K of N, not shard 0 of 1.

Each shard holds a lock of its own (`lock_target`): two copies of the same shard (a requeued task
whose first copy still runs) never run at once, while different shards do.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

SLURM = "slurm"
SHARDS_VARIABLE = "SER_CACHE_SHARDS"  # set by the scripts `ser-cache slurm` writes: N fixed, I = the task id
_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


class ShardError(ValueError):
    """A --shard value (or the Slurm environment it reads) that names no shard; the message says why."""


@dataclass(frozen=True)
class Shard:
    """Part `index` (0-based) of `count`."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ShardError(f"--shard {self.index}/{self.count}: expected N of 1 or more")
        if not 0 <= self.index < self.count:
            raise ShardError(f"--shard {self.index}/{self.count}: expected I from 0 to {self.count - 1}")

    @property
    def label(self) -> str:
        """'I/N', as --shard takes it."""
        return f"{self.index}/{self.count}"

    @property
    def slug(self) -> str:
        """'shard-I-of-N', for file names."""
        return f"shard-{self.index}-of-{self.count}"

    def owns(self, position: int) -> bool:
        """Whether item `position` of the plan is in this shard's share."""
        return position % self.count == self.index

    def share(self, items: Sequence[T]) -> list[T]:
        """This shard's items of the plan `items`: positions index, index + count, ..."""
        return list(items[self.index::self.count])

    def to_dict(self) -> dict:
        return {"index": self.index, "count": self.count}


def share_sizes(n_items: int, count: int) -> list[int]:
    """How many of `n_items` each of `count` shards takes (differing by at most one)."""
    return [len(range(i, n_items, count)) for i in range(count)]


def parse_shard(text: str | None, environ: Mapping[str, str] | None = None) -> Shard | None:
    """'I/N' → Shard(I, N); 'slurm' → from the job array's environment; None or '' → None (no sharding)."""
    if text is None or not str(text).strip():
        return None
    text = str(text).strip()
    if text.lower() == SLURM:
        return from_environment(os.environ if environ is None else environ)
    m = _SPEC.match(text)
    if not m:
        raise ShardError(f"--shard {text!r}: expected I/N (shard I of N, I from 0 to N-1, e.g. 0/8) or 'slurm' (I "
                         "and N from the job array's SLURM_ARRAY_TASK_* variables)")
    return Shard(int(m.group(1)), int(m.group(2)))


def from_environment(environ: Mapping[str, str]) -> Shard:
    """The shard of this Slurm array task (see the module docstring for the variables read)."""

    def number(name: str, default: int | None = None) -> int:
        value = environ.get(name)
        if value is None or not value.strip():
            if default is not None:
                return default
            raise ShardError(f"--shard slurm: {name} is not set; --shard slurm runs inside a Slurm job array "
                             "(sbatch --array); elsewhere give --shard I/N")
        try:
            return int(value)
        except ValueError:
            raise ShardError(f"--shard slurm: {name}={value!r} is not a whole number") from None

    task = number("SLURM_ARRAY_TASK_ID")
    if environ.get(SHARDS_VARIABLE, "").strip():
        count = number(SHARDS_VARIABLE)
        if not 0 <= task < count:
            raise ShardError(f"--shard slurm: SLURM_ARRAY_TASK_ID={task}, but {SHARDS_VARIABLE}={count} fixes the "
                             f"shards at {count}: submit the array's tasks as 0-{count - 1}")
        return Shard(task, count)
    first, step, count = number("SLURM_ARRAY_TASK_MIN", 0), number("SLURM_ARRAY_TASK_STEP", 1), \
        number("SLURM_ARRAY_TASK_COUNT")
    offset = task - first
    if step < 1 or offset < 0 or offset % step or offset // step >= count:
        raise ShardError(f"--shard slurm: task {task} of an array of {count} task(s) from {first} in steps of {step} "
                         "is not one of I = 0..N-1: submit a regular array (e.g. --array=0-7), or give --shard I/N")
    return Shard(offset // step, count)


def lock_target(path: str | Path, shard: Shard) -> Path:
    """What a shard locks for its run: `<path>.shard-I-of-N` (its lock file `<path>.shard-I-of-N.lock`), beside
    the real folder (as locks.lock_path: two names for one store meet at one lock)."""
    path = Path(path).resolve()
    return path.with_name(f"{path.name}.{shard.slug}")


_LOCK_NAME = re.compile(r"\.shard-(\d+)-of-(\d+)\.lock$")


def running(path: str | Path) -> dict[Shard, str]:
    """The shards of `path` running now (their lock held) → who holds it, as the holder wrote."""
    from ser_cache.infra import locks

    lock_dir = locks.lock_path(path).parent
    base = locks.lock_path(path).name.removesuffix(".lock")
    found = {}
    for f in lock_dir.glob(f"{glob.escape(base)}.shard-*-of-*.lock"):
        m = _LOCK_NAME.search(f.name)
        if not m or f.name[: m.start()] != base:
            continue
        index, count = int(m.group(1)), int(m.group(2))
        if not 0 <= index < count:
            continue
        shard = Shard(index, count)
        who = locks.holder(lock_target(path, shard))
        if who:
            found[shard] = who
    return dict(sorted(found.items(), key=lambda kv: (kv[0].count, kv[0].index)))

