"""Sharded extraction under torchrun: two CPU processes on gloo, one of them killed, then the job rerun."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest

from ser_cache.features.extract import ExtractConfig, extract
from ser_cache.features.report import report_path
from ser_cache.features.store import FeatureStore

from factories import msp_corpus

# The rank processes run `extract --pooling mean`, then the same command with `--pooling frames`:
# starting torchrun and two ranks (each importing torch and transformers) is most of this test's
# time, so three jobs serve both poolings where a job per pooling and run would take four. The
# first job loses rank 1 in the mean extraction, the second (which finishes it) in the frames one.
# The two commands share the rank's process group (the first one's shutdown is skipped): a second
# init_process_group in the same torchrun rank hung here.
WRAPPER = """
import os, signal, sys
pooling_now = None
if os.environ.get("RANK") == "1" and os.environ.get("KILL_RANK_1_IN"):
    from ser_cache.features.store import FeatureStore
    original = FeatureStore.write_chunk
    def write_chunk(self, *args):
        original(self, *args)
        if pooling_now == os.environ["KILL_RANK_1_IN"]:
            os.kill(os.getpid(), signal.SIGKILL)  # rank 1 dies after its first chunk of that pooling
    FeatureStore.write_chunk = write_chunk
from ser_cache.cli.app import main
from ser_cache.infra import distributed
shutdown = distributed.shutdown
distributed.shutdown = lambda dist: None  # one process group for both commands: the last one ends it
args = sys.argv[1:]
for pooling_now in ("mean", "frames"):
    if pooling_now == "frames":
        distributed.shutdown = shutdown
    sys.argv = ["ser-cache", *args, "--pooling", pooling_now]
    try:
        main()
    except SystemExit as exc:
        if exc.code not in (None, 0):
            raise
    print(f"rank {os.environ['RANK']}: extract --pooling {pooling_now} exited 0", file=sys.stderr, flush=True)
"""

STORES = {"mean": "whisper-tiny.zarr", "frames": "whisper-tiny-frames.zarr"}


@pytest.mark.slow
def test_two_ranks_with_a_killed_rank_equal_a_single_process_run(models, tmp_path):
    data = msp_corpus(tmp_path / "c", n=24, unlabeled=0)
    names = sorted(p.name for p in (data / "Audios").iterdir())
    for i in (0, 5):  # one bad file in a unit of each rank
        (data / "Audios" / names[i]).write_bytes(b"not audio at all")
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER)
    out = tmp_path / "dist"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(wrapper),
           "extract", "--model", str(models["whisper"]), "--data", str(data), "--out", str(out), "--chunk-rows", "2",
           "--device", "cpu", "--workers", "0", "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def done(pooling):
        written, failed = FeatureStore.open(out / STORES[pooling]).flags()
        return (written | failed).sum()

    # For each pooling: the job dies when rank 1 is killed (as on a cluster when a node goes down) ...
    first = subprocess.run(cmd, env={**env, "KILL_RANK_1_IN": "mean"}, capture_output=True, text=True, timeout=240)
    assert first.returncode != 0 and "exitcode: -9" in first.stderr, first.stderr[-3000:]
    assert 0 < done("mean") < 24 and not (out / STORES["frames"]).exists()
    # ... and the same command again finishes the rest, with the ranks sharing what is left.
    second = subprocess.run(cmd, env={**env, "KILL_RANK_1_IN": "frames"}, capture_output=True, text=True,
                            timeout=240)
    assert second.returncode != 0 and "exitcode: -9" in second.stderr, second.stderr[-3000:]
    assert all(f"rank {r}: extract --pooling mean exited 0" in second.stderr for r in (0, 1)), second.stderr[-3000:]
    assert done("mean") == 24 and 0 < done("frames") < 24
    third = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]

    for pooling, name in STORES.items():
        ref = extract(ExtractConfig(model=str(models["whisper"]), data=data, out=tmp_path / "single", chunk_rows=2,
                                    device="cpu", workers=0, progress=False, pooling=pooling))
        dist_store = FeatureStore.open(out / name)
        for a, b in zip(FeatureStore.open(ref.store).read(), dist_store.read(), strict=True):
            np.testing.assert_array_equal(a, b)
        if pooling == "frames":  # and every row's frame count, written with its chunk by whichever rank
            np.testing.assert_array_equal(FeatureStore.open(ref.store).frame_counts(), dist_store.frame_counts())
        assert dist_store.attrs["complete"] is True
        with open(report_path(out / name), newline="") as f:
            assert sorted(r["id"] for r in csv.DictReader(f)) == [names[0], names[5]]
    assert not list(out.glob("*.partial.csv"))


def test_extract_ranks_wait_for_each_other_longer_than_torchs_default(monkeypatch, tmp_path):
    """The last rank can finish long after the first (slow files, a slower node); the wait at the
    end must not hit torch's 10-minute default and kill a job whose data is already written."""
    from datetime import timedelta

    import torch

    from ser_cache.features.extract import RANK_WAIT
    from ser_cache.infra import distributed

    seen = {}

    def fake_init_process_group(backend, **kwargs):
        seen.update(kwargs, backend=backend)

    monkeypatch.setattr(torch.distributed, "init_process_group", fake_init_process_group)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("SER_CACHE_BACKEND", "gloo")
    monkeypatch.setattr("ser_cache.features.extract.load_corpus",
                        lambda *a: (_ for _ in ()).throw(RuntimeError("stop here")))
    with pytest.raises(RuntimeError, match="stop here"):
        extract(ExtractConfig(model="unused", data=tmp_path, out=tmp_path, device="cpu", progress=False))
    assert seen == {"backend": "gloo", "timeout": RANK_WAIT} and RANK_WAIT >= timedelta(hours=1)
    seen.clear()
    assert distributed.init().world == 2 and seen == {"backend": "gloo"}  # elsewhere: torch's default


def test_default_decoding_workers_share_the_machine_between_ranks(monkeypatch):
    from ser_cache.infra.distributed import decoding_workers

    monkeypatch.setattr("os.cpu_count", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert decoding_workers("cuda", gpu_cap=8, cpu_cap=2) == 8  # one rank: the cap
    assert decoding_workers("cuda", gpu_cap=4, cpu_cap=0) == 4
    assert decoding_workers("cpu", gpu_cap=8, cpu_cap=2) == 2 and decoding_workers("cpu", gpu_cap=4, cpu_cap=0) == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 8 ranks on this machine: 2 cores each, one for the rank
    assert decoding_workers("cuda", gpu_cap=8, cpu_cap=2) == 1 and decoding_workers("cpu", gpu_cap=8, cpu_cap=2) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")  # no core to spare: still one on a GPU, none on a CPU
    assert decoding_workers("cuda", gpu_cap=8, cpu_cap=2) == 1 and decoding_workers("cpu", gpu_cap=8, cpu_cap=2) == 0
