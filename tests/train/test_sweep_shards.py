"""ser-cache sweep --shard I/N and --summarize OUT: the shares partition the plan, shards run one after
another write what one process writes, the plan file refuses a shard of another sweep."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ser_cache.cli.app import app
from ser_cache.infra import locks
from ser_cache.infra.shards import Shard, lock_target, share_sizes
from ser_cache.runs import layout
from ser_cache.train.options import TrainHeadsConfig
from ser_cache.train.sweep import (
    SWEEP_FILE,
    SweepConfig,
    TrainError,
    parse_variant,
    plan_members,
    summarize_sweep,
    sweep,
)
from ser_cache.train.sweep_members import diverged_path
from ser_cache.train.sweep_plan import PLAN_FILE

from synthetic import make_corpus, make_store

OPTIONS = dict(epochs=2, lr=3e-3, batch_size=32, undersample=False, progress=False, device="cpu", threads=1,
               speaker_weight=0.0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep-shards")
    manifest, ids, feats = make_corpus(tmp / "corpus", 120)
    stores = [make_store(tmp / "features" / f"{name}.zarr", ids, x, kind="text" if name == "text" else "whisper",
                         modality="text" if name == "text" else "audio") for name, x in feats.items()]
    return manifest, stores


def config(corpus, out: Path, *, seeds: int = 3, variants=("drop: ox=drop", "text: inputs=text"), shard=None,
           **kw) -> SweepConfig:
    manifest, stores = corpus
    base = TrainHeadsConfig(**{"features": tuple(stores), "data": manifest, "out": out, **OPTIONS, **kw})
    return SweepConfig(base, seeds=seeds, variants=tuple(parse_variant(v) for v in variants), resamples=50,
                       shard=shard)


def members_figures(summary: dict) -> dict:
    """(variant, seed, figure[, attribute]) → every member's Development figure as sweep.json has it."""
    return {(name, m["seed"], key, *((a,) if isinstance(x, dict) else ())): x[a] if isinstance(x, dict) else x
            for name, v in summary["variants"].items() for m in v["members"] for key, x in m.items() if key != "run"
            for a in (x if isinstance(x, dict) else (None,))}


# --------------------------------------------------------------------------- the plan's shares


@pytest.mark.parametrize(("seeds", "variants"), [(1, ()), (3, ()), (5, ("a: lr=1e-3", "b: ox=drop")),
                                                 (1, ("a: lr=1e-3", "b: ox=drop", "c: hidden=8", "d: dropout=0.1",
                                                      "e: ox=only", "f: batch-size=16"))])
def test_shares_partition_the_plan_for_any_number_of_shards(corpus, tmp_path, seeds, variants):
    """Members in plan order (variants as given × seeds); shard I of N takes I, I+N, ...: every member
    in exactly one shard, the shares' sizes within one of each other, whatever N."""
    cfg = config(corpus, tmp_path / "s", seeds=seeds, variants=variants)
    plan = [m.who for m in plan_members(cfg)]
    names = ["base", *(v.partition(":")[0] for v in variants)]
    assert plan == [f"{n}/seed-{s}" for n in names for s in range(seeds)]
    assert len(plan) % 2 == 1
    for n in range(1, 8):
        shares = [Shard(i, n).share(plan) for i in range(n)]
        assert sorted(sum(shares, [])) == sorted(plan) and len(set(sum(shares, []))) == len(plan)
        assert [len(s) for s in shares] == share_sizes(len(plan), n)
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
        assert shares[0][0] == plan[0] and (n > len(plan) or shares[-1][0] == plan[n - 1])


# --------------------------------------------------------------------------- shards together = one process


@pytest.mark.slow
def test_three_shards_one_after_another_write_what_one_process_writes(corpus, tmp_path):
    """9 members (base, drop, text × 3 seeds) in 3 shards run one after another: the first alone leaves
    no sweep.json and names what is missing; run again it trains nothing; --summarize names the
    members missing; the last shard writes sweep.json, which --summarize writes again byte for byte;
    every member's figures are those of a one-process sweep to 1e-5, the tolerance of members against
    their train-heads runs (test_sweep.py): stacking is not bit-stable on CPU (a member trained alone
    takes the model itself and torch's AdamW, one in a stack the vmapped stack and StackedAdamW, and
    the batched products of a stack of 2 and of 6 round differently: CCCs differ by ~1e-8)."""
    one = sweep(config(corpus, tmp_path / "one"))
    assert one.complete and one.trained == 9
    out = tmp_path / "sharded"
    plan = [m.who for m in plan_members(config(corpus, out))]

    first = sweep(config(corpus, out, shard=Shard(0, 3)))
    assert not first.complete and first.trained == 3 and first.summary == {}
    assert first.missing == [w for i, w in enumerate(plan) if i % 3 != 0]
    assert not (out / SWEEP_FILE).exists() and (out / PLAN_FILE).is_file()
    assert all(layout.is_run_dir(out / w) for w in plan[0::3])
    again = sweep(config(corpus, out, shard=Shard(0, 3)))
    assert (again.trained, again.reused, again.complete) == (0, 3, False)

    with pytest.raises(TrainError, match=r"6 of 9 member\(s\) of the plan not written yet: base/seed-1, base/seed-2, "
                                         r"drop/seed-1"):
        summarize_sweep(out)
    r = CliRunner().invoke(app, ["sweep", "--summarize", str(out)])
    assert r.exit_code == 2 and "Traceback" not in r.output and "text/seed-2" in r.output, r.output

    second = sweep(config(corpus, out, shard=Shard(1, 3)))
    assert (second.trained, second.missing) == (3, plan[2::3]) and not (out / SWEEP_FILE).exists()
    last = sweep(config(corpus, out, shard=Shard(2, 3)))
    assert last.complete and last.trained == 3 and not last.missing
    written = (out / SWEEP_FILE).read_bytes()
    assert json.loads(written) == json.loads(json.dumps(last.summary))

    assert members_figures(last.summary) == pytest.approx(members_figures(one.summary), abs=1e-5)
    for name, v in one.summary["variants"].items():
        assert last.summary["variants"][name]["mean"] == pytest.approx(v["mean"], abs=1e-5)
        assert last.summary["variants"][name]["std"] == pytest.approx(v["std"], abs=1e-5)
    for name, c in one.summary["comparisons"].items():
        assert last.summary["comparisons"][name] == pytest.approx(c, abs=1e-5), name
    assert {k: v for k, v in last.summary.items() if k not in ("variants", "comparisons")} == \
        {k: v for k, v in one.summary.items() if k not in ("variants", "comparisons")}

    (out / SWEEP_FILE).unlink()
    summarized = summarize_sweep(out)
    assert summarized.complete and (summarized.trained, summarized.reused) == (0, 9)
    assert (out / SWEEP_FILE).read_bytes() == written
    r = CliRunner().invoke(app, ["sweep", "--summarize", str(out)], terminal_width=80)
    assert r.exit_code == 0, r.output
    assert "ref." in r.stdout and (out / SWEEP_FILE).read_bytes() == written


# --------------------------------------------------------------------------- refusals


def test_a_shard_with_other_options_is_refused_naming_them(corpus, tmp_path):
    out = tmp_path / "s"
    first = sweep(config(corpus, out, seeds=1, variants=(), epochs=1, shard=Shard(0, 2)))
    assert first.trained == 1 and first.missing == []  # 1 member: shard 1 of 2 has none
    assert first.complete and (out / SWEEP_FILE).is_file()
    plan = json.loads((out / PLAN_FILE).read_text())
    assert plan["seeds"] == 1 and plan["base"]["lr"] == 3e-3 and "out" not in plan["base"]
    with pytest.raises(TrainError, match=r"--shard 1/2: .*sweep.plan.json: this shard's options differ from the plan "
                                         r".*\(lr: 0.003 in the plan, 0.01 here; seeds: 1 in the plan, 2 here; "
                                         r"variant x: not in the plan, 'dropout=0.2' here\)"):
        sweep(config(corpus, out, seeds=2, variants=("x: dropout=0.2",), epochs=1, lr=1e-2, shard=Shard(1, 2)))
    # How a member runs is not what it learns: another device, thread count or stack size is the same plan.
    same = sweep(config(corpus, out, seeds=1, variants=(), epochs=1, shard=Shard(1, 2), threads=2))
    assert (same.trained, same.complete) == (0, True)
    # --overwrite replaces the plan (and the old sweep.json): here one more seed, trained by shard 1.
    wider = sweep(config(corpus, out, seeds=2, variants=(), epochs=1, shard=Shard(1, 2), overwrite=True))
    assert (wider.trained, wider.complete) == (1, True)
    assert json.loads((out / PLAN_FILE).read_text())["seeds"] == 2
    assert [m["seed"] for m in json.loads((out / SWEEP_FILE).read_text())["variants"]["base"]["members"]] == [0, 1]
    # An unsharded sweep trains the whole plan itself: it replaces a plan that differs, as a sweep always could
    # widen its seeds.
    whole = sweep(config(corpus, out, seeds=3, variants=(), epochs=1))
    assert (whole.trained, whole.reused) == (1, 2) and json.loads((out / PLAN_FILE).read_text())["seeds"] == 3


def test_a_second_copy_of_a_running_shard_is_refused(corpus, tmp_path):
    out = tmp_path / "s"
    held = locks.FileLock(lock_target(out, Shard(1, 3)))
    held.acquire()
    try:
        with pytest.raises(TrainError, match=r"--shard 1/3: this shard of the sweep in .* is already running \(pid"):
            sweep(config(corpus, out, seeds=1, shard=Shard(1, 3)))
    finally:
        held.release()
    assert not out.exists()


def test_summarize_names_a_folder_without_plan_and_a_damaged_plan(tmp_path):
    with pytest.raises(TrainError, match="no such folder"):
        summarize_sweep(tmp_path / "nowhere")
    (tmp_path / "old").mkdir()
    with pytest.raises(TrainError, match=r"no sweep.plan.json in it: the plan is written by `ser-cache sweep` .*run "
                                         r"its command again"):
        summarize_sweep(tmp_path / "old")
    (tmp_path / "old" / PLAN_FILE).write_text("{not json")
    with pytest.raises(TrainError, match=r"old/sweep.plan.json: a damaged sweep plan"):
        summarize_sweep(tmp_path / "old")
    (tmp_path / "old" / PLAN_FILE).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(TrainError, match=r"old/sweep.plan.json: not a sweep plan"):
        summarize_sweep(tmp_path / "old")


def test_the_command_refuses_summarize_with_other_options_and_a_bad_shard(corpus, tmp_path):
    manifest, stores = corpus
    mixed = CliRunner().invoke(app, ["sweep", "--summarize", str(tmp_path), "--seeds", "2", "--shard", "0/2"])
    assert mixed.exit_code == 2 and "give it alone (not with --seeds, --shard)" in mixed.output, mixed.output
    args = ["sweep", "-f", str(stores[0]), "-d", str(manifest), "-o", str(tmp_path / "s")]
    for shard, message in (("3/3", "expected I from 0 to 2"), ("slurm", "SLURM_ARRAY_TASK_ID is not set")):
        bad = CliRunner().invoke(app, [*args, "--shard", shard], env={"SLURM_ARRAY_TASK_ID": ""})
        assert bad.exit_code == 2 and "Traceback" not in bad.output and message in bad.output, bad.output
    lacking = CliRunner().invoke(app, ["sweep", "-f", str(stores[0])])
    assert lacking.exit_code == 2 and "missing option --data, --out" in lacking.output, lacking.output
    assert not (tmp_path / "s").exists()


def test_a_diverged_member_is_recorded_and_completes_the_plan(corpus, tmp_path):
    out = tmp_path / "s"
    first = sweep(config(corpus, out, seeds=1, variants=("huge: lr=1e30",), epochs=1, shard=Shard(1, 2)))
    assert (first.diverged, first.missing) == (1, ["base/seed-0"])
    member = next(m for m in plan_members(config(corpus, out, seeds=1, variants=("huge: lr=1e30",), epochs=1))
                  if m.variant == "huge")
    record = json.loads(diverged_path(member).read_text())
    assert diverged_path(member) == out / "huge" / "seed-0.diverged.json" and "training diverged" in record["reason"]
    last = sweep(config(corpus, out, seeds=1, variants=("huge: lr=1e30",), epochs=1, shard=Shard(0, 2)))
    assert last.complete and last.summary["variants"]["huge"]["diverged"] == [{"seed": 0, **record}]
    assert last.summary["comparisons"]["huge"] is None


def test_the_plan_rebuilds_the_sweeps_options(corpus, tmp_path):
    """plan_config(plan_of(cfg)) is cfg (paths made absolute, `out` the folder given): what --summarize runs."""
    from ser_cache.train.sweep import plan_config
    from ser_cache.train.sweep_plan import differences, plan_of

    cfg = config(corpus, tmp_path / "s", seeds=2, variants=("l: layer=2 lr=1e-3", "u: undersample=yes"),
                 gender_weight=0.5)
    cfg = SweepConfig(**{**cfg.__dict__, "members_at_once": 3, "curves": True, "reference": "l", "inputs": "audio"})
    rebuilt = plan_config(json.loads(json.dumps(plan_of(cfg))), tmp_path / "s")
    assert rebuilt == cfg
    assert rebuilt.variants[0].options == {"layer": ("2",), "lr": 1e-3}
    assert differences(plan_of(cfg), plan_of(rebuilt)) == []
    other = SweepConfig(**{**cfg.__dict__, "variants": tuple(reversed(cfg.variants))})
    assert differences(plan_of(cfg), plan_of(other)) == ["the variants' order: l, u in the plan, u, l here"]


def test_a_run_another_shard_is_writing_counts_as_missing_not_as_an_error(corpus, tmp_path):
    """config.json comes last: a member folder without it, in another shard's share, may be a run being
    written right now; the shard that looks is not refused, it lists the member as missing."""
    out = tmp_path / "s"
    (out / "base" / "seed-1").mkdir(parents=True)
    (out / "base" / "seed-1" / layout.WEIGHTS).write_bytes(b"half")
    done = sweep(config(corpus, out, seeds=2, variants=(), epochs=1, shard=Shard(0, 2)))
    assert (done.trained, done.missing) == (1, ["base/seed-1"])
    with pytest.raises(TrainError, match=r"seed-1: this sweep's folder for a member, but not a finished run"):
        sweep(config(corpus, out, seeds=2, variants=(), epochs=1, shard=Shard(1, 2)))  # its own: refused as ever
