"""`ser-cache sweep`: seeds and variants of the heads trained together, with honest statistics.

The paper's Tables 3-5 compare single runs whose mean CCCs differ by 0.001-0.03; whether such a
difference is larger than the spread between seeds, one run per row cannot say. Heads on a cache
train in seconds, so a sweep trains every row with several seeds and compares them properly.

The sweep, in order:
1. read the corpus and every store once (rows.load_rows, as train-heads; rows are those with
   features in every store of the sweep);
2. expand the members: the base options (train-heads' options) and each `--variant` (a name and
   the options it changes), each with seeds seed .. seed + seeds - 1. Member (variant, s) is the
   run `train-heads` would make with those options and `--seed s`, written to OUT/variant/seed-s;
3. prepare each member as train-heads prepares its run (its O/X selection, label range, gender
   and speaker classes, seeded initialisation) and stack the members whose models have the same
   shapes (stack.MemberStack): they train in one loop, each on its own batches drawn from its own
   sampler, the K members' products batched;
4. each epoch: a step for every member while it has batches (members with fewer rows per epoch sit
   out the last steps), then every member scored on the Development rows; each keeps its best epoch;
5. each member written as an ordinary run directory (predict, evaluate, ensemble take it);
6. the summary (sweep.json, and the table `ser-cache sweep` prints): per variant, mean ± std over
   seeds of the Development CCC; per variant against the reference, a paired bootstrap over the
   Development utterances and seeds both were scored on (stats.paired_bootstrap). Under a class
   task (--task categorical|both, sweep-wide: a variant cannot change the task or the classes) the
   same for macro-F1 (stats.paired_bootstrap_macro_f1), with accuracy and balanced accuracy.

A sweep run again with the same command reuses the members already written (and refuses ones
written with other options, or on a store since rebuilt with other settings, unless --overwrite), so
a killed sweep loses at most the stack that was training. A member whose training diverges (its
loss not finite) stops there and is not written; the others go on, and the summary lists it (from
OUT/VARIANT/seed-S.diverged.json, written in its place; a sweep run again trains it again).

The members themselves (what is in a member's folder, reused or refused; the record of one that
diverged; how members stack) are sweep_members.py's.

Every sweep writes its plan, OUT/sweep.plan.json (sweep_plan.py), before any training, under a lock
on OUT. With `--shard I/N` (infra/shards.py: Slurm job arrays) the members, in the order above
(variants as given, each with its seeds), are the plan, and shard I trains members I, I+N, ... that
are not written yet (one that diverged is tried again, as by a sweep run again), holding a lock of
its own (a second copy of the same shard is refused). A shard whose options differ from the plan's
is refused, naming them (--overwrite replaces the plan; an unsharded sweep, which trains the whole
plan itself, replaces it). After its share a shard looks, under the lock on OUT, whether every
member of the plan is written (or diverged): then it writes sweep.json, from the plan's options, as
`summarize_sweep` (`ser-cache sweep --summarize OUT`) does; else it lists the members missing and
leaves sweep.json to the shard that ends last.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ser_cache.infra import atomic, locks
from ser_cache.infra.runtime import resolve_device, torch_threads
from ser_cache.infra.shards import Shard, lock_target
from ser_cache.runs import layout
from ser_cache.system.epoch_log import tensorboard_problem
from ser_cache.system.errors import TrainError
from ser_cache.system.rows import TrainingData, load_rows
from ser_cache.train.fit import Diverged, fit
from ser_cache.train.options import TrainHeadsConfig
from ser_cache.train.sweep_members import (
    BASE,
    NOT_COMPARED,
    Member,
    diverged_path,
    diverged_record,
    group_stacks,
    is_written,
    member_view,
    prepare,
    read_diverged,
)
from ser_cache.train.sweep_plan import PLAN_FILE, config_fields, differences, plan_of, read_plan
from ser_cache.train.sweep_summary import summarize

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
# How long a sweep waits for the lock on OUT (another shard writing the plan or sweep.json: seconds at most).
OUT_LOCK_TIMEOUT_S = 3600.0
LOSS_KEYS = ("total", "ccc", "gender", "speaker")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")

# What a variant may change: option (as on the command line) → TrainHeadsConfig field and type.
# "inputs" is the sweep's own: which of the loaded stores the member takes ("a+b", or "all").
VARIANT_OPTIONS = {
    "lr": ("lr", float), "weight-decay": ("weight_decay", float), "gender-weight": ("gender_weight", float),
    "speaker-weight": ("speaker_weight", float), "aam-margin": ("aam_margin", float),
    "aam-scale": ("aam_scale", float), "ox": ("ox", str), "undersample": ("undersample", bool),
    "batch-size": ("batch_size", int), "dropout": ("dropout", float), "conv-dropout": ("conv_dropout", float),
    "hidden": ("hidden", int), "conv-dim": ("conv_dim", int), "inputs": ("inputs", str),
    "class-weights": ("class_weights", str), "class-loss-weight": ("class_loss_weight", float),
    "layer": ("layer", tuple),  # train-heads' --layer: K, or NAME=K (one input)
}
# The task and its classes are the sweep's, not a variant's: every member learns the same task over the
# same classes, so that the variants are compared on one metric (macro-F1 over the same classes, CCC).
SWEEP_WIDE = ("task", "classes")
# Variant options that only a class task (--task categorical|both) has.
CLASS_VARIANT_OPTIONS = ("class_weights", "class_loss_weight")


@dataclass(frozen=True)
class Variant:
    """A named set of option changes against the base options."""

    name: str
    options: dict = field(default_factory=dict)  # TrainHeadsConfig field (or "inputs") → value


def parse_variant(text: str) -> Variant:
    """'NAME: option=value option=value' (commas also separate) → Variant; errors name the part."""
    name, sep, rest = text.partition(":")
    name = name.strip()
    if not sep or not NAME.match(name):
        raise TrainError(f"--variant {text!r}: expected 'NAME: option=value ...' with a NAME of letters, digits, "
                         "'.', '_', '+' or '-'")
    options, given = {}, {}
    for part in re.split(r"[,\s]+", rest.strip()):
        if not part:
            continue
        key, eq, value = part.partition("=")
        key = key.strip().removeprefix("--").replace("_", "-")
        if key in SWEEP_WIDE:
            raise TrainError(f"--variant {name}: {key} is the sweep's, not a variant's: every variant learns the "
                             "sweep's --task over its --classes (so that they are compared on one metric); run one "
                             "sweep per task or class set")
        if not eq or key not in VARIANT_OPTIONS:
            raise TrainError(f"--variant {name}: {part!r} is not option=value with an option of "
                             f"{', '.join(VARIANT_OPTIONS)}")
        attr, kind = VARIANT_OPTIONS[key]
        if not value.strip():
            raise TrainError(f"--variant {name}: {key}= has no value; give {key}=VALUE (no space after '=')")
        if attr in options:
            raise TrainError(f"--variant {name}: {key} is given twice ({given[attr]} and {part.strip()}); give each "
                             "option once")
        given[attr] = part.strip()
        options[attr] = _value(name, key, value.strip(), kind)
    if not options:
        raise TrainError(f"--variant {name}: changes no option; give at least one option=value")
    return Variant(name, options)


def _value(variant: str, key: str, value: str, kind):
    if kind is tuple:  # --layer: one value of a repeatable option, checked with the member's options
        return (value,)
    if kind is bool:
        if value.lower() in ("yes", "true", "on", "1"):
            return True
        if value.lower() in ("no", "false", "off", "0"):
            return False
        raise TrainError(f"--variant {variant}: {key}={value}: expected yes or no")
    try:
        return kind(value)
    except ValueError:
        raise TrainError(f"--variant {variant}: {key}={value}: "
                         f"expected a{'n integer' if kind is int else ' number'}") from None


@dataclass(frozen=True)
class SweepConfig:
    """The base options (a TrainHeadsConfig whose `out` is the sweep folder and `seed` the first
    seed), the seeds, the variants and how the summary compares them."""

    base: TrainHeadsConfig
    seeds: int = 3
    variants: tuple[Variant, ...] = ()
    inputs: str = "all"  # the base variant's stores: "all" or names joined by "+"
    reference: str = BASE
    members_at_once: int | None = None  # at most this many members in one stack (memory); None: no limit
    resamples: int = 1000
    curves: bool = False  # curves.png in every member's run (0.5 s each; `ser-cache plot run` draws it later)
    shard: Shard | None = None  # --shard I/N: train only members I, I+N, ... of the plan (plan_members)

    def verify(self) -> None:
        problems = []
        if self.seeds < 1:
            problems.append(f"--seeds {self.seeds}: expected 1 or more")
        if self.members_at_once is not None and self.members_at_once < 1:
            problems.append(f"--members-at-once {self.members_at_once}: expected 1 or more")
        if self.resamples < 1:
            problems.append(f"--resamples {self.resamples}: expected 1 or more")
        names = [v.name for v in self.variants]
        if BASE in names:
            problems.append(f"--variant {BASE}: '{BASE}' names the sweep's own options; choose another name")
        if len(set(names)) != len(names):
            problems.append("--variant: a name is given twice "
                            f"({', '.join(sorted({n for n in names if names.count(n) > 1}))})")
        if self.reference not in (BASE, *names):
            problems.append(f"--reference {self.reference}: expected {BASE} or a --variant name "
                            f"({', '.join(names) or 'none given'})")
        if self.base.task == "attributes":
            for v in self.variants:
                for attr in CLASS_VARIANT_OPTIONS:
                    if attr in v.options:
                        problems.append(f"--variant {v.name}: {attr.replace('_', '-')} is an option of a class task; "
                                        "give --task categorical or both")
        for variant in (Variant(BASE, {"inputs": self.inputs}), *self.variants):
            try:
                member_config(self, variant, self.base.seed).verify()
            except TrainError as exc:
                problems.append(str(exc) if variant.name == BASE else f"--variant {variant.name}: {exc}")
        if problems:
            raise TrainError("; ".join(problems))

    def all_variants(self) -> list[Variant]:
        return [Variant(BASE, {"inputs": self.inputs}), *self.variants]


def member_config(cfg: SweepConfig, variant: Variant, seed: int) -> TrainHeadsConfig:
    """Member (variant, seed): the run train-heads would make with these options, in OUT/variant/seed-s."""
    changes = {k: v for k, v in variant.options.items() if k != "inputs"}
    return dataclasses.replace(cfg.base, **changes, seed=seed, out=Path(cfg.base.out) / variant.name / f"seed-{seed}",
                               tensorboard=None if cfg.base.tensorboard is None
                               else Path(cfg.base.tensorboard) / variant.name / f"seed-{seed}")


def plan_members(cfg: SweepConfig) -> list[Member]:
    """The sweep's members in the plan's order: the variants (base first, then as given), each with its
    seeds in order. Shard I of N trains members I, I+N, ... of this list (Shard.share)."""
    return [Member(v.name, s, member_config(cfg, v, s), v.options.get("inputs", cfg.inputs))
            for v in cfg.all_variants() for s in range(cfg.base.seed, cfg.base.seed + cfg.seeds)]


@dataclass
class SweepResult:
    out: Path
    summary: dict  # sweep.json; {} when not complete
    trained: int
    reused: int
    wall_seconds: float
    diverged: int = 0  # members whose training diverged: trained, not written
    complete: bool = True  # every member of the plan written (or diverged), sweep.json written
    missing: list[str] = field(default_factory=list)  # "variant/seed-s" of the plan not written yet (other shards)


def sweep(cfg: SweepConfig) -> SweepResult:
    """Train every member (of its shard, with cfg.shard) not yet written, write each as a run, then,
    when every member of the plan is there, the summary (sweep.json)."""
    cfg.verify()
    out = Path(cfg.base.out)
    if layout.is_run_dir(out) or layout.is_unfinished_run(out):
        raise TrainError(f"--out {out}: a run directory; a sweep writes a folder of runs, choose another --out")
    if cfg.base.tensorboard is not None and tensorboard_problem():
        raise TrainError(tensorboard_problem())
    with _shard_lock(out, cfg.shard), torch_threads(cfg.base.threads):
        _plan_in_force(cfg, write=False)  # refused before the stores are read, when it will be
        return _sweep(cfg)


def summarize_sweep(out: str | Path) -> SweepResult:
    """sweep.json of the sweep planned in `out` (OUT/sweep.plan.json), from its members' runs; an error
    listing the members not written yet, if any."""
    t0 = time.perf_counter()
    out = Path(out)
    if not out.is_dir():
        raise TrainError(f"--summarize {out}: no such folder; give a sweep's --out")
    plan = read_plan(out)
    if plan is None:
        raise TrainError(f"--summarize {out}: no {PLAN_FILE} in it: the plan is written by `ser-cache sweep` (every "
                         "sweep, since sweeps can be sharded); for a sweep written before, run its command again "
                         "(`ser-cache sweep ... --out OUT`, without --shard): it reuses the members written and "
                         f"writes {SWEEP_FILE}")
    cfg = plan_config(plan, out)
    with torch_threads(cfg.base.threads):
        data = _load(cfg)
        members, views = _members(cfg, data)
        result = _finish(cfg, members, views, data, trained=0, diverged=0, t0=t0)
    if not result.complete:
        raise TrainError(f"--summarize {out}: {len(result.missing)} of {len(members)} member(s) of the plan not "
                         f"written yet: {', '.join(result.missing)}; run the shards that train them (the same "
                         "`ser-cache sweep ... --shard I/N` command), then summarize again")
    return result


def plan_config(plan: dict, out: str | Path) -> SweepConfig:
    """The SweepConfig of a plan (sweep_plan.read_plan), its folder `out`."""
    fields = config_fields(plan, out, TrainHeadsConfig)
    cfg = SweepConfig(**{**fields, "variants": tuple(Variant(n, o) for n, o in fields["variants"])})
    try:
        cfg.verify()
    except TrainError as exc:
        raise TrainError(f"{Path(out) / PLAN_FILE}: its options are not a sweep's ({exc}); run the sweep's command "
                         "again with --overwrite to write the plan anew") from None
    return cfg


@contextlib.contextmanager
def _shard_lock(out: Path, shard: Shard | None) -> Iterator[None]:
    """A shard's own lock, for its whole run: a second copy of the same shard is refused."""
    if shard is None:
        yield
        return
    lock = locks.FileLock(lock_target(out, shard))
    try:
        lock.acquire()
    except locks.Held as held:
        raise TrainError(f"--shard {shard.label}: this shard of the sweep in {out} is already running "
                         f"({held.holder}; lock {held.path}); wait for it to end, or stop it first") from None
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def _out_lock(out: Path) -> Iterator[None]:
    """The lock on OUT, waited for: writing the plan and sweep.json, one process at a time."""
    try:
        lock = locks.acquire_waiting(out, OUT_LOCK_TIMEOUT_S)
    except locks.Held as held:
        raise TrainError(f"{out}: waited {OUT_LOCK_TIMEOUT_S:.0f} s for the lock on the sweep folder, held by "
                         f"{held.holder} ({held.path})") from None
    try:
        yield
    finally:
        lock.release()


def _plan_in_force(cfg: SweepConfig, *, write: bool) -> dict:
    """The plan of the sweep in OUT: `cfg`'s own if there is none yet (written when `write`, under the
    lock on OUT). A plan that differs refuses a shard (unless --overwrite); an unsharded sweep, which
    trains the whole plan itself, or --overwrite replaces it (and the sweep.json it had)."""
    out = Path(cfg.base.out)
    wanted = plan_of(cfg)
    with _out_lock(out) if write else contextlib.nullcontext():
        try:
            existing = read_plan(out)
        except TrainError:
            if not cfg.base.overwrite:
                raise
            existing = {}  # damaged: replaced under --overwrite
        found = None if existing is None else (differences(existing, wanted, NOT_COMPARED) if existing
                                               else ["a damaged plan"])
        if found and cfg.shard is not None and not cfg.base.overwrite:
            raise TrainError(f"--shard {cfg.shard.label}: {out / PLAN_FILE}: this shard's options differ from the "
                             f"plan of the sweep in {out} ({'; '.join(found)}); give every shard the same options, "
                             "or pass --overwrite to replace the plan (members written with other options are then "
                             "trained again)")
        if not write:
            return existing or wanted
        if existing is None or found:
            if found:
                log.info("%s: the plan is replaced by this sweep's (%s)", out / PLAN_FILE, "; ".join(found))
                (out / SWEEP_FILE).unlink(missing_ok=True)  # another plan's summary
            out.mkdir(parents=True, exist_ok=True)
            atomic.write_json_atomic(out / PLAN_FILE, wanted)
            return wanted
        return existing


def _load(cfg: SweepConfig) -> TrainingData:
    base = cfg.base
    return load_rows(base.data, base.train_split, base.dev_split, base.features, speaker_weight=0.0, frames=True,
                     memory_budget_gb=base.memory_budget_gb, layer=base.layer)


def _members(cfg: SweepConfig, data: TrainingData) -> tuple[list[Member], dict[str, TrainingData]]:
    members = plan_members(cfg)
    # One view per variant (its seeds take the same stores); this also checks every inputs= before any training.
    views = {m.variant: member_view(data, m) for m in members if m.seed == cfg.base.seed}
    for m in members:  # as its config.json records them: the stores the member takes
        m.cfg = dataclasses.replace(m.cfg, features=tuple(s.path for s in views[m.variant].inputs))
    return members, views


def _sweep(cfg: SweepConfig) -> SweepResult:
    t0 = time.perf_counter()
    base = cfg.base
    device = resolve_device(base.device)
    data = _load(cfg)
    members, views = _members(cfg, data)
    plan = _plan_in_force(cfg, write=True)
    mine = cfg.shard.share(members) if cfg.shard else members
    todo = [m for m in mine if not is_written(m, views[m.variant])]
    if todo and data.streamed:
        raise TrainError("the frame stores do not fit the memory budget (--memory-budget) and would be streamed; a "
                         "sweep trains many members on the same rows at once and needs them held: raise "
                         "--memory-budget, or train the variants one by one with train-heads")
    if todo:
        data.place(device)  # every member's view shares these inputs: placed once for all
    if cfg.shard is None:
        log.info("sweep: %d member(s) (%d variant(s) × %d seed(s)), %d already written, %d to train", len(members),
                 len(cfg.all_variants()), cfg.seeds, len(members) - len(todo), len(todo))
    else:
        log.info("sweep shard %s: %d of the plan's %d member(s) (%d variant(s) × %d seed(s)), %d already written, "
                 "%d to train", cfg.shard.label, len(mine), len(members), len(cfg.all_variants()), cfg.seeds,
                 len(mine) - len(todo), len(todo))
    diverged = 0
    by_who = {m.who: m for m in todo}
    stacks = group_stacks([prepare(m, views[m.variant], device, curves=cfg.curves) for m in todo],
                          cfg.members_at_once)
    for i, stack in enumerate(stacks, 1):
        log.info("stack %d of %d: %d member(s): %s", i, len(stacks), len(stack),
                 ", ".join(f"{j.extra['sweep']['variant']}/seed-{j.cfg.seed}" for j in stack))
        for j in stack:
            j.extra["sweep"]["trained_with"] = len(stack)
            # Trained again (a sweep run again retries a member that diverged): its old record goes.
            diverged_path(by_who[f"{j.extra['sweep']['variant']}/seed-{j.cfg.seed}"]).unlink(missing_ok=True)
        for done in fit(stack, device, progress=base.progress):
            if isinstance(done, Diverged):
                who = f"{done.job.extra['sweep']['variant']}/seed-{done.job.cfg.seed}"
                diverged += 1
                log.warning("sweep member %s: %s", who, done.message())
                path = diverged_path(by_who[who])
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic.write_json_atomic(path, diverged_record(done))
    # The summary of a sharded sweep comes from the plan's options, so that whichever shard ends last (or
    # --summarize) writes the same sweep.json; an unsharded sweep's from its own, as always.
    summary_cfg = cfg if cfg.shard is None else plan_config(plan, base.out)
    return _finish(summary_cfg, members, views, data, trained=len(todo), diverged=diverged, t0=t0,
                   reused=len(mine) - len(todo), shard=cfg.shard)


def _finish(cfg: SweepConfig, members: list[Member], views: dict[str, TrainingData], data: TrainingData, *,
            trained: int, diverged: int, t0: float, reused: int | None = None,
            shard: Shard | None = None) -> SweepResult:
    """Under the lock on OUT: sweep.json when every member of the plan is written or diverged; else the
    list of those missing (a shard's share is done, others' are not)."""
    out = Path(cfg.base.out)
    with _out_lock(out):
        records, missing, written = {}, [], 0
        for m in members:
            # A folder without config.json may be a run another shard is writing now (config.json comes
            # last): missing, not refused as is_written refuses it in a shard's own share.
            if layout.is_run_dir(Path(m.cfg.out)) and is_written(m, views[m.variant]):
                written += 1
            elif (record := read_diverged(m)) is not None:
                records[m.who] = record
            else:
                missing.append(m.who)
        reused = written if reused is None else reused
        if missing:
            wall = time.perf_counter() - t0
            log.info("sweep%s: %d of %d member(s) of the plan not written yet (%s); %s is written when every one "
                     "is: by the shard that ends last, or `ser-cache sweep --summarize %s`",
                     f" shard {shard.label}" if shard else "", len(missing), len(members), ", ".join(missing),
                     SWEEP_FILE, out)
            return SweepResult(out, {}, trained, reused, wall, diverged=diverged, complete=False, missing=missing)
        summary = summarize(cfg, members, data, diverged=records)
        atomic.write_json_atomic(out / SWEEP_FILE, summary)
    wall = time.perf_counter() - t0
    log.info("sweep written to %s in %.1f s", out, wall)
    return SweepResult(out, summary, trained, reused, wall, diverged=diverged)
