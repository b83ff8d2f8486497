"""`ser-cache slurm extract|transcribe|sweep`: the command's options are checked before a script is written."""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

from ser_cache.cli.app import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, list(map(str, args)), terminal_width=200)


@pytest.mark.parametrize("command, options", [
    ("extract", ["--model", "wavlm-large", "--data", "corpus", "--out", "stores"]),
    ("transcribe", ["--data", "corpus", "--out", "asr.csv"]),
    ("sweep", ["--features", "a.zarr", "--data", "corpus", "--out", "sweep"]),
])
def test_writes_a_script_of_the_command(tmp_path, command, options):
    r = invoke("slurm", command, "--array", 4, "--jobs-dir", tmp_path / "jobs", "--", *options)
    assert r.exit_code == 0, r.output
    script = next((tmp_path / "jobs").glob(f"{command}-*.sbatch"))
    assert f"script: {script}" in r.output and "sbatch " in r.output
    text = script.read_text()
    assert "#SBATCH --array=0-3" in text and f"-m ser_cache {command} {' '.join(options)} --shard slurm" in text


def test_bad_command_options_fail_before_anything_is_written(tmp_path):
    r = invoke("slurm", "extract", "--array", 2, "--jobs-dir", tmp_path / "jobs", "--model", "m", "--bogus", 1)
    assert r.exit_code == 2 and "No such option: --bogus" in r.output
    r = invoke("slurm", "extract", "--array", 2, "--jobs-dir", tmp_path / "jobs", "--model", "m")
    assert r.exit_code == 2 and "Missing option '--data'" in r.output
    r = invoke("slurm", "extract", "--array", 2, "--jobs-dir", tmp_path / "jobs", "--model", "m", "--data", "d",
               "--out", "o", "--shard", "0/2")
    assert r.exit_code == 2 and "leave it out" in r.output
    r = invoke("slurm", "extract", "--array", 0, "--jobs-dir", tmp_path / "jobs", "--model", "m", "--data", "d",
               "--out", "o")
    assert r.exit_code == 2 and "--array 0" in r.output
    assert not (tmp_path / "jobs").exists()


def test_submit_prints_the_job(tmp_path, monkeypatch):
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "sbatch"
    fake.write_text("#!/bin/sh\necho 77\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    r = invoke("slurm", "extract", "--array", 3, "--submit", "--jobs-dir", tmp_path / "jobs",
               "--sbatch=--account=abc", "--sbatch", "--qos=high", "--model", "m", "--data", "d", "--out", "o")
    assert r.exit_code == 0, r.output
    assert "job: 77" in r.output and "sbatch --array=K" in r.output
    text = next((tmp_path / "jobs").glob("*.sbatch")).read_text()
    assert "#SBATCH --account=abc\n#SBATCH --qos=high\n" in text
