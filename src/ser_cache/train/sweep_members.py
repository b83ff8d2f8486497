"""A sweep's members (sweep.py): what each is, what is already in its folder, and how they stack.

A member is the run `train-heads` would make with a variant's options and one seed, in
OUT/VARIANT/seed-S. Here: its view of the sweep's rows (`member_view`: the stores it takes), whether
its run is written already and may be reused (`is_written`: same options, same stores; a run written
with other options or on a store since rebuilt is refused unless --overwrite, and a folder that holds
something else is refused saying what is there), the record of a member whose training diverged
(`diverged_path`, OUT/VARIANT/seed-S.diverged.json), and its job as train-heads sets it up
(`prepare`), stacked with the members whose models have the same shapes (`stack_key`, `group_stacks`).

It knows no SweepConfig: sweep.py expands the options into Members and imports this module, never
the other way round.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ser_cache.runs import layout, rundir
from ser_cache.system.errors import TrainError
from ser_cache.system.rows import SPEAKER_EMBEDDING_KIND, TrainingData
from ser_cache.system.setup import set_up
from ser_cache.train.fit import Diverged, Job
from ser_cache.train.options import TrainHeadsConfig

DIVERGED_SUFFIX = ".diverged.json"  # OUT/VARIANT/seed-S.diverged.json: a member that diverged (no run)
BASE = "base"
# Fields of a member's train options that do not change what it learns: a written member is reused
# whatever they were.
NOT_COMPARED = ("out", "overwrite", "progress", "tensorboard", "threads", "device", "memory_budget_gb")


@dataclass
class Member:
    variant: str
    seed: int
    cfg: TrainHeadsConfig
    inputs_option: str

    @property
    def who(self) -> str:
        """'variant/seed-s', as logs, missing lists and sweep.json name a member."""
        return f"{self.variant}/seed-{self.seed}"


def diverged_path(member: Member) -> Path:
    """OUT/VARIANT/seed-S.diverged.json: the record of a member whose training diverged (it has no run)."""
    out = Path(member.cfg.out)
    return out.with_name(out.name + DIVERGED_SUFFIX)


def read_diverged(member: Member) -> dict | None:
    path = diverged_path(member)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TrainError(f"{path}: a damaged record of a diverged member ({exc}); delete it, and the sweep trains "
                         "the member again") from None
    if not isinstance(record, dict) or "reason" not in record:
        raise TrainError(f"{path}: not the record of a diverged member (no reason); delete it, and the sweep trains "
                         "the member again")
    return record


def diverged_record(d: Diverged) -> dict:
    """What sweep.json keeps of a diverged member (its run was not written)."""
    return {"epoch": d.epoch, "reason": f"training diverged: {d.what} in epoch {d.epoch}",
            "losses": {k: (v if math.isfinite(v) else str(v)) for k, v in d.losses.items()}}


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


def is_written(member: Member, view: TrainingData) -> bool:
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
