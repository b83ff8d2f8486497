"""The one training loop of heads on cached features: `train-heads` is one job, a sweep K jobs at once.

A job is a run as train-heads defines it: its options, its rows (the corpus joined with its stores),
and what setup.set_up derived from its training rows (label range, classes, the seeded model).
`fit` trains K ≥ 1 jobs whose models have the same shapes together (stack.MemberStack: their
parameters stacked, their products batched; one job runs the module itself), then writes each as
an ordinary run directory. The loop, as the fine-tuning loop reads (finetune/loop.py): `start_loop`
builds what the epochs share (the stack, its optimizer, the samplers, the targets), then every epoch

1. `train_epoch`: each job draws its epoch (EpochSampler: its seed, its undersampling, its O/X rows)
   and cuts it into batches where train-heads always cut it (setup.batch_bounds);
2. `train_step`, step by step: every job that still has a batch takes one: the K batches go through
   the stack as one, each job's loss (paper Eq. 1, its own α and β) is computed on its own rows, and
   StackedAdamW steps exactly the jobs that had a batch (a job with fewer rows per epoch sits out
   the last steps, as if it trained alone);
3. `score_epoch`: every job is scored on its Development rows (forward passes on the device, one
   copy back), and keeps its best epoch (balanced or plain mean CCC; with a class head,
   scoring.selection_score: macro-F1, or its mean with the CCC under --task both).

One job whose frame stores do not fit the memory budget streams them: its epoch (and the scoring)
goes block by block, as rows.TrainingData.in_blocks hands the rows; several jobs need their inputs
held. Loss sums stay on the device and are read once per epoch; nothing in a step waits for a GPU.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ser_cache.infra.runtime import fused_adamw_ok, to_device
from ser_cache.runs import rundir, staging
from ser_cache.runs.record import run_config, write_run_files
from ser_cache.system.epoch_log import EpochProgress, TensorBoardLog, history_row, loss_keys
from ser_cache.system.inputs import index_tensor
from ser_cache.system.layer_choice import held_layers
from ser_cache.system.rows import TrainingData
from ser_cache.system.scoring import EVAL_BATCH, EVAL_FRAME_BATCH, score, selection_score
from ser_cache.system.setup import BLOCK_ORDER, RunSetup, batch_bounds, batch_loss
from ser_cache.train.options import TrainHeadsConfig

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One run to train: its options, its rows (with its inputs), its set-up, and how to write it."""

    cfg: TrainHeadsConfig  # as config.json records it
    data: TrainingData
    run: RunSetup
    title: str = ""  # of curves.png
    overwrite: bool = False  # replace a run already at cfg.out
    curves: bool = True  # draw curves.png into the run
    extra: dict = field(default_factory=dict)  # more config.json fields (a sweep member's "sweep")


@dataclass
class Fitted:
    job: Job
    best_epoch: int
    score: float
    metrics: dict
    history: list[dict]


@dataclass
class Diverged:
    """A job whose loss (or Development predictions) stopped being finite: it stopped training there
    and nothing of it was written (a run whose weights are NaN would predict NaN)."""

    job: Job
    epoch: int
    losses: dict  # the epoch's mean loss terms, as far as they were finite

    @property
    def what(self) -> str:
        total = self.losses.get("total", math.nan)
        if math.isfinite(total):
            return "its Development predictions were not finite"
        return f"the loss was {total}"

    def message(self) -> str:
        cfg = self.job.cfg
        return (f"training diverged: {self.what} in epoch {self.epoch} of {cfg.epochs} (--lr {cfg.lr:g}); "
                f"nothing written to {cfg.out}; train again with a lower --lr")


def fit(jobs: list[Job], device, *, progress: bool = True) -> list[Fitted | Diverged]:
    """Train `jobs` (models of the same shapes, the same epochs, rows from the same stores) together,
    write each one's run directory, and return what each kept.

    A job whose epoch loss or Development predictions are not finite has diverged: it trains no
    further (the others go on as if it were not there: each member's slices are its own) and comes
    back as a Diverged, with nothing written."""
    loop = start_loop(jobs, device)
    try:
        with EpochProgress(progress, loop.epochs) as bar:
            for epoch in range(1, loop.epochs + 1):
                t_epoch = time.perf_counter()
                losses = train_epoch(loop, epoch)
                t_eval = time.perf_counter()
                score_epoch(loop, epoch, losses, t_epoch, t_eval)
                if all(d is not None for d in loop.diverged):
                    break
                going = [h for h, d in zip(loop.histories, loop.diverged) if d is None]
                mean_row = {key: float(np.mean([h[-1][key] for h in going])) for key in going[0][-1]}
                bar.update(epoch, mean_row, max(b["epoch"] for b in loop.best))
    finally:
        for b in loop.boards:
            if b is not None:
                b.close()
    return [d if d is not None else write_job(j, b, h)
            for j, b, h, d in zip(jobs, loop.best, loop.histories, loop.diverged)]


@dataclass
class Loop:
    """What `fit`'s epochs share: the jobs, their stack, optimizer and samplers, the targets on the
    device, the Development rows every job is scored on, and what each job has kept so far."""

    jobs: list[Job]
    device: object
    stack: object  # stack.MemberStack (or the one job's model)
    optimizer: object
    samplers: list  # sampling.EpochSampler of every job
    avd: object  # every row's (3,) target on the device
    genders: list  # every job's gender class of every row, on the device
    speakers: list
    dev_rows: np.ndarray  # the union of the jobs' Development rows, sorted
    dev_pos: list[np.ndarray]  # where each job's Development rows are in dev_rows
    histories: list[list[dict]]
    best: list[dict]
    class_targets: list  # every job's class index of every row on the device (-1: none), or None
    class_weights: list  # every job's cross-entropy class weights on the device, or None
    diverged: list[Diverged | None]
    boards: list  # epoch_log.TensorBoardLog, or None, of every job

    @property
    def data(self) -> TrainingData:
        return self.jobs[0].data

    @property
    def epochs(self) -> int:
        return self.jobs[0].cfg.epochs

    @property
    def loss_keys(self) -> tuple[str, ...]:
        return loss_keys(self.jobs[0].cfg.task)


def start_loop(jobs: list[Job], device) -> Loop:
    """The stack of the jobs' models, its optimizer, every job's sampler and targets, and empty histories."""
    import torch

    from ser_cache.system.sampling import EpochSampler
    from ser_cache.train.stack import stack_of

    k_jobs = len(jobs)
    data = jobs[0].data
    if k_jobs > 1 and data.streamed:
        raise ValueError("several jobs train together only on inputs held in memory")
    if len({j.cfg.task for j in jobs}) > 1:
        raise ValueError("jobs that train together learn the same task")
    stack = stack_of([j.run.model for j in jobs], [j.run.aam for j in jobs])
    optimizer = stack.optimizer([j.cfg.lr for j in jobs], [j.cfg.weight_decay for j in jobs],
                                fused=fused_adamw_ok(device))
    samplers = [EpochSampler(data.emotions[j.run.train_idx], undersample=j.cfg.undersample, seed=j.cfg.seed)
                for j in jobs]
    avd = torch.from_numpy(data.avd).to(device)
    genders = [torch.from_numpy(j.run.genders).to(device) for j in jobs]
    speakers = [torch.from_numpy(j.run.speakers).to(device) for j in jobs]
    class_targets = [None if j.run.class_targets is None else torch.from_numpy(j.run.class_targets).to(device)
                     for j in jobs]
    class_weights = [None if j.run.class_weights is None
                     else torch.tensor(j.run.class_weights, dtype=torch.float32, device=device) for j in jobs]
    dev_rows = np.unique(np.concatenate([j.run.dev_idx for j in jobs]))
    dev_pos = [np.searchsorted(dev_rows, j.run.dev_idx) for j in jobs]
    for j, sampler in zip(jobs, samplers):
        j.data.counts.update(train_rows=int(j.run.train_idx.size), dev_rows=int(j.run.dev_idx.size),
                             rows_per_epoch=len(sampler))
    return Loop(jobs=jobs, device=device, stack=stack, optimizer=optimizer, samplers=samplers, avd=avd,
                genders=genders, speakers=speakers, dev_rows=dev_rows, dev_pos=dev_pos,
                histories=[[] for _ in jobs], best=[{"score": -math.inf, "epoch": 0} for _ in jobs],
                diverged=[None for _ in jobs], class_targets=class_targets, class_weights=class_weights,
                boards=[None if j.cfg.tensorboard is None else TensorBoardLog(j.cfg.tensorboard) for j in jobs])


def train_epoch(loop: Loop, epoch: int) -> list[list[float]]:
    """One epoch of every job that has not diverged: each draws its order and cuts it into batches,
    then step by step every job with a batch left takes one. Returns each job's loss terms
    (loop.loss_keys) averaged over its rows, read from the device once."""
    import torch

    jobs, k_jobs = loop.jobs, len(loop.jobs)
    loop.stack.train()
    orders = []
    for j, sampler in zip(jobs, loop.samplers):
        sampler.set_epoch(epoch)
        orders.append(j.run.train_idx[sampler.epoch_indices()])
    sums = torch.zeros(k_jobs, len(loop.loss_keys), dtype=torch.float64, device=loop.device)
    seen = np.zeros(k_jobs)
    live = [d is None for d in loop.diverged]
    for plan in epoch_blocks(jobs, loop.data, orders, epoch, loop.device):
        for step in range(max(len(cuts) for (_, cuts, _), on in zip(plan, live) if on)):
            active = [on and step < len(cuts) for (_, cuts, _), on in zip(plan, live)]
            train_step(loop, plan, step, active, sums, seen)
    return (sums.cpu().numpy() / np.maximum(seen, 1)[:, None]).tolist()


def train_step(loop: Loop, plan: list, step: int, active: list[bool], sums, seen: np.ndarray) -> None:
    """One optimizer step: the jobs' batches go through the stack as one, each `active` job's loss
    (paper Eq. 1, its own alpha and beta) on its own rows; StackedAdamW steps exactly those jobs.
    Adds each job's loss terms times its rows to `sums` (on the device) and its rows to `seen`."""
    import torch

    jobs, data, stack = loop.jobs, loop.data, loop.stack
    # A job whose batches are done repeats its first one, computed but not trained on.
    spans = [cuts[step] if a else cuts[0] if cuts else (0, order.size)
             for (order, cuts, _), a in zip(plan, active)]
    rows = [order[a:b] for (order, _, _), (a, b) in zip(plan, spans)]
    on_device = [d[a:b] for (_, _, d), (a, b) in zip(plan, spans)]
    out = stack.forward(stacked(_batch(data, rows, on_device, active), len(jobs), loop.device))
    total = 0
    for k, (j, r, n, a) in enumerate(zip(jobs, on_device, map(len, rows), active)):
        if not a:
            continue
        target = {"avd": loop.avd[r], "gender": loop.genders[k][r], "speaker": loop.speakers[k][r]}
        classes = {}
        if loop.class_targets[k] is not None:
            target["class"] = loop.class_targets[k][r]
            classes = {"class_weight": loop.class_weights[k], "class_loss_weight": j.cfg.class_loss_weight}
        loss, parts = batch_loss({key: v[k, :n] for key, v in out.items()}, target,
                                 (lambda e, lab, k=k: stack.speaker_loss(k, e, lab))
                                 if j.run.aam is not None else None,
                                 gender_weight=j.cfg.gender_weight,
                                 speaker_weight=j.cfg.speaker_weight, tensors=True, **classes)
        total = total + loss
        sums[k] += torch.stack([parts[key] for key in loop.loss_keys]).double() * n
        seen[k] += n
    loop.optimizer.zero_grad()
    total.backward()
    loop.optimizer.step(active)


def score_epoch(loop: Loop, epoch: int, losses: list[list[float]], t_epoch: float, t_eval: float) -> None:
    """Every job's Development predictions (one pass of the stack, one copy back) and scores: its
    history row, its TensorBoard scalars, its best epoch so far (balanced or plain mean CCC); a job
    whose loss or predictions are not finite is marked diverged."""
    data, stack = loop.data, loop.stack
    pred, probs, class_probs = infer_stack(stack, data, loop.dev_rows, loop.device, with_classes=True)
    now = time.perf_counter()
    keys = loop.loss_keys
    for k, j in enumerate(loop.jobs):
        pos = loop.dev_pos[k]
        if loop.diverged[k] is not None:
            continue
        p = None if pred is None else pred[k][pos]
        c = None if class_probs is None else class_probs[k][pos]
        if not (np.isfinite(losses[k]).all() and (p is None or np.isfinite(p).all())
                and (c is None or np.isfinite(c).all())):
            loop.diverged[k] = Diverged(j, epoch, dict(zip(keys, losses[k])))
            continue
        g = None if probs is None else probs[k][pos]
        dev_idx = j.run.dev_idx
        dev = score(p, data.avd[dev_idx], data.emotions[dev_idx],
                    gender_pred=None if g is None else g.argmax(1),
                    gender_true=None if g is None else j.run.genders[dev_idx],
                    balanced_trials=j.cfg.balanced_trials, balanced_per_class=j.cfg.balanced_per_class,
                    seed=j.cfg.seed,
                    **({} if c is None else {"class_pred": c.argmax(1), "class_true": j.run.class_targets[dev_idx],
                                             "classes": j.run.classes}))
        row = history_row(epoch, dict(zip(keys, losses[k])), dev, now - t_epoch, now - t_eval)
        loop.histories[k].append(row)
        if loop.boards[k] is not None:
            loop.boards[k].log(epoch, row)
        value = selection_score(j.cfg.task, j.cfg.select, dev)
        if value > loop.best[k]["score"]:
            # Copies (member_state clones): the next step would change the weights in place.
            loop.best[k] = {"score": value, "epoch": epoch, "dev": dev, "pred": p,
                            "probs": g, "class_probs": c, "state": stack.member_state(k)}


def epoch_blocks(jobs: list[Job], data: TrainingData, orders: list[np.ndarray], epoch: int, device):
    """Each job's (order, batch cuts, the order as one int64 tensor on the device) for the epoch: all
    at once, or (one job, streamed frames) block by block, the block's frames held while it trains.
    Batches are slices of the device tensor: one copy of the order per block, none per step."""
    if data.streamed:
        (job,), (order,) = jobs, orders
        rng = np.random.default_rng([job.cfg.seed, epoch, BLOCK_ORDER])
        for block in data.in_blocks(order, rng, min_rows=2):
            yield [_plan(order[block], job.cfg.batch_size, device)]
        return
    yield [_plan(order, j.cfg.batch_size, device) for j, order in zip(jobs, orders)]


def _plan(order: np.ndarray, batch_size: int, device) -> tuple[np.ndarray, list[tuple[int, int]], object]:
    bounds = batch_bounds(order.size, batch_size)
    cuts = [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b - a >= 2]
    return order, cuts, index_tensor(order, device)


def _batch(data: TrainingData, rows: list[np.ndarray], on_device: list, active: list[bool]) -> dict:
    """The inputs of every job's batch, job after job, each padded to the widest active batch."""
    if len(rows) == 1:  # one job: a slice of the epoch's index on the device (streamed frames: the host rows)
        return data.batch(rows[0]) if data.streamed else data.batch(on_device[0], rows[0])
    width = max(r.size for r, a in zip(rows, active) if a)
    # Padding by repeating a batch's rows: the padded rows are computed but left out of the loss.
    return data.batch(np.concatenate([np.resize(r, width) for r in rows]))


def stacked(batch: dict, k: int, device) -> dict:
    """One batch of K × width rows (job after job) → each input with a leading job axis."""
    def split(t):
        return t.reshape(k, -1, *t.shape[1:])

    batch = to_device(batch, device)
    return {name: tuple(split(t) for t in v) if isinstance(v, tuple) else split(v) for name, v in batch.items()}


def infer_stack(stack, data: TrainingData, rows: np.ndarray, device, *, with_classes: bool = False) -> tuple:
    """Every job's predictions on rows `rows` (the same rows for all): (K, n, 3), and (K, n, G) gender
    probabilities or None; `with_classes`: and (K, n, C) class probabilities or None (then the
    attribute predictions are None for heads without attribute heads). Frame inputs go in order of
    length (a batch padded to about its own rows); streamed frames block by block; one copy to the
    host per block (one per evaluation when held)."""
    import torch

    frames = bool(data.frame_inputs)
    size = EVAL_FRAME_BATCH if frames else EVAL_BATCH
    tables: dict[str, np.ndarray] = {}
    stack.eval()
    with torch.inference_mode():
        for pos in data.in_blocks(rows):
            if frames:
                pos = pos[np.argsort(data.frame_lengths(rows[pos]), kind="stable")]
            parts: dict[str, list] = {}
            for start in range(0, pos.size, size):
                out = stack.forward(to_device(data.batch(rows[pos[start:start + size]]), device), shared=True)
                if "avd" in out:
                    parts.setdefault("avd", []).append(out["avd"].double())
                for key, name in (("gender_logits", "gender"), ("class_logits", "class")):
                    if key in out:
                        parts.setdefault(name, []).append(torch.softmax(out[key].double(), dim=-1))
            for name, values in parts.items():
                v = torch.cat(values, dim=1).cpu().numpy()
                if name not in tables:
                    tables[name] = np.empty((v.shape[0], rows.size, v.shape[2]))
                tables[name][:, pos] = v
    stack.train()
    if with_classes:
        return tables.get("avd"), tables.get("gender"), tables.get("class")
    return tables.get("avd"), tables.get("gender")


def write_job(job: Job, best: dict, history: list[dict]) -> Fitted:
    """The job's run directory, staged beside cfg.out and renamed into place (config.json last)."""
    import torch

    from ser_cache.runs.plots import curves_after_training, layer_weights_plot
    from ser_cache.system.losses import AAMSoftmax
    from ser_cache.system.model import FeatureModel

    cfg, run, data = job.cfg, job.run, job.data
    model = FeatureModel.from_config(run.model.heads.config(), run.model.config())
    state, aam_state = best["state"]
    model.load_state_dict(state)
    aam = None
    if aam_state is not None:
        aam = AAMSoftmax(model.heads.speaker_embedding_dim, len(run.speaker_labels), margin=cfg.aam_margin,
                         scale=cfg.aam_scale)
        aam.load_state_dict(aam_state)
    dtype_name = str(run.model.compute_dtype or torch.float32).removeprefix("torch.")
    metrics = {"split": data.dev_split, "select": cfg.select, "best_epoch": best["epoch"], **best["dev"]}
    if weights := layer_weights_record(model, data):
        metrics["layer_weights"] = weights
    categorical = ({"categorical": {"task": cfg.task, "classes": run.classes, "class_weights": run.class_weights}}
                   if run.classes else {})
    config = run_config({**cfg.to_dict(), "compute_dtype": dtype_name}, data, run.lo, run.hi, run.gender_labels,
                        run.speaker_labels, model.heads.config(), best["epoch"], frame_inputs=model.config(),
                        **job.extra, **categorical,
                        **({"memory": data.memory} if data.memory else {}))
    with staging.staged_run_dir(cfg.out, job.overwrite) as tmp:
        rundir.save_weights(tmp, model, aam)
        write_run_files(tmp, config, metrics, history, data.ids[run.dev_idx].tolist(), best["pred"], best["probs"],
                        run.gender_labels, class_probs=best.get("class_probs"), classes=run.classes)
        if weights:  # a by-product, as curves.png: a figure that cannot be drawn costs a warning
            try:
                layer_weights_plot(tmp, weights, title=job.title or Path(cfg.out).name)
            except Exception as exc:
                log.warning("%s: layer weights not drawn (%s)", cfg.out, exc)
        if job.curves and cfg.task != "categorical":  # runs.plots draws CCC curves; a class run has none (yet)
            curves_after_training(tmp, title=job.title or Path(cfg.out).name)  # inside the run before it appears
    return Fitted(job, best["epoch"], best["score"], metrics, history)


def layer_weights_record(model, data: TrainingData) -> dict:
    """metrics.json's "layer_weights": for every input whose layers the model weights (LayerWeighting),
    the hidden states along its layer axis (transformers numbering) and the learned softmax weights."""
    inputs = {s.name: s for s in data.inputs}
    out = {}
    for name, weights in model.layer_weights().items():
        held = held_layers(inputs[name]) if name in inputs else None
        w = [float(x) for x in weights.float().cpu().tolist()]
        out[name] = {"layers": list(held) if held is not None and len(held) == len(w) else list(range(len(w))),
                     "weights": w}
    return out
