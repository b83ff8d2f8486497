"""infra.slurm: the sbatch script of a sharded command, its checks, and submission through sbatch."""

from __future__ import annotations

import os
import stat

import pytest

from ser_cache.infra.slurm import ArrayJob, SlurmError, batch_script, submit, write_script


def test_script_runs_the_command_as_shards_of_a_fixed_count(tmp_path):
    job = ArrayJob("extract", ("--model", "wavlm-large", "--out", "my stores"), array=8, partition="gpu",
                   time="4:00:00", mem="32G", cpus_per_task=8, gpus_per_task=1, max_running=4,
                   sbatch=("--account=abc",))
    text = batch_script(job, log_pattern=tmp_path / "x-%A_%a.out", workdir=tmp_path, python="/env/bin/python")
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    for expected in ("#SBATCH --array=0-7%4", "#SBATCH --partition=gpu", "#SBATCH --time=4:00:00",
                     "#SBATCH --mem=32G", "#SBATCH --cpus-per-task=8", "#SBATCH --gpus-per-task=1",
                     "#SBATCH --account=abc", f"#SBATCH --chdir={tmp_path}", "export SER_CACHE_SHARDS=8",
                     'export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"',
                     "/env/bin/python -m ser_cache extract --model wavlm-large --out 'my stores' --shard slurm"):
        assert expected in lines, expected
    assert "#SBATCH --array=0" in batch_script(ArrayJob("sweep", (), array=1), log_pattern=tmp_path / "l",
                                               workdir=tmp_path).splitlines()


@pytest.mark.parametrize("change, says", [({"array": 0}, "--array 0"), ({"time": "4h"}, "--time '4h'"),
                                          ({"mem": "lots"}, "--mem 'lots'"), ({"gpus_per_task": -1}, "--gpus-per-task"),
                                          ({"args": ("--shard", "0/2")}, "leave it out"),
                                          ({"sbatch": ("account=abc",)}, "one long sbatch option"),
                                          ({"command": "train-heads"}, "expected one of extract")])
def test_bad_requests_are_named(tmp_path, change, says):
    job = ArrayJob(**{"command": "extract", "args": (), "array": 2, **change})
    with pytest.raises(SlurmError, match=says.replace("(", r"\(")):
        batch_script(job, log_pattern=tmp_path / "l", workdir=tmp_path)


def test_write_never_replaces_a_script(tmp_path):
    job = ArrayJob("transcribe", ("--data", "d"), array=3)
    first, second = write_script(job, tmp_path / "jobs"), write_script(job, tmp_path / "jobs")
    assert first != second and first.exists() and second.exists()
    assert os.stat(first).st_mode & stat.S_IXUSR
    assert f"#SBATCH --output={(tmp_path / 'jobs').resolve()}/{first.stem}-%A_%a.out" in first.read_text()


def _fake_sbatch(folder, body):
    folder.mkdir()
    exe = folder / "sbatch"
    exe.write_text("#!/bin/sh\n" + body)
    exe.chmod(0o755)


def test_submit_returns_the_job_id(tmp_path, monkeypatch):
    _fake_sbatch(tmp_path / "bin", f'echo "$@" > {tmp_path / "args"}\necho "4242;cluster"\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    script = write_script(ArrayJob("extract", (), array=2), tmp_path / "jobs")
    assert submit(script) == "4242"
    assert (tmp_path / "args").read_text().split() == ["--parsable", str(script)]


def test_submit_says_why_sbatch_refused_or_is_missing(tmp_path, monkeypatch):
    script = write_script(ArrayJob("extract", (), array=2), tmp_path / "jobs")
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    with pytest.raises(SlurmError, match="sbatch is not on PATH"):
        submit(script)
    _fake_sbatch(tmp_path / "bin", 'echo "sbatch: error: invalid partition specified: gpu" >&2\nexit 1\n')
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(SlurmError, match="invalid partition specified: gpu"):
        submit(script)
