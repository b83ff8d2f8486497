"""What lets `finetune wavlm` stop and go on: the per-epoch checkpoint, the best epoch's weights,
`--resume`, the finished run's files, and starting from another run's weights (`--init-from`).

    <run>/checkpoint.safetensors      after every epoch, atomically: model, optimizer, scaler, sampler,
                                      every rank's random generators, LayerDrop's generator, history
    <run>/best-epochNNNN.safetensors  the best weights so far, written before the checkpoint naming it

Why the best weights live in their own file, named by epoch: a kill -9 between writing them and
writing the checkpoint must leave a checkpoint that points at weights of its own best epoch.

Why safetensors with a JSON tree (statefile.py) and not torch.save: a run directory travels (a
colleague's run, an archive), and unpickling a file runs whatever code its author put in it.
Loading a checkpoint must only ever read numbers. The pickled checkpoint.pt of earlier versions
is therefore refused, never loaded.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ser_cache.infra import statefile
from ser_cache.runs import layout, rundir
from ser_cache.runs.checkpoint_file import (
    CHECKPOINT,
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    CheckpointError,
    read_checkpoint,
    refuse_legacy,
)
from ser_cache.system.errors import TrainError

log = logging.getLogger(__name__)

BEST = "best-epoch{:04d}.safetensors"  # the best weights so far, named by epoch (see save_checkpoint)
# Options that may change between a run and its --resume: they do not change the numbers.
RESUME_FREE = ("device", "workers", "threads", "progress", "resume", "overwrite")


@dataclass
class State:
    """What an epoch boundary must carry over: the checkpoint's content besides the modules."""

    history: list
    best: dict  # score, epoch, dev scores, Development predictions (weights: BEST file)
    epoch: int  # epochs done


def init_from_run(model, run_dir: Path) -> None:
    """Load a fine-tuned run's weights (e.g. the authors' imported checkpoint) into a new model.

    The encoder, the layer weighting, the convolutions and the A/V/D heads must all fit; the
    heads' label range stays this run's (paper Eq. 2: the training labels'). A gender or speaker
    head is taken over only where both have it with the same classes' count; otherwise it starts
    afresh (logged); so does a class head (--task categorical|both), and a categorical model leaves
    the run's A/V/D heads out. Anything else that does not fit is an error naming the keys.
    """
    from safetensors.torch import load_file

    from ser_cache.system.finetuned import model_state

    config = check_init_run(model, run_dir)
    weights = Path(run_dir) / layout.WEIGHTS
    if not weights.is_file():
        raise TrainError(f"--init-from {run_dir}: {layout.WEIGHTS} is missing")
    if run_lora(run_dir) is not None or config[model.encoder_attr].get("weights") == "base":
        import torch

        from ser_cache.runs.finetuned_run import load_finetuned

        with torch.random.fork_rng():  # rebuilding the run's model draws nothing from this run's generators
            theirs = load_finetuned(Path(run_dir), config).state_dict()  # its base model and adapters
    else:
        theirs = model_state(load_file(str(weights)))
    ours = model.state_dict()
    optional = ("heads.gender.", "heads.speaker.", "heads.classifier.")
    unwanted = optional if model.heads.attributes else (*optional, "heads.regressors.")
    skipped, problems, take = [], [], {}
    for key, value in ours.items():
        if key.endswith((".lo", ".hi")) and key.startswith("heads.regressors."):
            continue  # the label range is this run's
        if key not in theirs or theirs[key].shape != value.shape:
            (skipped if key.startswith(optional) else problems).append(key)
            continue
        take[key] = theirs[key]
    extra = sorted(k for k in theirs if k not in ours and not k.startswith(unwanted))
    if problems or extra:
        shown = ", ".join((problems + extra)[:6]) + (" …" if len(problems) + len(extra) > 6 else "")
        raise TrainError(f"--init-from {run_dir}: its weights do not fit this model ({shown}); give the same "
                         "--model, --conv-dim, --hidden and cached inputs as the run was built with")
    model.load_state_dict(take, strict=False)
    if skipped:
        log.info("--init-from %s: %s start afresh (not in the run, or another size)", run_dir,
                 ", ".join(sorted({k.split(".")[1] for k in skipped})))


def check_init_run(model, run_dir: Path) -> dict:
    """The --init-from run's config.json, refused unless it is a fine-tuned run of the model's encoder."""
    from ser_cache.runs.predict import is_finetuned

    config = rundir.read_config(run_dir)
    label = "WavLM" if model.encoder_attr == "wavlm" else "Whisper"
    if not is_finetuned(config) or config.get("system") != f"finetuned-{model.encoder_attr}":
        raise TrainError(f"--init-from {run_dir}: not a fine-tuned {label} run (its system is "
                         f"{config.get('system', 'heads on cached features')!r})")
    return config


def run_lora(run_dir: Path) -> dict | None:
    """The LoRA spec a fine-tuned run records, or None."""
    from ser_cache.runs.predict import is_finetuned
    from ser_cache.system.online_kinds import arch_of

    config = rundir.read_config(run_dir)
    return arch_of(config).get("lora") if is_finetuned(config) else None


# --------------------------------------------------------------------------- checkpoint and resume


def _rng_state() -> dict:
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: Path, cfg, dist, state: State, model, aam, optimizer, scaler, sampler) -> None:
    """The checkpoint, atomically: a kill -9 at any moment leaves the previous epoch's or this one's.

    The best weights live in their own file named by epoch, written before the checkpoint that
    refers to it; older ones are removed only after. So the checkpoint always points at a file that
    exists and holds exactly the weights of its best epoch, even when a replayed epoch differs.
    """
    rng = dist.all_gather(_rng_state())  # dropout draws differ per rank: keep every rank's generators
    if dist.is_main:
        ckpt = {
            "epoch": state.epoch,
            "train": cfg.to_dict(),
            "world": dist.world,
            "model": model.state_dict(),
            "aam": aam.state_dict() if aam is not None else None,
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "scheduler": None,  # constant learning rates, as in the paper
            "sampler": sampler.state_dict(),
            "rng": rng,
            "layerdrop_rng": model.layerdrop_generator.get_state(),  # the same on every rank
            "best": state.best,
            "history": state.history,
        }
        statefile.save(out / CHECKPOINT, ckpt, fmt=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION)
        _remove_stale_best(out, state.best["epoch"])
    dist.barrier()


def _remove_stale_best(out: Path, keep_epoch: int) -> None:
    keep = BEST.format(keep_epoch)
    for f in out.glob("best-epoch*.safetensors"):
        if f.name != keep:
            f.unlink(missing_ok=True)


def resume(out: Path, cfg, dist, model, aam, optimizer, scaler, sampler) -> State | None:
    """Load the checkpoint into the modules and generators; None when there is nothing to resume."""
    path = out / CHECKPOINT
    refuse_legacy(out)
    if not path.is_file():
        if dist.is_main:
            log.info("--resume: no checkpoint in %s yet; starting from the first epoch", out)
        return None
    ckpt = read_checkpoint(out)
    saved, now = ckpt["train"], cfg.to_dict()
    diffs = [f"{k}: run has {saved.get(k)!r}, now {now.get(k)!r}" for k in sorted(now)
             if k not in RESUME_FREE and saved.get(k) != now.get(k)]
    if diffs:
        raise TrainError(f"--resume: the options differ from those the run at {out} was started with "
                         f"({'; '.join(diffs)}); give the same options, or --overwrite to start again")
    try:
        model.load_state_dict(ckpt["model"])
        if aam is not None:
            aam.load_state_dict(ckpt["aam"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        sampler.load_state_dict(ckpt["sampler"])
        states = ckpt["rng"]
        if len(states) != dist.world and dist.is_main:
            log.warning("--resume: the run was saved by %d rank(s) and continues on %d; it will not end exactly "
                        "where an uninterrupted run would", len(states), dist.world)
        _set_rng_state(states[dist.rank % len(states)])
        if ckpt.get("layerdrop_rng") is not None:
            model.layerdrop_generator.set_state(ckpt["layerdrop_rng"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, ZeroDivisionError) as exc:
        # Options that match but state that does not fit: another model in the same folder, an edited file.
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: does not fit the model and optimizer of these options ({reason}); "
                              "start the run again with --overwrite") from None
    if dist.is_main:
        _remove_stale_best(out, ckpt["best"]["epoch"])
        log.info("--resume: continuing %s after epoch %d of %d", out, ckpt["epoch"], cfg.epochs)
    return State(history=ckpt["history"], best=ckpt["best"], epoch=int(ckpt["epoch"]))


def finish(out: Path, config: dict, metrics: dict, state: State, dev_ids: list[str], gender_labels, *,
           classes=()) -> None:
    """The finished run's files. The best weights become model.safetensors; config.json comes last.
    With `classes` (a class run), the kept epoch's class predictions go to predictions_dev_categorical.csv."""
    from ser_cache.runs.record import write_run_files

    best = out / BEST.format(state.best["epoch"])
    if best.is_file():
        os.replace(best, out / layout.WEIGHTS)
    elif not (out / layout.WEIGHTS).is_file():  # a kill between the two renames leaves it moved already
        raise TrainError(f"{out}: the best epoch's weights ({best.name}) are missing; start again with --overwrite")
    write_run_files(out, config, metrics, state.history, dev_ids, state.best["pred"], state.best["probs"],
                    gender_labels, class_probs=state.best.get("class_probs"), classes=classes)
    (out / CHECKPOINT).unlink(missing_ok=True)
    (out / layout.IN_PROGRESS).unlink(missing_ok=True)
