"""extract --shard I/N: shards partition the plan, write exactly the store one process writes (a shard
killed and rerun included), create the store safely when they start together, and show their progress."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import soundfile as sf
import zarr
from typer.testing import CliRunner

from ser_cache.cli.app import app
from ser_cache.features.errors import ExtractError, StoreError
from ser_cache.features.extract import ExtractConfig, extract
from ser_cache.features.report import read_report, report_path
from ser_cache.features.shard_progress import progress, shard_chunks, shard_plan
from ser_cache.features.store import FeatureStore
from ser_cache.features.store_lock import StoreLock
from ser_cache.infra.shards import Shard

from factories import msp_corpus

ARRAYS = ("ids", "features", "written", "failed")


def cfg(model, data, out, **kw):
    base = dict(model=str(model), data=data, out=out, device="cpu", workers=0, progress=False, chunk_rows=2)
    base.update(kw)
    return ExtractConfig(**base)


def assert_same_store(a, b):
    """Every array of the two stores equal byte for byte, and the same report."""
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    for name in ARRAYS:
        x, y = np.asarray(ga[name][:]), np.asarray(gb[name][:])
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert x.tobytes() == y.tobytes(), f"array {name} differs"
    assert read_report(report_path(a)) == read_report(report_path(b))


@pytest.mark.parametrize("rows, chunk_rows", [(13, 1), (37, 2), (101, 3), (5, 4)])
def test_shards_partition_the_chunks(tmp_path, rows, chunk_rows):
    store = FeatureStore.create(tmp_path / "s.zarr", [f"u{i}" for i in range(rows)], (4,), {}, chunk_rows=chunk_rows)
    units = shard_plan(store)
    for count in range(1, 8):
        taken = [c for i in range(count) for c in shard_chunks(store, Shard(i, count))]
        assert sorted(taken) == list(range(store.n_chunks)), count  # every chunk in exactly one shard
        for i in range(count):  # a shard takes whole units of the one-process plan
            mine = set(shard_chunks(store, Shard(i, count)))
            assert all(set(u) <= mine or not set(u) & mine for u in units)
        sizes = [len(Shard(i, count).share(units)) for i in range(count)]
        assert max(sizes) - min(sizes) <= 1


def _corpus_with_a_bad_file(tmp_path, n=21):
    data = msp_corpus(tmp_path / "c", n=n, unlabeled=0)
    names = sorted(p.name for p in (data / "Audios").iterdir())
    sf.write(str(data / "Audios" / names[9]), np.zeros(0, dtype=np.float32), 16_000)  # empty: reported, not written
    return data


KILLER = """
import os, signal, sys
import zarr
from ser_cache.features.store import FeatureStore
original_write, original_set = FeatureStore.write_chunk, zarr.Array.__setitem__
state = {"chunk_writes": 0, "sets": 0}
def write_chunk(self, *args):
    state["chunk_writes"] += 1
    state["sets"] = 0
    return original_write(self, *args)
def setitem(self, key, value):
    if state["chunk_writes"] == 2:
        state["sets"] += 1
        if state["sets"] == 2:  # the second chunk's features are on disk, its flags are not
            os.kill(os.getpid(), signal.SIGKILL)
    return original_set(self, key, value)
FeatureStore.write_chunk = write_chunk
zarr.Array.__setitem__ = setitem
from ser_cache.cli.app import main
sys.argv = ["ser-cache", "extract", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
def test_three_shards_one_killed_and_rerun_write_the_one_process_store(models, tmp_path):
    data = _corpus_with_a_bad_file(tmp_path)
    out = tmp_path / "sharded"
    model = models["wavlm"]
    # Shard 1 first, killed with SIGKILL inside its second chunk write.
    script = tmp_path / "killer.py"
    script.write_text(textwrap.dedent(KILLER))
    args = ["--model", str(model), "--data", str(data), "--out", str(out), "--chunk-rows", "2", "--device", "cpu",
            "--workers", "0", "--no-progress", "--shard", "1/3"]
    p = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == -9, p.stderr
    path = out / "wavlm-tiny.zarr"
    store = FeatureStore.open(path)
    assert store.attrs["shards"] == {"count": 3} and store.attrs["complete"] is False
    mine = set(shard_chunks(store, Shard(1, 3)))
    written, failed = store.flags()
    done_chunks = {c for c in range(store.n_chunks) if (written | failed)[slice(*store.chunk_bounds(c))].all()}
    assert len(done_chunks) == 1 and done_chunks <= mine  # only its first chunk; never outside its share

    r0 = extract(cfg(model, data, out, shard=Shard(0, 3)))
    assert not r0.complete and "1/3" in r0.shards_pending and "2/3" in r0.shards_pending
    ours = set(shard_chunks(store, Shard(0, 3)))
    written, failed = FeatureStore.open(path).flags()
    resolved = written | failed
    for c in range(store.n_chunks):
        rows = slice(*store.chunk_bounds(c))
        assert resolved[rows].all() == (c in ours or c in done_chunks), c
    info = CliRunner().invoke(app, ["info", str(path)], terminal_width=200)
    assert info.exit_code == 0, info.output
    assert "shard 0/3" in info.output and "shards missing" in info.output and "1/3, 2/3" in info.output

    r2 = extract(cfg(model, data, out, shard=Shard(2, 3)))
    assert not r2.complete and r2.shards_pending.startswith("shard 1/3")
    r1 = extract(cfg(model, data, out, shard=Shard(1, 3)))  # the killed shard, rerun with the same command
    assert r1.complete and r1.shards_pending == ""
    assert r1.computed == r1.shard_rows - 2  # its first chunk survived the kill
    again = extract(cfg(model, data, out, shard=Shard(1, 3)))  # a finished shard: nothing to do
    assert again.computed == 0 and again.complete

    one = extract(cfg(model, data, tmp_path / "one"))
    assert one.failed == 1 and FeatureStore.open(path).attrs["complete"] is True
    assert_same_store(one.store, path)
    assert not list(out.glob("*.partial.csv")) and not list(out.glob("*.lock"))


def _start_shard(barrier, model, data, out, index):
    """A forked process: wait for the other three, then run shard `index` of 4 (exit 1 on any error)."""
    import traceback

    import torch

    torch.set_num_threads(1)  # the parent's thread pool does not survive the fork
    try:
        barrier.wait(60)
        extract(cfg(model, data, out, shard=Shard(index, 4)))
    except BaseException:  # noqa: BLE001 - the parent reads the exit code; the reason goes to stderr
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


@pytest.mark.slow
def test_four_shards_started_at_the_same_instant(models, tmp_path):
    """Four processes pass a barrier together and each runs a shard of a store none has created yet.
    Forked after torch and the model classes are imported (spawned ones spend ~8 s each importing)."""
    import multiprocessing

    from transformers import WavLMModel  # noqa: F401 - imported once here, before the fork

    data = msp_corpus(tmp_path / "c", n=9, unlabeled=0)
    out = tmp_path / "sharded"
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_start_shard, args=(barrier, models["wavlm"], data, out, i)) for i in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(300)
        assert proc.exitcode == 0, f"shard process exited with {proc.exitcode} (its traceback is on stderr)"
    assert not list(out.glob(".*creating*"))  # no creation left half done
    one = extract(cfg(models["wavlm"], data, tmp_path / "one"))
    path = out / "wavlm-tiny.zarr"
    assert FeatureStore.open(path).attrs["complete"] is True
    assert_same_store(one.store, path)


def test_a_second_copy_of_a_shard_and_a_run_without_shard_are_refused(models, tmp_path):
    data = msp_corpus(tmp_path / "c", n=6, unlabeled=0)
    out = tmp_path / "f"
    path = out / "wavlm-tiny.zarr"
    with StoreLock(path, Shard(1, 2)):
        with pytest.raises(ExtractError, match=r"shard 1/2 is already running \(pid"):
            extract(cfg(models["wavlm"], data, out, shard=Shard(1, 2)))
        with pytest.raises(ExtractError, match=r"1 shard\(s\) of it are running"):
            extract(cfg(models["wavlm"], data, out))
        with pytest.raises(StoreError, match="shard 1/2"):  # readers wait for the shards too
            FeatureStore.create(path, ["a"], (4,), {}).check_readable()
        r = extract(cfg(models["wavlm"], data, tmp_path / "g", shard=Shard(0, 2)))  # another store: no matter
        assert r.shard == Shard(0, 2)
    with StoreLock(path):
        with pytest.raises(ExtractError, match="an extraction without --shard is writing"):
            extract(cfg(models["wavlm"], data, out, shard=Shard(0, 2)))


def test_shard_slurm_reads_the_array_task(models, tmp_path, monkeypatch):
    data = msp_corpus(tmp_path / "c", n=9, unlabeled=0)
    out = tmp_path / "f"
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "6")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    monkeypatch.delenv("SER_CACHE_SHARDS", raising=False)
    result = CliRunner().invoke(app, ["extract", "--model", str(models["wavlm"]), "--data", str(data), "--out",
                                      str(out), "--chunk-rows", "1", "--device", "cpu", "--workers", "0",
                                      "--no-progress", "--shard", "slurm"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "shard 1/2:" in result.output and "rows pending in shard 0/2" in result.output
    store = FeatureStore.open(out / "wavlm-tiny.zarr")
    written, _ = store.flags()
    assert [p.written for p in progress(store, 2)] == [0, int(written.sum())]
    assert written[shard_chunks(store, Shard(1, 2))].all()
    bad = CliRunner().invoke(app, ["extract", "--model", str(models["wavlm"]), "--data", str(data), "--out",
                                   str(out), "--shard", "2/2"], terminal_width=200)
    assert bad.exit_code == 2 and "expected I from 0 to 1" in bad.output
