"""`ser-cache slurm extract --array 3 --submit` on a real one-node Slurm (slurm_cluster.sh): the shards
write, byte for byte, the store one process writes; a task cancelled mid-run and resubmitted alone
(`sbatch --array=1 SCRIPT`) completes it. The steps are slurm_check.py's, shared with run_slurm_check.sh.

Opt-in: they run only with SER_CACHE_SLURM_TESTS=1 in the environment (about two minutes on two cores:
eight extract processes start torch), so that the README's test command stays within its time where
Slurm happens to be installed. Skipped also where the Slurm and munge packages are missing (apt-get
install -y slurm-wlm munge), where the
tests do not run as root, or where the cluster does not start within about 60 s. Run with -s to see the
commands and what Slurm answers."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import slurm_check

pytestmark = pytest.mark.slow

START_S = 60
OPT_IN = "SER_CACHE_SLURM_TESTS"


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> slurm_check.Slurm:
    if os.environ.get(OPT_IN) != "1":
        pytest.skip(f"the real-Slurm check is opt-in: {OPT_IN}=1 python -m pytest tests/integration -s, or "
                    "tests/integration/run_slurm_check.sh")
    missing = slurm_check.missing_tools()
    if missing:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} missing): apt-get install -y slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("the one-node Slurm runs its daemons as root (SlurmUser=root); run the tests as root")
    # Under pytest-xdist each worker has its own cluster (ports and state): two controllers may run at once.
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    offset = 2 * int(worker) if worker.isdigit() else 0
    env = {**os.environ, "SER_CACHE_SLURMCTLD_PORT": str(6917 + offset), "SER_CACHE_SLURMD_PORT": str(6918 + offset),
           "SER_CACHE_SLURM_WAIT_S": str(START_S)}
    # Not under pytest's tmp folders: munged wants every folder above its socket searchable by all (0700 there).
    state = Path(tempfile.mkdtemp(prefix="ser-cache-slurm-test-"))
    start = subprocess.run([slurm_check.CLUSTER, "start", state], env=env, capture_output=True, text=True,
                           timeout=START_S + 30)
    try:
        if start.returncode:
            pytest.skip(f"the one-node Slurm did not start: {start.stderr.strip() or start.stdout.strip()}")
        yield slurm_check.Slurm(state / "slurm.conf")
    finally:
        subprocess.run([slurm_check.CLUSTER, "stop", state], env=env, capture_output=True, timeout=60)
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
def one_store(slurm, models, mini_podcast, tmp_path_factory) -> Path:
    return slurm_check.one_process(slurm, models["wavlm"], mini_podcast, tmp_path_factory.mktemp("one"))


def test_an_array_of_three_writes_the_one_process_store(slurm, models, mini_podcast, one_store, tmp_path):
    slurm_check.check_array(slurm, models["wavlm"], mini_podcast, one_store, tmp_path)


def test_a_task_cancelled_mid_run_and_resubmitted_alone_completes_the_store(slurm, models, mini_podcast, one_store,
                                                                           tmp_path):
    slurm_check.check_cancel(slurm, models["wavlm"], mini_podcast, one_store, tmp_path)
