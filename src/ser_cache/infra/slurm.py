"""Slurm job arrays for a sharded command (`ser-cache slurm extract|transcribe|sweep`, docs/cluster.md).

`batch_script` writes an sbatch script whose array tasks 0..N-1 each run the same ser-cache command
with `--shard slurm`; the script exports SER_CACHE_SHARDS=N, so that a task resubmitted alone
(`sbatch --array=K script`) is still shard K of N (infra.shards). The command runs with the Python
that wrote the script (`python -m ser_cache`), in the folder it was written from (`--chdir`): on a
cluster whose nodes share the file system, that is the same installation and the same relative paths.
`submit` hands the script to sbatch and returns the job id.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ser_cache.infra.shards import SHARDS_VARIABLE

COMMANDS = ("extract", "transcribe", "sweep")
_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$|^\d+-\d+$")
_MEM = re.compile(r"^\d+[KMGT]?$", re.IGNORECASE)


class SlurmError(ValueError):
    """A job array that cannot be written or submitted as asked; the message names the option or the tool."""


@dataclass(frozen=True)
class ArrayJob:
    """What the script asks Slurm for: `array` tasks, each with these resources."""

    command: str  # extract, transcribe or sweep
    args: tuple[str, ...]  # the command's own options, as typed (without --shard)
    array: int
    partition: str | None = None
    time: str | None = None  # D-HH:MM:SS, HH:MM:SS, MM, ... as sbatch takes it
    mem: str | None = None  # 32G, 64000M, ...
    cpus_per_task: int | None = None
    gpus_per_task: int = 0
    max_running: int | None = None  # at most this many tasks at once (--array=0-N%K)
    job_name: str | None = None
    sbatch: tuple[str, ...] = field(default_factory=tuple)  # more #SBATCH lines, e.g. --account=abc

    def verify(self) -> None:
        problems = []
        if self.command not in COMMANDS:
            problems.append(f"command {self.command!r}: expected one of {', '.join(COMMANDS)}")
        if self.array < 1:
            problems.append(f"--array {self.array}: expected 1 or more tasks")
        if self.time is not None and not _TIME.match(self.time):
            problems.append(f"--time {self.time!r}: expected sbatch's forms, e.g. 4:00:00, 90, 1-12:00:00")
        if self.mem is not None and not _MEM.match(self.mem):
            problems.append(f"--mem {self.mem!r}: expected a size such as 32G or 64000M")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            problems.append(f"--cpus-per-task {self.cpus_per_task}: expected 1 or more")
        if self.gpus_per_task < 0:
            problems.append(f"--gpus-per-task {self.gpus_per_task}: expected 0 or more")
        if self.max_running is not None and self.max_running < 1:
            problems.append(f"--max-running {self.max_running}: expected 1 or more")
        for opt in self.sbatch:
            if not opt.startswith("--") or "\n" in opt:
                problems.append(f"--sbatch {opt!r}: expected one long sbatch option, e.g. --account=abc")
        if any(a == "--shard" or a.startswith("--shard=") for a in self.args):
            problems.append("--shard: the script gives every task its own (--shard slurm); leave it out")
        if problems:
            raise SlurmError("; ".join(problems))


def batch_script(job: ArrayJob, *, log_pattern: Path, workdir: Path, python: str | None = None) -> str:
    """The sbatch script of `job`: #SBATCH lines, then the command with --shard slurm."""
    job.verify()
    last = job.array - 1
    array = f"0-{last}" if last else "0"
    if job.max_running is not None:
        array += f"%{job.max_running}"
    lines = ["#!/bin/bash",
             f"#SBATCH --job-name={job.job_name or 'ser-cache-' + job.command}",
             f"#SBATCH --array={array}",
             "#SBATCH --ntasks=1",
             f"#SBATCH --output={log_pattern}",
             f"#SBATCH --chdir={workdir}"]
    if job.partition:
        lines.append(f"#SBATCH --partition={job.partition}")
    if job.time:
        lines.append(f"#SBATCH --time={job.time}")
    if job.mem:
        lines.append(f"#SBATCH --mem={job.mem}")
    if job.cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={job.cpus_per_task}")
    if job.gpus_per_task:
        lines.append(f"#SBATCH --gpus-per-task={job.gpus_per_task}")
    lines += [f"#SBATCH {opt}" for opt in job.sbatch]
    command = [python or sys.executable, "-m", "ser_cache", job.command, *job.args, "--shard", "slurm"]
    lines += [
        "",
        f"# ser-cache {job.command} as {job.array} shard(s) of one plan (docs/cluster.md). Rerun a failed or",
        "# cancelled task K alone with: sbatch --array=K <this script> — it does shard K's share again, and",
        "# skips what is done.",
        "set -euo pipefail",
        f"export {SHARDS_VARIABLE}={job.array}",
        "# Torch's threads as Slurm gave cores (sums of floats depend on the count: every task alike).",
        'export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"',
        'echo "ser-cache: task ${SLURM_ARRAY_TASK_ID} of job ${SLURM_ARRAY_JOB_ID} on $(hostname)"',
        shlex.join(command),
        "",
    ]
    return "\n".join(lines)


def write_script(job: ArrayJob, jobs_dir: Path, *, workdir: Path | None = None,
                 python: str | None = None) -> Path:
    """Write the script into `jobs_dir` as `<command>-<time>.sbatch` (never over an existing file); task
    logs go beside it as `<command>-<time>-<job>_<task>.out`."""
    from ser_cache.infra.atomic import atomic_path

    jobs_dir = Path(jobs_dir)
    jobs_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{job.command}-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while (jobs_dir / f"{stem}.sbatch").exists():
        n += 1
        stem = f"{job.command}-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
    path = jobs_dir / f"{stem}.sbatch"
    text = batch_script(job, log_pattern=(jobs_dir / f"{stem}-%A_%a.out").resolve(),
                        workdir=(workdir or Path.cwd()).resolve(), python=python)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    os.chmod(path, 0o755)
    return path


def submit(script: Path, sbatch: Sequence[str] = ()) -> str:
    """`sbatch --parsable SCRIPT` → the job id; a SlurmError naming sbatch's own message when it refuses."""
    exe = shutil.which("sbatch")
    if exe is None:
        raise SlurmError(f"--submit: sbatch is not on PATH (no Slurm here); the script is written: submit it where "
                         f"Slurm runs with `sbatch {script}`")
    done = subprocess.run([exe, "--parsable", *sbatch, str(script)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SlurmError(f"sbatch refused {script}: {(done.stderr or done.stdout).strip() or 'no message'} "
                         f"(exit {done.returncode})")
    return done.stdout.strip().split(";")[0]
