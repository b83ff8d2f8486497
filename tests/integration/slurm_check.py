"""The check of `ser-cache slurm extract` on a real Slurm (slurm_cluster.sh), step by step, for both
test_slurm.py and run_slurm_check.sh (`python tests/integration/slurm_check.py`, a readable log).

1. one process: `ser-cache extract ... --out ONE`, the store to match;
2. `ser-cache slurm extract --array 3 --submit ...`: wait until the array has left the queue, every task
   COMPLETED with exit code 0, and the store byte-identical to ONE (compare_stores.py) and complete;
3. the same into a fresh store, `scancel JOB_1` once shard 1 has written rows (and has rows left): the two
   other tasks finish, the store is incomplete and `ser-cache info` names shard 1/3; `sbatch --array=1
   SCRIPT` alone finishes it, byte-identical to ONE.

Every command goes to stdout as `$ command` with its output. The runs and the Slurm jobs get one torch
thread each (OMP_NUM_THREADS=1, exported by sbatch to the tasks): float sums depend on the number of
threads, and the store of N shards is byte for byte the store of one process run the same way.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from compare_stores import differences, summary  # noqa: E402

CLUSTER = HERE / "slurm_cluster.sh"
TOOLS = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo", "scontrol")
ARRAY = 3
CANCELLED = 1  # the task cancelled in step 3
ARRAY_TIMEOUT_S = 240  # an array of 3 on 2 cores takes ~20 s here


class CheckFailed(AssertionError):
    """A step of the check found what it should not; the message says what."""


def missing_tools() -> list[str]:
    import shutil

    return [t for t in TOOLS if shutil.which(t) is None]


@dataclass
class Slurm:
    """Commands against the cluster whose slurm.conf is `conf`, each printed with its output."""

    conf: Path
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.env = {**os.environ, **self.env, "SLURM_CONF": str(self.conf), "OMP_NUM_THREADS": "1"}

    def run(self, args: Sequence[str | Path], *, check: bool = True, quiet: bool = False,
            timeout: float = 600) -> str:
        args = [str(a) for a in args]
        if not quiet:
            print("$ " + shlex.join(args), flush=True)
        proc = subprocess.run(args, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout)
        if not quiet and proc.stdout.strip():
            print(proc.stdout.rstrip(), flush=True)
        if check and proc.returncode:
            raise CheckFailed(f"{shlex.join(args)} exited {proc.returncode}:\n{proc.stdout}")
        return proc.stdout

    def queued(self, job: str) -> list[str]:
        """The array's tasks still in the queue (pending, running, completing), as squeue prints them."""
        out = self.run(["squeue", "-h", "-j", job, "-o", "%i %T %R"], quiet=True, check=False)
        return [line.strip() for line in out.splitlines() if line.strip()]

    def wait(self, job: str, timeout_s: float = ARRAY_TIMEOUT_S) -> None:
        """Poll `squeue -h -j JOB` until it is empty; print the queue each time it changes."""
        print(f"# waiting for job {job} to leave the queue (squeue -h -j {job}, every 0.5 s)", flush=True)
        deadline, last = time.monotonic() + timeout_s, None
        while True:
            lines = self.queued(job)
            if lines != last:
                print(f"  [{time.strftime('%H:%M:%S')}] " + ("; ".join(lines) or "(empty)"), flush=True)
                last = lines
            if not lines:
                return
            if time.monotonic() > deadline:
                self.run(["scancel", job], check=False)
                raise CheckFailed(f"job {job} still queued after {timeout_s} s: {lines}")
            time.sleep(0.5)

    def states(self, job: str) -> dict[int, tuple[str, str]]:
        """{array task: (state, exit code)} from the controller (no accounting storage: sacct has nothing;
        `scontrol show job` keeps finished jobs for MinJobAge=3600 s). Prints the sacct-like table."""
        self.run(["squeue", "-t", "all", "-j", job, "-o", "%.10i %.10T %.8M %.6C %R"])
        out = self.run(["scontrol", "-o", "show", "job", job], quiet=True)
        found = {}
        for line in out.splitlines():
            fields = dict(re.findall(r"(\w+)=(\S*)", line))
            if "ArrayTaskId" in fields:
                found[int(fields["ArrayTaskId"])] = (fields["JobState"], fields["ExitCode"])
        print("# scontrol show job " + job + ": " + ", ".join(
            f"{job}_{t} {s} exit {e}" for t, (s, e) in sorted(found.items())), flush=True)
        return found


# 157 rows (two splits of the shared corpus, cropped to 5 s: the sharding is checked, not the audio) in
# 10 chunks: one process plans units of chunks [0-2], [3-5], [6-8], [9]; shard 0 of 3 takes two units,
# shards 1 and 2 one each.
SPLITS = ("Development", "Test1")


def extract_options(model: Path, data: Path, out: Path) -> list[str]:
    return ["--model", str(model), "--data", str(data), "--out", str(out), *(a for s in SPLITS for a in ("--split", s)),
            "--max-seconds", "5", "--chunk-rows", "16", "--device", "cpu", "--workers", "0", "--no-progress"]


def store_in(out: Path) -> Path:
    stores = sorted(out.glob("*.zarr"))
    if len(stores) != 1:
        raise CheckFailed(f"expected one store in {out}, found {[s.name for s in stores]}")
    return stores[0]


def one_process(slurm: Slurm, model: Path, data: Path, out: Path) -> Path:
    """Step 1: the store one process writes."""
    print("## 1. one process", flush=True)
    slurm.run([sys.executable, "-m", "ser_cache", "extract", *extract_options(model, data, out)])
    store = store_in(out)
    print(summary(store), flush=True)
    return store


def submit(slurm: Slurm, model: Path, data: Path, out: Path, jobs: Path) -> tuple[Path, str]:
    """`ser-cache slurm extract --array 3 --submit`: (the script it wrote, the job id)."""
    text = slurm.run([sys.executable, "-m", "ser_cache", "slurm", "extract", "--array", str(ARRAY), "--submit",
                      "--jobs-dir", str(jobs), "--", *extract_options(model, data, out)])
    script = re.search(r"^script: (.+)$", text, re.M)
    job = re.search(r"^job: (\d+)", text, re.M)
    if not script or not job:
        raise CheckFailed(f"expected 'script: PATH' and 'job: ID' lines from ser-cache slurm extract, got:\n{text}")
    print(f"$ cat {script.group(1)}\n" + Path(script.group(1)).read_text().rstrip(), flush=True)
    return Path(script.group(1)), job.group(1)


def _show(log: Path) -> None:
    print(f"$ cat {log}\n" + log.read_text().rstrip(), flush=True)


def expect_states(states: dict[int, tuple[str, str]], expected: dict[int, str], job: str) -> None:
    got = {t: s for t, (s, _) in states.items()}
    if got != expected:
        raise CheckFailed(f"job {job}: expected the tasks {expected}, Slurm says {got}")
    failed = {t: e for t, (s, e) in states.items() if s == "COMPLETED" and e != "0:0"}
    if failed:
        raise CheckFailed(f"job {job}: tasks with a non-zero exit code: {failed}")


def expect_identical(one: Path, store: Path) -> None:
    print(f"$ python tests/integration/compare_stores.py {one} {store}", flush=True)
    print(summary(store), flush=True)
    problems = differences(one, store)
    if problems:
        raise CheckFailed(f"{store} differs from the one-process {one}:\n" + "\n".join(problems))
    import zarr

    if zarr.open_group(str(store), mode="r").attrs.get("complete") is not True:
        raise CheckFailed(f"{store}: attribute complete is not true")
    print("identical: features, written, failed, ids byte for byte; complete=True", flush=True)


def check_array(slurm: Slurm, model: Path, data: Path, one: Path, work: Path) -> None:
    """Step 2: the whole array, left alone."""
    print(f"## 2. ser-cache slurm extract --array {ARRAY} --submit", flush=True)
    script, job = submit(slurm, model, data, work / "sharded", work / "jobs")
    slurm.wait(job)
    expect_states(slurm.states(job), dict.fromkeys(range(ARRAY), "COMPLETED"), job)
    for log in sorted((work / "jobs").glob(f"*-{job}_*.out")):
        _show(log)
    expect_identical(one, store_in(work / "sharded"))


def _started(slurm: Slurm, job: str, jobs: Path) -> bool:
    """Whether task CANCELLED runs its script: RUNNING for Slurm, and its log has the script's first line."""
    lines = slurm.queued(f"{job}_{CANCELLED}")
    if not lines:
        raise CheckFailed(f"task {job}_{CANCELLED} left the queue before it could be cancelled")
    log = next(jobs.glob(f"*-{job}_{CANCELLED}.out"), None)
    return " RUNNING " in f" {lines[0]} " and log is not None and "ser-cache: task" in log.read_text()


def _pending(store: Path) -> dict[str, int]:
    """{'I/N': rows pending} of the store's shards (shard_progress, as `ser-cache info` reads them); the
    store must not say complete."""
    import zarr

    from ser_cache.features.shard_progress import progress
    from ser_cache.features.store import FeatureStore

    if zarr.open_group(str(store), mode="r").attrs.get("complete") is not False:
        raise CheckFailed(f"{store}: attribute complete is not false after task {CANCELLED} was cancelled")
    return {p.shard.label: p.pending for p in progress(FeatureStore.open(store), ARRAY)}


def check_cancel(slurm: Slurm, model: Path, data: Path, one: Path, work: Path) -> None:
    """Step 3: task 1 cancelled while it runs, the others finish, task 1 resubmitted alone.

    Shard 1 of 3 has one unit of chunks of the one-process plan (about four units whatever the size, below
    ~8,000 rows), whose rows are encoded sorted by length across the unit: its chunks complete at moments
    that depend on the audio, most near the unit's end, so there is no moment to wait for at which it has
    certainly written some rows and not all. It is cancelled once its script runs (the extract starting);
    a shard killed between chunks is tests/features/test_extract_shards.py's."""
    print(f"## 3. scancel task {CANCELLED} while it runs, then sbatch --array={CANCELLED} SCRIPT", flush=True)
    out, jobs = work / "cancelled", work / "jobs-cancel"
    script, job = submit(slurm, model, data, out, jobs)
    deadline = time.monotonic() + ARRAY_TIMEOUT_S
    while not _started(slurm, job, jobs):
        if time.monotonic() > deadline:
            raise CheckFailed(f"task {job}_{CANCELLED} did not start in {ARRAY_TIMEOUT_S} s")
        time.sleep(0.2)
    slurm.run(["squeue", "-j", job])
    slurm.run(["scancel", f"{job}_{CANCELLED}"])
    slurm.wait(job)
    expected = dict.fromkeys(range(ARRAY), "COMPLETED") | {CANCELLED: "CANCELLED"}
    expect_states(slurm.states(job), expected, job)
    store = out / one.name
    print(summary(store), flush=True)
    info = slurm.run([sys.executable, "-m", "ser_cache", "info", str(store)])
    pending = _pending(store)
    if pending.get(f"{CANCELLED}/{ARRAY}", 0) == 0 or any(n for s, n in pending.items() if s != f"{CANCELLED}/{ARRAY}"):
        raise CheckFailed(f"{store}: expected rows pending in shard {CANCELLED}/{ARRAY} alone, got {pending}")
    if f"{CANCELLED}/{ARRAY}" not in info:
        raise CheckFailed(f"ser-cache info {store} does not name shard {CANCELLED}/{ARRAY} as missing:\n{info}")
    text = slurm.run(["sbatch", "--parsable", f"--array={CANCELLED}", script])
    again = text.strip().split(";")[0]
    slurm.wait(again)
    expect_states(slurm.states(again), {CANCELLED: "COMPLETED"}, again)
    for log in sorted(jobs.glob(f"*-{job}_*.out")) + sorted(jobs.glob(f"*-{again}_*.out")):
        _show(log)
    slurm.run([sys.executable, "-m", "ser_cache", "info", str(store)])
    expect_identical(one, store)


def main(argv: list[str]) -> int:
    """python slurm_check.py SLURM_CONF WORK [MODEL]: the steps on a running cluster; builds a tiny WavLM
    when no MODEL is given."""
    if len(argv) not in (2, 3):
        print("usage: slurm_check.py SLURM_CONF WORK_DIR [MODEL_DIR]", file=sys.stderr)
        return 2
    conf, work = Path(argv[0]), Path(argv[1])
    data = HERE.parents[2] / "shared" / "data" / "mini-podcast"
    if not (data / "Labels" / "labels_consensus.csv").is_file():
        print(f"{data} is not present (the shared 400-utterance corpus)", file=sys.stderr)
        return 2
    work.mkdir(parents=True, exist_ok=True)
    if len(argv) == 3:
        model = Path(argv[2])
    else:
        sys.path.insert(0, str(HERE.parent))
        import factories

        model = factories.tiny_wavlm(work / "wavlm-tiny")
        print(f"# a tiny random WavLM saved at {model} (tests/factories.py)", flush=True)
    slurm = Slurm(conf)
    t0 = time.monotonic()
    try:
        slurm.run(["sinfo"])
        one = one_process(slurm, model, data, work / "one")
        check_array(slurm, model, data, one, work)
        check_cancel(slurm, model, data, one, work)
    except CheckFailed as exc:
        print(f"FAILED: {exc}", flush=True)
        return 1
    print(f"PASSED in {time.monotonic() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
