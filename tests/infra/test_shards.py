"""infra.shards: --shard I/N and --shard slurm name one part of a plan; the parts partition it."""

from __future__ import annotations

import pytest

from ser_cache.infra.shards import SHARDS_VARIABLE, Shard, ShardError, lock_target, parse_shard, share_sizes


@pytest.mark.parametrize("count", range(1, 8))
@pytest.mark.parametrize("items", [0, 1, 5, 13, 101])
def test_shares_partition_the_plan(count, items):
    plan = [f"item-{i}" for i in range(items)]
    shares = [Shard(i, count).share(plan) for i in range(count)]
    taken = [x for s in shares for x in s]
    assert sorted(taken) == sorted(plan) and len(taken) == len(set(taken))
    assert [len(s) for s in shares] == share_sizes(items, count)
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    for i, s in enumerate(shares):  # owns() agrees with share()
        assert s == [x for pos, x in enumerate(plan) if Shard(i, count).owns(pos)]


def test_parse_i_of_n():
    assert parse_shard("2/5") == Shard(2, 5)
    assert parse_shard(" 0 / 1 ") == Shard(0, 1)
    assert parse_shard(None) is None and parse_shard("") is None
    assert Shard(2, 5).label == "2/5" and Shard(2, 5).slug == "shard-2-of-5"


@pytest.mark.parametrize("text, says", [("5/5", "expected I from 0 to 4"), ("1/0", "N of 1 or more"),
                                        ("1-3", "expected I/N"), ("a/b", "expected I/N"), ("-1/3", "expected I/N")])
def test_bad_specs_are_named(text, says):
    with pytest.raises(ShardError, match=says):
        parse_shard(text)


def test_slurm_array_environment():
    env = {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "3", "SLURM_ARRAY_TASK_COUNT": "5"}
    assert parse_shard("slurm", env) == Shard(1, 5)
    assert parse_shard("SLURM", {**env, "SLURM_ARRAY_TASK_ID": "3"}) == Shard(0, 5)
    stepped = {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_STEP": "2",
               "SLURM_ARRAY_TASK_COUNT": "3"}
    assert parse_shard("slurm", stepped) == Shard(2, 3)


def test_fixed_count_keeps_a_resubmitted_task_its_shard():
    """`sbatch --array=1 job.sbatch` reruns task 1 alone: Slurm says count 1, min 1; the script's count holds."""
    env = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "1",
           SHARDS_VARIABLE: "3"}
    assert parse_shard("slurm", env) == Shard(1, 3)
    with pytest.raises(ShardError, match="fixes the shards at 3"):
        parse_shard("slurm", {**env, "SLURM_ARRAY_TASK_ID": "3"})


@pytest.mark.parametrize("env, says", [({}, "SLURM_ARRAY_TASK_ID is not set"),
                                       ({"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "2"}, "not a whole"),
                                       ({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "0",
                                         "SLURM_ARRAY_TASK_COUNT": "3"}, "not one of I = 0..N-1")])
def test_slurm_environment_problems(env, says):
    with pytest.raises(ShardError, match=says):
        parse_shard("slurm", env)


def test_lock_target_is_beside_the_path(tmp_path):
    assert lock_target(tmp_path / "a.zarr", Shard(1, 3)) == tmp_path / "a.zarr.shard-1-of-3"


def test_running_lists_the_shards_whose_lock_is_held(tmp_path):
    from ser_cache.infra import locks
    from ser_cache.infra.shards import running

    store = tmp_path / "a.zarr"
    held = locks.FileLock(lock_target(store, Shard(1, 3)))
    held.acquire()
    other = locks.FileLock(lock_target(tmp_path / "a.zarr.b", Shard(0, 2)))  # another name that starts alike
    other.acquire()
    try:
        assert list(running(store)) == [Shard(1, 3)]
        assert "pid" in running(store)[Shard(1, 3)]
    finally:
        held.release()
        other.release()
    assert running(store) == {}
