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
loss not finite) stops there and is not written; the others go on, and the summary lists it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ser_cache.infra import atomic
from ser_cache.infra.runtime import resolve_device, torch_threads
from ser_cache.runs import layout, rundir
from ser_cache.system.epoch_log import tensorboard_problem
from ser_cache.system.errors import TrainError
from ser_cache.system.rows import SPEAKER_EMBEDDING_KIND, TrainingData, load_rows
from ser_cache.system.setup import set_up
from ser_cache.train.fit import Diverged, Job, fit
from ser_cache.train.options import TrainHeadsConfig
from ser_cache.train.sweep_summary import summarize

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
BASE = "base"
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
# Fields of a member's train options that do not change what it learns: a written member is reused
# whatever they were.
NOT_COMPARED = ("out", "overwrite", "progress", "tensorboard", "threads", "device", "memory_budget_gb")


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


@dataclass
class Member:
    variant: str
    seed: int
    cfg: TrainHeadsConfig
    inputs_option: str


@dataclass
class SweepResult:
    out: Path
    summary: dict
    trained: int
    reused: int
    wall_seconds: float
    diverged: int = 0  # members whose training diverged: trained, not written


def sweep(cfg: SweepConfig) -> SweepResult:
    """Train every member not yet written, write each as a run, then the summary (sweep.json)."""
    cfg.verify()
    out = Path(cfg.base.out)
    if layout.is_run_dir(out) or layout.is_unfinished_run(out):
        raise TrainError(f"--out {out}: a run directory; a sweep writes a folder of runs, choose another --out")
    if cfg.base.tensorboard is not None and tensorboard_problem():
        raise TrainError(tensorboard_problem())
    with torch_threads(cfg.base.threads):
        return _sweep(cfg)


def _sweep(cfg: SweepConfig) -> SweepResult:
    t0 = time.perf_counter()
    base = cfg.base
    device = resolve_device(base.device)
    data = load_rows(base.data, base.train_split, base.dev_split, base.features, speaker_weight=0.0, frames=True,
                     memory_budget_gb=base.memory_budget_gb, layer=base.layer)
    members = [Member(v.name, s, member_config(cfg, v, s), v.options.get("inputs", cfg.inputs))
               for v in cfg.all_variants() for s in range(base.seed, base.seed + cfg.seeds)]
    # One view per variant (its seeds take the same stores); this also checks every inputs= before any training.
    views = {m.variant: member_view(data, m) for m in members if m.seed == base.seed}
    for m in members:  # as its config.json records them: the stores the member takes
        m.cfg = dataclasses.replace(m.cfg, features=tuple(s.path for s in views[m.variant].inputs))
    todo = [m for m in members if not _written(m, views[m.variant])]
    if todo and data.streamed:
        raise TrainError("the frame stores do not fit the memory budget (--memory-budget) and would be streamed; a "
                         "sweep trains many members on the same rows at once and needs them held: raise "
                         "--memory-budget, or train the variants one by one with train-heads")
    if todo:
        data.place(device)  # every member's view shares these inputs: placed once for all
    log.info("sweep: %d member(s) (%d variant(s) × %d seed(s)), %d already written, %d to train", len(members),
             len(cfg.all_variants()), cfg.seeds, len(members) - len(todo), len(todo))
    diverged: dict[str, Diverged] = {}  # "variant/seed-s" → how its training diverged
    stacks = group_stacks([prepare(m, views[m.variant], device, curves=cfg.curves) for m in todo],
                          cfg.members_at_once)
    for i, stack in enumerate(stacks, 1):
        log.info("stack %d of %d: %d member(s): %s", i, len(stacks), len(stack),
                 ", ".join(f"{j.extra['sweep']['variant']}/seed-{j.cfg.seed}" for j in stack))
        for j in stack:
            j.extra["sweep"]["trained_with"] = len(stack)
        for done in fit(stack, device, progress=base.progress):
            if isinstance(done, Diverged):
                who = f"{done.job.extra['sweep']['variant']}/seed-{done.job.cfg.seed}"
                diverged[who] = done
                log.warning("sweep member %s: %s", who, done.message())
    summary = summarize(cfg, members, data, diverged={k: _diverged_record(d) for k, d in diverged.items()})
    atomic.write_json_atomic(Path(base.out) / SWEEP_FILE, summary)
    wall = time.perf_counter() - t0
    log.info("sweep written to %s in %.1f s", base.out, wall)
    return SweepResult(Path(base.out), summary, len(todo), len(members) - len(todo), wall, diverged=len(diverged))


def _diverged_record(d: Diverged) -> dict:
    """What sweep.json keeps of a diverged member (its run was not written)."""
    return {"epoch": d.epoch, "reason": f"training diverged: {d.what} in epoch {d.epoch}",
            "losses": {k: (v if math.isfinite(v) else str(v)) for k, v in d.losses.items()}}


# --------------------------------------------------------------------------- members


def member_view(data: TrainingData, member: Member) -> TrainingData:
    """The sweep's rows with the member's inputs: `inputs=` names, or every store but a speaker-embedding
    store while the speaker head is on (as train-heads)."""
    speaker_on = member.cfg.speaker_weight > 0
    names = [s.name for s in data.inputs]
    if member.inputs_option == "all":
        chosen = [s for s in data.inputs if not (speaker_on and s.attrs.get("kind") == SPEAKER_EMBEDDING_KIND)]
    else:
        wanted = [n.strip() for n in member.inputs_option.split("+") if n.strip()]
        unknown = [n for n in wanted if n not in names]
        if unknown or not wanted:
            raise TrainError(f"{_who(member)}: inputs={member.inputs_option}: {', '.join(unknown) or 'no name'} "
                             f"is not a loaded store; the stores are {', '.join(names)}")
        chosen = [s for s in data.inputs if s.name in wanted]
    if not chosen:
        raise TrainError(f"{_who(member)}: no input left: the only stores are speaker embeddings, kept out while the "
                         "speaker head is on")
    left_out = [{**s.record(), "reason": "speaker-embedding store kept out of the input: speaker head on"
                 if speaker_on and s.attrs.get("kind") == SPEAKER_EMBEDDING_KIND
                 else "not an input of this sweep variant"} for s in data.inputs if s not in chosen]
    return dataclasses.replace(data, inputs=chosen, excluded_stores=data.excluded_stores + left_out,
                               counts=dict(data.counts))


def _who(member: Member) -> str:
    return "the base options" if member.variant == BASE else f"--variant {member.variant}"


def _written(member: Member, view: TrainingData) -> bool:
    """Whether member's run is already there with the same options and trained on the stores as they
    are now (then reused); a run written with other options, or on a store since rebuilt with other
    settings, is an error unless --overwrite (then it is trained again)."""
    out = Path(member.cfg.out)
    if not layout.is_run_dir(out):
        _check_member_folder(out)
        return False
    config = rundir.read_config(out)
    recorded = config.get("train", {})
    wanted = member.cfg.to_dict()
    # An attribute run records no task options: its task is "attributes", which a class member's is not.
    wanted.setdefault("task", member.cfg.task)
    for key, value in wanted.items():
        if key in NOT_COMPARED:
            continue
        have = recorded.get(key, "attributes" if key == "task" else None)
        if key == "features":
            same = sorted(str(Path(p).resolve()) for p in have or []) == sorted(str(Path(p).resolve()) for p in value)
        elif key == "data":  # recorded absolute (as typed before provenance came)
            same = have is not None and Path(have).resolve() == Path(value).resolve()
        else:
            same = have == value or (isinstance(value, float) and isinstance(have, (int, float))
                                     and math.isclose(have, value))
        if not same:
            if member.cfg.overwrite:
                return False
            raise TrainError(f"{out}: a run written with other options ({key}: {have!r}, this sweep: {value!r}); "
                             "pass --overwrite to train it again, or choose another --out")
    stale = _stale_input(config, view)
    if stale:
        if member.cfg.overwrite:
            return False
        raise TrainError(f"{out}: {stale}; its scores are not those of the store as it is now: pass --overwrite to "
                         "train it again, or choose another --out")
    return True


def _stale_input(config: dict, view: TrainingData) -> str | None:
    """How a written member's input stores (its config.json's record) differ from the stores now given."""
    from ser_cache.features.store_ref import settings_differences

    recorded = {str(Path(r.get("path", "")).resolve()): r for r in config.get("inputs", []) if isinstance(r, dict)}
    for s in view.inputs:
        r = recorded.get(str(Path(s.path).resolve()))
        now = s.attrs.get("fingerprint")
        if r is None:
            return f"trained without store {s.path}"
        if r.get("fingerprint") != now:
            diffs = settings_differences(r.get("settings") or {}, s.attrs.get("settings") or {},
                                         labels=("trained on", "now"))
            return (f"trained on store {s.path} with fingerprint {r.get('fingerprint')}, but the store now has "
                    f"{now}: it was rebuilt since ({'; '.join(diffs) or 'other settings'})")
    return None


def _check_member_folder(out: Path) -> None:
    """A member's folder that holds something other than a finished run is refused, saying what is there:
    a run's config.json is written last, so this is not a member a sweep wrote (a copy, a hand edit)."""
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise TrainError(f"{out}: a file where this sweep keeps a member's run folder; move it away, and the "
                         "sweep trains the member there")
    found = sorted(p.name for p in out.iterdir())
    if not found:
        return  # an empty folder is as good as none
    shown = ", ".join(found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else "")
    what = ("its config.json is not a ser-cache run's (damaged or edited)" if layout.CONFIG in found
            else f"it has no {layout.CONFIG}")
    raise TrainError(f"{out}: this sweep's folder for a member, but not a finished run: {what} (it holds {shown}); "
                     "move the folder away (or delete it) and run the sweep again to train that member")


def prepare(member: Member, data: TrainingData, device, *, curves: bool) -> Job:
    """Member's job: exactly what train-heads sets up for its run (setup.set_up), written into the sweep."""
    return Job(member.cfg, data, set_up(member.cfg, data, device), title=f"{member.variant} seed {member.seed}",
               overwrite=True, curves=curves,
               extra={"sweep": {"folder": str(Path(member.cfg.out).parent.parent), "variant": member.variant,
                                "seed": member.seed}})


def stack_key(job: Job) -> tuple:
    """Members with equal keys have models of the same shapes and batch alike: they can share a stack."""
    model = job.run.model
    heads = {k: v for k, v in model.heads.config().items()
             if k not in ("label_min", "label_max", "aam_margin", "aam_scale")}
    # Which layer each member picks is a buffer of its own (heads.LayerPick): members that pick
    # different layers of the same inputs stack; which inputs they pick in must agree.
    if "layer_picks" in heads:
        heads["layer_picks"] = sorted(heads["layer_picks"])
    return (repr(sorted(heads.items())), repr(model.config()), job.cfg.batch_size, job.cfg.epochs,
            str(model.compute_dtype), job.run.aam is not None)


def group_stacks(prepared: Sequence[Job], members_at_once: int | None) -> list[list[Job]]:
    groups: dict[tuple, list[Job]] = {}
    for p in prepared:
        groups.setdefault(stack_key(p), []).append(p)
    size = members_at_once or max((len(g) for g in groups.values()), default=1)
    return [g[i:i + size] for g in groups.values() for i in range(0, len(g), size)]
