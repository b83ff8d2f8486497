"""`finetune wavlm`: train WavLM end to end with stage two's heads, losses, samplers and metrics.

The loop, in order:
1. read the corpus and any cached stores (`--text-features`, `--speaker-features`) once, with the
   very code of `train-heads` (rows.load_rows), read each audio file's header for its length,
   and pick the training and Development rows of the O/X variant;
2. build the model (system.finetuned.WavLMEmotionModel: WavLM, layer weighting, point-wise
   convolutions, masked mean pooling, MultitaskHeads) and, under torchrun, wrap it in DDP;
3. each epoch, `train_epoch`: draw the epoch's (undersampled) order with EpochSampler, cut it into
   global batches of about `--batch-seconds` of audio, give each rank every world-th clip of each
   batch, and compute the loss of Eq. 1 over the *global* batch (see `_gather`; with `--task
   categorical|both` the class cross-entropy of system/setup.batch_loss, as train-heads); then
   `score_epoch`: score Development and keep the best epoch (train/fit.py's loop reads the same);
4. after every epoch write checkpoint.safetensors atomically; at the end write the run directory's
   files, config.json last. The run stays locked (`<run>.lock`, locks.py) while it trains, so a
   second `--resume` or `--overwrite` of it is refused instead of writing into the same folder.

Why global batches: CCC is not a mean over rows, so the loss of a batch split over two ranks is
not the mean of the two halves' losses. Gathering the predictions (with autograd) and computing
the loss once over the whole batch makes a run on N ranks take the very steps of a run on one
(up to floating-point summation order), and every rank runs the same number of steps by
construction: the batch plan depends on the epoch's order and the clip lengths, not on the rank.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ser_cache.data import audio as audio_lib
from ser_cache.finetune.build import build_model, param_groups
from ser_cache.finetune.checkpoint import BEST, State, finish, resume, save_checkpoint
from ser_cache.finetune.options import FinetuneConfig
from ser_cache.infra import atomic, locks
from ser_cache.runs import layout, staging
from ser_cache.runs.checkpoint_file import refuse_legacy
from ser_cache.system.errors import TrainError
from ser_cache.train.options import TrainResult

log = logging.getLogger(__name__)

# Fault injection for the resume test: "EPOCH:STEP" makes the process stop (sleep) right after
# that optimizer step, mid-epoch, so the test can kill -9 it at a known point after a checkpoint.


# --------------------------------------------------------------------------- entry point


def finetune_wavlm(cfg: FinetuneConfig) -> TrainResult:
    """Fine-tune as configured (under torchrun: on every rank) and write the run directory."""
    from ser_cache.infra import distributed
    from ser_cache.infra.runtime import torch_threads

    cfg.verify()
    dist = distributed.init()
    lock = locks.FileLock(cfg.out)
    try:
        # Rank 0 alone locks and judges the target; the others learn the outcome (no rank may wait forever).
        problem = None
        if dist.is_main:
            try:
                _lock_run(lock, cfg.out)
                _check_target(cfg)
            except (layout.RunError, TrainError) as exc:
                problem = str(exc)
        problem = dist.broadcast(problem)
        if problem:
            raise TrainError(problem)
        with torch_threads(cfg.threads):
            return _finetune(cfg, dist)
    finally:
        lock.release()
        distributed.shutdown(dist)


def _lock_run(lock: locks.FileLock, out: Path) -> None:
    """Hold the run for the whole training: a second process would write into the same folder."""
    try:
        lock.acquire()
    except locks.Held as exc:
        raise TrainError(f"{out}: another process is training this run ({exc.holder}); wait for it to finish "
                         "or stop it, then run the command again") from None
    except OSError as exc:
        raise TrainError(f"{lock.path}: cannot lock the run ({exc.strerror or exc}); --out must be in a "
                         "folder you can write") from None


def _check_target(cfg: FinetuneConfig) -> None:
    out = Path(cfg.out)
    if cfg.resume and layout.is_run_dir(out):
        raise TrainError(f"--resume: the run at {out} is finished; choose another --out or pass --overwrite")
    if cfg.resume and layout.is_unfinished_run(out):
        refuse_legacy(out)  # now, not after minutes of loading
        return
    staging.check_run_target(out, cfg.overwrite, resumable=True)


# --------------------------------------------------------------------------- data


def _durations(paths: np.ndarray, max_seconds: float) -> tuple[np.ndarray, dict[int, str]]:
    """Header-only lengths in seconds (cropped to max_seconds), and {row: reason} for unusable files."""
    from concurrent.futures import ThreadPoolExecutor

    from ser_cache.system.finetuned import MIN_SECONDS

    def one(path):
        try:
            i = audio_lib.info(path)
        except audio_lib.AudioError as exc:
            return math.nan, exc.reason
        if i.seconds < MIN_SECONDS:
            return math.nan, f"too short ({i.seconds:.3f} s; at least {MIN_SECONDS} s needed)"
        return min(i.seconds, max_seconds), None

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(one, paths.tolist()))
    seconds = np.array([s for s, _ in results], dtype=np.float64)
    return seconds, {i: why for i, (_, why) in enumerate(results) if why is not None}


def _keep_rows(data, keep: np.ndarray):
    """The same TrainingData with only rows `keep` (a boolean mask)."""
    from dataclasses import replace

    k = np.flatnonzero(keep)
    for s in data.inputs:
        s.rows = s.rows[k]
    return replace(data, ids=data.ids[k], paths=data.paths[k], splits=data.splits[k], emotions=data.emotions[k],
                   avd=data.avd[k], genders=[data.genders[i] for i in k], speakers=[data.speakers[i] for i in k])


def _load_data(cfg: FinetuneConfig):
    from ser_cache.system.rows import load_rows

    data = load_rows(cfg.data, cfg.train_split, cfg.dev_split, cfg.stores, speaker_weight=cfg.speaker_weight,
                     require_inputs=False)
    seconds, bad = _durations(data.paths, cfg.max_seconds)
    data.counts["unreadable_audio"] = len(bad)
    if bad:
        shown = "; ".join(f"{data.paths[i]}: {why}" for i, why in list(bad.items())[:3])
        log.warning("%d utterance(s) left out because their audio cannot be used (%s)", len(bad), shown)
        keep = np.isfinite(seconds)
        data, seconds = _keep_rows(data, keep), seconds[keep]
    return data, seconds


# --------------------------------------------------------------------------- the loop


def _finetune(cfg: FinetuneConfig, dist) -> TrainResult:
    import torch

    from ser_cache.data.batching import audio_loader
    from ser_cache.encoders.base import RuntimeOptions
    from ser_cache.infra import runtime
    from ser_cache.runs import record
    from ser_cache.system import epoch_log, rows, scoring, setup
    from ser_cache.system.heads import MultitaskHeads
    from ser_cache.system.losses import AAMSoftmax
    from ser_cache.system.online import freeze_unused
    from ser_cache.system.online_kinds import KINDS
    from ser_cache.system.sampling import EpochSampler

    t0 = time.perf_counter()
    kind = KINDS[cfg.encoder]
    device = runtime.resolve_device(dist.device(cfg.device))
    amp_dtype = RuntimeOptions(device=str(device), precision=cfg.precision).autocast_dtype(device)
    data, seconds = _load_data(cfg)
    # The task's rows and class targets, as train-heads sets them up (system/setup.py).
    train_idx, dev_idx, classes, class_targets = setup.task_rows(cfg, data)

    # Everything the heads learn about labels comes from the training rows only (as in train-heads).
    lo, hi = scoring.label_range(data.avd[train_idx])
    gender_labels = scoring.head_classes("gender", cfg.gender_weight, [data.genders[i] for i in train_idx])
    speaker_labels = scoring.head_classes("speaker", cfg.speaker_weight, [data.speakers[i] for i in train_idx])
    targets = {"avd": torch.from_numpy(data.avd),
               "gender": torch.from_numpy(rows.label_index(data.genders, gender_labels)),
               "speaker": torch.from_numpy(rows.label_index(data.speakers, speaker_labels))}
    if classes:
        targets["class"] = torch.from_numpy(class_targets)  # -1: no class target (out of the loss)

    # All three generators: WavLM's spec-augment masking draws from numpy's global one.
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    def make_heads(audio_input: str):
        input_dims = {audio_input: (cfg.conv_dim,), **{s.name: s.shape for s in data.inputs}}
        if len(input_dims) != 1 + len(data.inputs):
            raise TrainError(f"a store is named '{audio_input}', the name of the fine-tuned audio input; "
                             "extract it again with another --name")
        return MultitaskHeads(input_dims, hidden=cfg.hidden, dropout=cfg.dropout, label_min=lo, label_max=hi,
                              n_genders=len(gender_labels), n_speakers=len(speaker_labels),
                              aam_margin=cfg.aam_margin, aam_scale=cfg.aam_scale, **setup.class_heads(cfg, classes))

    built = build_model(cfg, make_heads, device)
    model, heads, resolved, layerdrop = built.model, built.heads, built.resolved, built.layerdrop
    unused = freeze_unused(model)
    if unused and dist.is_main:
        log.info("frozen because they cannot reach the output: %s", ", ".join(unused))
    aam = (AAMSoftmax(heads.speaker_embedding_dim, len(speaker_labels), margin=cfg.aam_margin,
                      scale=cfg.aam_scale).to(device) if speaker_labels else None)
    optimizer = torch.optim.AdamW(param_groups(cfg, model, aam), weight_decay=cfg.weight_decay,
                                  **({"fused": True} if runtime.fused_adamw_ok(device) else {}))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    sampler = EpochSampler(data.emotions[train_idx], undersample=cfg.undersample, seed=cfg.seed)
    class_weights = setup.run_class_weights(cfg, data, class_targets, train_idx, classes) if dist.is_main else None
    class_weights = dist.broadcast(class_weights)

    state = State(history=[], best={"score": -math.inf, "epoch": 0}, epoch=0)
    out = Path(cfg.out)
    if cfg.resume:
        state = resume(out, cfg, dist, model, aam, optimizer, scaler, sampler) or state
    if dist.is_main and not (cfg.resume and layout.is_unfinished_run(out)):
        if out.exists() and cfg.overwrite:
            # A symlinked --out keeps its link: the folder it points to is the run replaced (as train-heads does).
            shutil.rmtree(out.resolve())
        out.resolve().mkdir(parents=True, exist_ok=True)
        atomic.write_json_atomic(out / layout.IN_PROGRESS, {"format": layout.RUN_FORMAT, "system": kind.system,
                                                       "train": cfg.to_dict()})
    dist.barrier()

    ddp = model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        # With LayerDrop a skipped layer's parameters get no gradient in that step (on every rank
        # alike: the ranks share the draws), which DDP accepts only when told to look for them; it
        # then leaves their gradients None, as one process does.
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=layerdrop > 0)
    from ser_cache.infra import distributed

    # Up to 4: WavLM Large trains on a few thousand audio-seconds per second, and a core decodes
    # about 10,000 of 16-kHz WAV. None on a CPU: they would take cores from the training.
    workers = (distributed.decoding_workers(device.type, gpu_cap=4, cpu_cap=0)
               if cfg.workers is None else cfg.workers)
    loader, plan = audio_loader(data.paths.tolist(), cfg.max_seconds, workers)
    data.counts.update(train_rows=int(train_idx.size), dev_rows=int(dev_idx.size), rows_per_epoch=len(sampler))
    if dist.is_main:
        log.info("fine-tuning %s on %d rows (%d per epoch%s, %.0f s of audio per batch, %d rank(s)), validating "
                 "on %d %s rows; cached inputs: %s", resolved.model_id, train_idx.size, len(sampler),
                 ", undersampled" if cfg.undersample else "", cfg.batch_seconds, dist.world, dev_idx.size,
                 data.dev_split, ", ".join(f"{s.name} {s.shape}" for s in data.inputs) or "none")

    run = _Run(cfg=cfg, dist=dist, device=device, amp_dtype=amp_dtype, data=data, seconds=seconds,
               targets=targets, model=model, ddp=ddp, aam=aam, optimizer=optimizer, scaler=scaler,
               loader=loader, plan=plan, sampler=sampler, train_idx=train_idx, dev_idx=dev_idx, classes=classes,
               class_targets=class_targets,
               class_weight=None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32,
                                                                             device=device),
               weights=built.weights)
    with epoch_log.EpochProgress(cfg.progress and dist.is_main, cfg.epochs,
                                tensorboard=cfg.tensorboard if dist.is_main else None) as progress:
        for epoch in range(state.epoch + 1, cfg.epochs + 1):
            t_epoch = time.perf_counter()
            losses, audio_seconds = train_epoch(run, epoch)
            t_eval = time.perf_counter()
            row = score_epoch(run, state, epoch, losses, audio_seconds, t_epoch, t_eval)
            state.epoch = epoch
            save_checkpoint(out, cfg, dist, state, model, aam, optimizer, scaler, sampler)
            progress.update(epoch, row, state.best["epoch"])

    best = state.best
    metrics = {"split": data.dev_split, "select": cfg.select, "best_epoch": best["epoch"], **best["dev"]}
    if dist.is_main:
        arch = built.architecture(cfg)
        # A class run records its classes as train-heads' do (what predict needs to name them).
        categorical = ({"categorical": {"task": cfg.task, "classes": classes, "class_weights": class_weights}}
                       if classes else {})
        config = record.run_config(cfg.to_dict(), data, lo, hi, gender_labels, speaker_labels, heads.config(),
                                     best["epoch"], system=kind.system, **{kind.name: arch}, **categorical)
        finish(out, config, metrics, state, data.ids[dev_idx].tolist(), gender_labels, classes=classes)
        if cfg.task != "categorical":  # runs.plots draws CCC curves; a class run has none (as in train-heads)
            from ser_cache.runs.plots import curves_after_training

            curves_after_training(out)
    dist.barrier()
    wall = time.perf_counter() - t0
    if dist.is_main and cfg.task == "attributes":
        log.info("kept epoch %d of %d (%s %s CCC %.4f) in %.1f s; run written to %s", best["epoch"], cfg.epochs,
                 data.dev_split, "balanced" if cfg.select == "balanced" else "mean", best["score"], wall, out)
    elif dist.is_main:
        log.info("kept epoch %d of %d (%s %s %.4f) in %.1f s; run written to %s", best["epoch"], cfg.epochs,
                 data.dev_split, scoring.selection_text(cfg.task, cfg.select), best["score"], wall, out)
    return TrainResult(run_dir=out, best_epoch=best["epoch"], metrics=metrics, wall_seconds=wall,
                       history=state.history)


@dataclass
class _Run:
    cfg: FinetuneConfig
    dist: object
    device: object
    amp_dtype: object
    data: object
    seconds: np.ndarray
    targets: dict
    model: object
    ddp: object
    aam: object
    optimizer: object
    scaler: object
    loader: object
    plan: object
    sampler: object  # sampling.EpochSampler of the training rows
    train_idx: np.ndarray
    dev_idx: np.ndarray
    # The categorical task (none for attributes): the class codes, every row's class index (-1: none),
    # the cross-entropy's class weights on the device.
    classes: list
    class_targets: np.ndarray | None
    class_weight: object
    weights: str = "run"  # what a run keeps of the encoder (system.online.run_state)


def train_epoch(run: _Run, epoch: int) -> tuple[dict[str, float], float]:
    """The epoch's (undersampled) order of the training rows, in global batches; returns the loss terms
    averaged over rows, and the audio seconds trained on."""
    import contextlib

    from ser_cache.data.batching import plan_batches, shard
    from ser_cache.infra.runtime import autocast
    from ser_cache.system.epoch_log import loss_keys
    from ser_cache.system.setup import batch_loss

    cfg, dist, dev = run.cfg, run.dist, run.device
    run.sampler.set_epoch(epoch)
    order = run.train_idx[run.sampler.epoch_indices()]
    rng = np.random.default_rng([cfg.seed, epoch, 1])
    batches = plan_batches(order, run.seconds, cfg.batch_seconds, rng)
    if batches and min(b.size for b in batches) < dist.world:
        raise TrainError(f"--batch-seconds {cfg.batch_seconds}: a batch holds fewer clips than there are ranks "
                         f"({dist.world}); raise it")
    run.plan.batches = [shard(b, run.seconds, dist.rank, dist.world).tolist() for b in batches]
    run.ddp.train()
    if run.aam is not None:
        run.aam.train()
    sums = dict.fromkeys(loss_keys(cfg.task), 0.0)
    classes = ({} if run.class_weight is None
               else {"class_weight": run.class_weight, "class_loss_weight": cfg.class_loss_weight})
    seen, audio_seconds = 0, 0.0
    run.optimizer.zero_grad(set_to_none=True)
    for i, (rows, audio, lengths) in enumerate(run.loader):
        group_start = i - i % cfg.grad_accum
        group_size = min(cfg.grad_accum, len(batches) - group_start)
        last_in_group = i == group_start + group_size - 1
        # Gradients are synchronised across ranks once per optimizer step, not per micro-batch.
        sync = contextlib.nullcontext() if last_in_group or not run.dist.enabled else run.ddp.no_sync()
        with sync:
            cached = {k: v.to(dev) for k, v in run.data.batch(rows).items()}
            with autocast(dev, run.amp_dtype):
                out = run.ddp(audio.to(dev, non_blocking=True), lengths.to(dev), cached)
            target = {k: v[_torch_rows(rows)].to(dev) for k, v in run.targets.items()}
            out, target = _gather(out, target, dist)
            loss, parts = batch_loss(out, target, run.aam, gender_weight=cfg.gender_weight,
                                     speaker_weight=cfg.speaker_weight, **classes)
            run.scaler.scale(loss / group_size).backward()
        if last_in_group:
            run.scaler.step(run.optimizer)
            run.scaler.update()
            run.optimizer.zero_grad(set_to_none=True)
        n = int(target["avd"].shape[0])
        for key in sums:
            sums[key] += parts[key] * n
        seen += n
        audio_seconds += float(run.seconds[batches[i]].sum())
    return {k: v / max(seen, 1) for k, v in sums.items()}, audio_seconds


def _torch_rows(rows: np.ndarray):
    import torch

    return torch.from_numpy(np.asarray(rows, dtype=np.int64))


def _gather(out: dict, target: dict, dist) -> tuple[dict, dict]:
    """Every rank's rows of the batch, in rank order, on every rank; gradients flow back to their owner.

    torch.distributed.nn.functional.all_gather sums the gradients of all ranks in its backward. Each
    rank computes the same global loss L, so a rank's outputs receive world · dL/d(outputs), and
    DDP's average over ranks turns that into exactly dL/d(parameters). Ranks may hold different
    numbers of rows, so tensors are padded to the largest share and the padding is cut off again.
    """
    if not dist.enabled:
        return out, target
    import warnings

    import torch
    import torch.distributed as td
    from torch.distributed.nn.functional import all_gather

    n = target["avd"].shape[0]
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(dist.world)]
    td.all_gather(sizes, torch.tensor([n], dtype=torch.long))
    sizes = [int(s) for s in sizes]
    longest = max(sizes)

    def gathered(x):
        pad = x.new_zeros((longest - n, *x.shape[1:]))
        with warnings.catch_warnings():
            # Deprecated in favour of a private API (_functional_collectives); still the public autograd gather.
            warnings.simplefilter("ignore", FutureWarning)
            parts = all_gather(torch.cat([x, pad]) if longest > n else x)
        return torch.cat([p[:k] for p, k in zip(parts, sizes)])

    return {k: gathered(v) for k, v in out.items()}, {k: gathered(v) for k, v in target.items()}


def score_epoch(run: _Run, state: State, epoch: int, losses: dict[str, float], audio_seconds: float,
                t_epoch: float, t_eval: float) -> dict:
    """The Development rows' predictions and scores: the epoch's history row (returned, and added to
    state.history), and the best epoch so far (balanced or plain mean CCC; with a class head,
    scoring.selection_score: macro-F1, or its mean with the CCC under --task both), its weights written."""
    from ser_cache.system import epoch_log, scoring

    cfg, data, dev_idx = run.cfg, run.data, run.dev_idx
    pred, probs, class_probs = _infer(run, dev_idx)
    dev = scoring.score(pred, data.avd[dev_idx], data.emotions[dev_idx],
                        gender_pred=None if probs is None else probs.argmax(1),
                        gender_true=None if probs is None else run.targets["gender"].numpy()[dev_idx],
                        balanced_trials=cfg.balanced_trials, balanced_per_class=cfg.balanced_per_class,
                        seed=cfg.seed,
                        **({} if not run.classes else {"class_pred": class_probs.argmax(1),
                                                       "class_true": run.class_targets[dev_idx],
                                                       "classes": run.classes}))
    now = time.perf_counter()
    row = epoch_log.history_row(epoch, losses, dev, now - t_epoch, now - t_eval)
    row["train_audio_seconds_per_second"] = round(audio_seconds / max(t_eval - t_epoch, 1e-9), 3)
    state.history.append(row)
    value = scoring.selection_score(cfg.task, cfg.select, dev)
    if value > state.best["score"]:
        state.best = {"score": value, "epoch": epoch, "dev": dev, "pred": pred, "probs": probs,
                      **({"class_probs": class_probs} if run.classes else {})}
        if run.dist.is_main:
            from ser_cache.runs.finetuned_run import save_weights

            save_weights(Path(cfg.out) / BEST.format(epoch), run.model, run.aam, weights=run.weights)
    return row


def _infer(run: _Run, idx: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """Predictions for rows `idx` (in that order): A/V/D (None without attribute heads), gender and class
    probabilities (None without their head); under torchrun the ranks share the batches."""
    import torch

    from ser_cache.data.batching import plan_batches
    from ser_cache.infra.runtime import autocast

    dist, dev, model = run.dist, run.device, run.model
    batches = plan_batches(idx, run.seconds, run.cfg.batch_seconds, None, min_rows=1)
    run.plan.batches = [b.tolist() for b in batches[dist.rank::dist.world]]
    model.eval()
    n_genders, n_classes, with_avd = model.heads.n_genders, model.heads.n_classes, model.heads.attributes
    rows_out, avd_out, probs_out, class_out = [], [], [], []
    with torch.inference_mode():
        for rows, audio, lengths in run.loader:
            cached = {k: v.to(dev) for k, v in run.data.batch(rows).items()}
            with autocast(dev, run.amp_dtype):
                out = model(audio.to(dev), lengths.to(dev), cached)
            rows_out.append(rows)
            if with_avd:
                avd_out.append(out["avd"].double().cpu().numpy())
            if n_genders:
                probs_out.append(torch.softmax(out["gender_logits"].double(), dim=-1).cpu().numpy())
            if n_classes:
                class_out.append(torch.softmax(out["class_logits"].double(), dim=-1).cpu().numpy())
    mine = (np.concatenate(rows_out) if rows_out else np.empty(0, np.int64),
            np.concatenate(avd_out) if avd_out else np.empty((0, 3)),
            np.concatenate(probs_out) if probs_out else np.empty((0, n_genders)),
            np.concatenate(class_out) if class_out else np.empty((0, n_classes)))
    position = {int(r): i for i, r in enumerate(idx)}
    avd = np.empty((idx.size, 3), dtype=np.float64) if with_avd else None
    probs = np.empty((idx.size, n_genders), dtype=np.float64) if n_genders else None
    classes = np.empty((idx.size, n_classes), dtype=np.float64) if n_classes else None
    for rows, a, p, c in dist.all_gather(mine):
        at = [position[int(r)] for r in rows]
        if avd is not None:
            avd[at] = a
        if probs is not None:
            probs[at] = p
        if classes is not None:
            classes[at] = c
    return avd, probs, classes
