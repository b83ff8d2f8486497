"""The plan of a sweep, OUT/sweep.plan.json: the sweep's options, written before any training.

Shards of one sweep (`--shard I/N`, infra/shards.py) run as separate processes, at the same time or
days apart; the plan file is what they agree on. The first to arrive writes it; every later one
compares its own options with it and is refused on a difference (naming the options), since shards
of two different sweeps in one folder would write a sweep.json that no single sweep wrote.
`ser-cache sweep --summarize OUT` rebuilds the sweep's options from it (`config_fields`).

What the plan holds: the base options (train-heads' options, as TrainHeadsConfig.to_dict records
them, with the stores' and the corpus's paths made absolute so that a shard started from another
folder, or --summarize, finds them; without `out`, which is the folder the plan is in), the seeds,
the variants (name and options, in the order given), the base's inputs, the reference, the
resamples, members_at_once and curves. Options that do not change what a member learns (the
`ignore` of `differences`: device, threads, progress, ...) and members_at_once and curves (how the
members are stacked and drawn) may differ between shards; the plan keeps the first writer's.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from ser_cache.system.errors import TrainError
from ser_cache.version import __version__

PLAN_FILE = "sweep.plan.json"
PLAN_FORMAT = "ser-cache-sweep-plan"
# The sweep's own options, as the plan names them; the first four change what sweep.json says.
SWEEP_OPTIONS = ("seeds", "inputs", "reference", "resamples", "members_at_once", "curves")
HOW_ONLY = ("members_at_once", "curves")


def plan_of(cfg) -> dict:
    """The plan of SweepConfig `cfg` (JSON-ready)."""
    base = cfg.base.to_dict()
    base.pop("out")
    base["features"] = [str(Path(p).resolve()) for p in cfg.base.features]
    base["data"] = str(Path(cfg.base.data).resolve())
    if cfg.base.tensorboard is not None:
        base["tensorboard"] = str(Path(cfg.base.tensorboard).resolve())
    plan = {"format": PLAN_FORMAT, "version": __version__, "base": base,
            "variants": [{"name": v.name, "options": dict(v.options)} for v in cfg.variants],
            **{key: getattr(cfg, key) for key in SWEEP_OPTIONS}}
    return json.loads(json.dumps(plan))  # tuples (layer=) become lists, as they are read back


def read_plan(out: str | Path) -> dict | None:
    """OUT's plan, or None when there is none; a damaged one is an error naming the file."""
    path = Path(out) / PLAN_FILE
    if not path.is_file():
        return None
    try:
        plan = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TrainError(f"{path}: a damaged sweep plan ({exc}); it is written by `ser-cache sweep`: run the "
                         "sweep's command again with --overwrite to write it anew") from None
    problem = _shape_problem(plan)
    if problem:
        raise TrainError(f"{path}: not a sweep plan ({problem}); it is written by `ser-cache sweep`: run the "
                         "sweep's command again with --overwrite to write it anew")
    return plan


def _shape_problem(plan) -> str | None:
    if not isinstance(plan, dict) or plan.get("format") != PLAN_FORMAT:
        return f"no \"format\": \"{PLAN_FORMAT}\""
    if not isinstance(plan.get("base"), dict) or not isinstance(plan.get("variants"), list):
        return "no \"base\" options or \"variants\" list"
    missing = [key for key in SWEEP_OPTIONS if key not in plan]
    if missing:
        return f"no {', '.join(missing)}"
    for v in plan["variants"]:
        if not (isinstance(v, dict) and isinstance(v.get("name"), str) and isinstance(v.get("options"), dict)):
            return f"variant {v!r} has no name and options"
    return None


def config_fields(plan: dict, out: str | Path, config_class) -> dict:
    """The SweepConfig fields the plan holds, `out` its folder: base (a `config_class`, TrainHeadsConfig),
    variants as (name, options) pairs, and the sweep's own options."""
    base = dict(plan["base"])
    base["features"] = tuple(Path(p) for p in base.get("features", ()))
    base["data"] = Path(base["data"]) if base.get("data") is not None else None
    base["tensorboard"] = None if base.get("tensorboard") is None else Path(base["tensorboard"])
    base["layer"] = tuple(base.get("layer", ()))
    base["out"] = Path(out)
    try:
        base_cfg = config_class(**base)
    except TypeError as exc:  # an option this version does not know, or one missing
        raise TrainError(f"{Path(out) / PLAN_FILE}: its base options are not this version's ({exc}); run the "
                         "sweep's command again with --overwrite to write the plan anew") from None
    variants = tuple((v["name"], {k: tuple(x) if k == "layer" else x for k, x in v["options"].items()})
                     for v in plan["variants"])
    return {"base": base_cfg, "variants": variants, **{key: plan[key] for key in SWEEP_OPTIONS}}


def differences(plan: dict, wanted: dict, ignore: Iterable[str] = ()) -> list[str]:
    """The options on which `wanted` (this sweep's plan) differs from `plan` (the file's), each as
    'OPTION: VALUE in the plan, VALUE here'; base options in `ignore` and how-only options left out."""
    ignore = set(ignore)
    found = []
    have, want = plan["base"], wanted["base"]
    for key in [*want, *(k for k in have if k not in want)]:
        if key in ignore:
            continue
        a, b = have.get(key), want.get(key)
        if key == "features" and a is not None and b is not None:
            a, b = sorted(a), sorted(b)
        if a != b:
            found.append(f"{key}: {a!r} in the plan, {b!r} here")
    for key in SWEEP_OPTIONS:
        if key not in HOW_ONLY and plan[key] != wanted[key]:
            found.append(f"{key}: {plan[key]!r} in the plan, {wanted[key]!r} here")
    theirs = {v["name"]: v["options"] for v in plan["variants"]}
    ours = {v["name"]: v["options"] for v in wanted["variants"]}
    for name in [*ours, *(n for n in theirs if n not in ours)]:
        if name not in theirs:
            found.append(f"variant {name}: not in the plan, {_options(ours[name])} here")
        elif name not in ours:
            found.append(f"variant {name}: {_options(theirs[name])} in the plan, not here")
        elif theirs[name] != ours[name]:
            found.append(f"variant {name}: {_options(theirs[name])} in the plan, {_options(ours[name])} here")
    if not found and [v["name"] for v in plan["variants"]] != [v["name"] for v in wanted["variants"]]:
        # The order of the variants is the order of the plan's members, which the shares are cut from.
        found.append(f"the variants' order: {', '.join(v['name'] for v in plan['variants'])} in the plan, "
                     f"{', '.join(v['name'] for v in wanted['variants'])} here")
    return found


def _options(options: dict) -> str:
    return "'" + " ".join(f"{k.replace('_', '-')}={v}" for k, v in options.items()) + "'"
