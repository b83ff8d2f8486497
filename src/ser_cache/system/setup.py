"""What a training run derives from its rows before the loop: which rows train and score, the label
range, the classes, the seeded model; one batch's loss and cut. train-heads (train/), every sweep
member and finetune wavlm (finetune/) go through the same set-up, which reads only the options they
share (options.TrainingOptions)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from ser_cache.infra.runtime import compute_dtype
from ser_cache.system.errors import TrainError
from ser_cache.system.options import TrainingOptions
from ser_cache.system.rows import TrainingData, label_index, layer_picks
from ser_cache.system.scoring import head_classes, label_range

log = logging.getLogger(__name__)


BLOCK_ORDER = 1  # third word of the seed of the order in which streamed blocks are visited


def batch_loss(out: dict, target: dict, aam, *, gender_weight: float, speaker_weight: float,
               tensors: bool = False, class_weight=None, class_loss_weight: float = 1.0):
    """Paper Eq. 1 on one batch of head outputs: (total loss, its unweighted parts).

    `target` holds "avd" (B, 3), "gender" (B,) and "speaker" (B,) on the outputs' device, and
    "class" (B,) (-1: no class target) when the heads have a class head (`class_weight`: its
    per-class weights, a tensor, or None). The parts are floats, or with `tensors` detached scalar
    tensors on that device (no wait for a GPU).
    """
    from ser_cache.system.losses import multitask_loss, multitask_loss_terms

    speaker_loss = aam(out["speaker_embedding"], target["speaker"]) if aam is not None else None
    with_gender = "gender_logits" in out
    common = {"gender_logits": out["gender_logits"] if with_gender else None,
              "gender_target": target["gender"] if with_gender else None,
              "gender_weight": gender_weight, "speaker_loss": speaker_loss, "speaker_weight": speaker_weight}
    if "class_logits" not in out:  # the attribute task, as it always was
        return (multitask_loss_terms if tensors else multitask_loss)(out["avd"], target["avd"], **common)
    total, parts = multitask_loss_terms(out.get("avd"), target["avd"] if "avd" in out else None, **common,
                                        class_logits=out["class_logits"], class_target=target["class"],
                                        class_weight=class_weight, class_loss_weight=class_loss_weight)
    return total, (parts if tensors else {key: float(value) for key, value in parts.items()})


def batch_bounds(n: int, batch_size: int) -> list[int]:
    """Where an epoch's (or a streamed block's) n rows are cut into batches: about `batch_size` rows
    each and equal-sized (np.array_split's cuts), never fewer than two rows a batch where n allows."""
    n_batches = max(1, min(-(-n // batch_size), n // 2))
    q, r = divmod(n, n_batches)
    return np.cumsum([0] + [q + 1] * r + [q] * (n_batches - r)).tolist()


@dataclass
class RunSetup:
    """What a heads run derives before its first step: its rows, what the heads learn from the training
    rows only (label range, gender and speaker classes), and the seeded model and AAM-softmax."""

    train_idx: np.ndarray
    dev_idx: np.ndarray
    lo: list[float]
    hi: list[float]
    gender_labels: list[str]
    speaker_labels: list[str]
    genders: np.ndarray  # class index of every row's gender (-1: unknown or not a training class)
    speakers: np.ndarray
    model: object  # model.FeatureModel on the device, its compute dtype set
    aam: object  # losses.AAMSoftmax, or None without a speaker head
    # The categorical task (none for attributes): the class codes in the heads' order, every row's
    # class index (-1: no class target, e.g. O/X under 8 classes), the cross-entropy's class weights.
    classes: list[str] = field(default_factory=list)
    class_targets: np.ndarray | None = None
    class_weights: list[float] | None = None


def set_up(cfg: TrainingOptions, data: TrainingData, device) -> RunSetup:
    """The O/X variant's rows, the label range and classes from its training rows, and the model seeded
    with cfg.seed: the same for `train-heads` and for every member of a sweep."""
    import torch

    from ser_cache.system.heads import MultitaskHeads
    from ser_cache.system.losses import AAMSoftmax
    from ser_cache.system.model import WEIGHTED_LAYERS, FeatureModel

    train_idx, dev_idx, classes, class_targets = task_rows(cfg, data)
    # Everything the heads learn about labels comes from the training rows only.
    lo, hi = label_range(data.avd[train_idx])
    gender_labels = head_classes("gender", cfg.gender_weight, [data.genders[i] for i in train_idx])
    speaker_labels = head_classes("speaker", cfg.speaker_weight, [data.speakers[i] for i in train_idx])
    # A frame store reaches the heads as its ConvPool's (conv_dim,) vector. The heads are built
    # first, so that with pooled stores only the seeded initialisation is what it always was.
    # A frame input that keeps its layer axis (FrameInput.layers) adds its LayerWeighting's size.
    pools = {s.name: {"in_dim": s.dim, "dim": cfg.conv_dim, "dropout": cfg.conv_dropout,
                      **({WEIGHTED_LAYERS: s.layers} if s.layers is not None else {})} for s in data.frame_inputs}
    picks = layer_picks(getattr(cfg, "layer", ()), data)
    torch.manual_seed(cfg.seed)
    heads = MultitaskHeads({s.name: (cfg.conv_dim,) if s.name in pools else s.shape for s in data.inputs},
                           hidden=cfg.hidden, dropout=cfg.dropout, label_min=lo, label_max=hi,
                           n_genders=len(gender_labels), n_speakers=len(speaker_labels),
                           aam_margin=cfg.aam_margin, aam_scale=cfg.aam_scale, **class_heads(cfg, classes),
                           **({"layer_picks": picks} if picks else {}))
    model = FeatureModel(heads, pools).to(device)
    model.compute_dtype = compute_dtype(cfg.precision, device)
    aam = (AAMSoftmax(heads.speaker_embedding_dim, len(speaker_labels), margin=cfg.aam_margin,
                      scale=cfg.aam_scale).to(device) if speaker_labels else None)
    weights = run_class_weights(cfg, data, class_targets, train_idx, classes)
    return RunSetup(train_idx, dev_idx, lo, hi, gender_labels, speaker_labels, label_index(data.genders, gender_labels),
                    label_index(data.speakers, speaker_labels), model, aam, classes, class_targets, weights)


def task_rows(cfg: TrainingOptions, data: TrainingData) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray | None]:
    """The rows a run of cfg.task trains and scores (the O/X variant's; under categorical only those with a
    class target), its class codes and every row's class index (none for attributes), checked that an
    epoch can be kept by them: what train-heads, a sweep member and finetune wavlm all start from."""
    train_idx, dev_idx = select_rows(cfg, data)
    classes, class_targets = class_task(cfg, data)
    if cfg.task == "categorical":
        train_idx, dev_idx = rows_with_class(cfg, data, class_targets, train_idx, dev_idx)
    check_selectable(cfg, data, dev_idx, class_targets)
    return train_idx, dev_idx, classes, class_targets


def class_heads(cfg: TrainingOptions, classes: list[str]) -> dict:
    """heads.MultitaskHeads' arguments of the task: none for attributes (its heads as they always were),
    a class head of len(classes) outputs, and no attribute heads under categorical."""
    return {**({"n_classes": len(classes)} if classes else {}),
            **({"attributes": False} if cfg.task == "categorical" else {})}


def run_class_weights(cfg: TrainingOptions, data: TrainingData, targets: np.ndarray | None, train_idx: np.ndarray,
                      classes: list[str]) -> list[float] | None:
    """The cross-entropy's class weights of a class task (epoch_class_weights), logged; None for attributes."""
    if not classes:
        return None
    weights = epoch_class_weights(cfg, data, targets, train_idx, len(classes))
    log.info("%s task: %d classes (%s), class weights %s", cfg.task, len(classes), " ".join(classes),
             " ".join(f"{c}={w:.3g}" for c, w in zip(classes, weights)))
    return weights


def class_task(cfg: TrainingOptions, data: TrainingData) -> tuple[list[str], np.ndarray | None]:
    """The class codes of the run and every row's class index (-1: no class target); none for attributes.

    O is a class under 9 classes only; X (no agreement) and rows without a code never have a target."""
    from ser_cache.system.tasks import class_codes

    if cfg.task == "attributes":
        return [], None
    classes = list(class_codes(cfg.classes))
    return classes, label_index([str(e) for e in data.emotions], classes)


def rows_with_class(cfg: TrainingOptions, data: TrainingData, targets: np.ndarray, train_idx: np.ndarray,
                    dev_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The categorical task trains and scores only rows with a class target; says how many it left out."""
    kept = [idx[targets[idx] >= 0] for idx in (train_idx, dev_idx)]
    for name, idx, k in (("training", train_idx, kept[0]), (cfg.dev_split, dev_idx, kept[1])):
        dropped = int(idx.size - k.size)
        data.counts[f"no_class_target[{'train' if name == 'training' else 'dev'}]"] = dropped
        if dropped:
            log.info("--task categorical: %d %s row(s) without one of the %d classes (O/X or no code) left out",
                     dropped, name, cfg.classes)
        if k.size < 2:
            raise TrainError(f"--task categorical: {k.size} {name} row(s) with one of the classes "
                             f"{' '.join(map(str, _codes(cfg)))}; at least 2 are needed")
    return kept[0], kept[1]


def _codes(cfg: TrainingOptions) -> tuple[str, ...]:
    from ser_cache.system.tasks import class_codes

    return class_codes(cfg.classes)


def epoch_class_weights(cfg: TrainingOptions, data: TrainingData, targets: np.ndarray, train_idx: np.ndarray,
                        n_classes: int) -> list[float]:
    """The cross-entropy's class weights: the baseline's N / (n_classes * n_c) over the class counts of
    the rows one epoch draws ("balanced"), or all 1 ("none").

    Without undersampling an epoch draws every training row, so the counts are the training rows'
    (the baseline's weights). Undersampled, it draws m rows of every emotion code of the training
    rows (m the smallest code's count), so each class present counts m: the weights are then equal
    (1 when every class is present), and the rare classes are not favoured twice."""
    from ser_cache.system.losses import class_weights

    if cfg.class_weights == "none":
        return [1.0] * n_classes
    t = targets[train_idx]
    counts = np.bincount(t[t >= 0], minlength=n_classes)
    if cfg.undersample:
        _, per_code = np.unique(data.emotions[train_idx], return_counts=True)
        counts = np.where(counts > 0, int(per_code.min()), 0)
    return class_weights(counts.tolist())


def select_rows(cfg: TrainingOptions, data: TrainingData) -> tuple[np.ndarray, np.ndarray]:
    """Training and Development-evaluation rows of the O/X variant; an empty side is an error."""
    from ser_cache.system.sampling import select_training

    train_idx, dev_idx = select_training(data.splits, data.emotions, cfg.ox, train_split=data.train_split,
                                         dev_split=data.dev_split)
    moved = int((data.splits[train_idx] != data.train_split).sum())
    if moved:
        log.info("--ox %s: %d O/X %s row(s) moved into training and out of the evaluation", cfg.ox, moved,
                 cfg.dev_split)
    data.counts["dev_rows_moved_to_train"] = moved
    if train_idx.size < 2:
        raise TrainError(f"--ox {cfg.ox}: {train_idx.size} training row(s) left; at least 2 are needed")
    if dev_idx.size < 2:
        raise TrainError(f"--ox {cfg.ox}: {dev_idx.size} {cfg.dev_split} row(s) left to evaluate; at least 2 are "
                         "needed")
    return train_idx, dev_idx


def check_selectable(cfg: TrainingOptions, data: TrainingData, dev_idx: np.ndarray,
                     class_targets: np.ndarray | None = None) -> None:
    from ser_cache.system.metrics import PRIMARY_EMOTIONS

    if cfg.task == "categorical":
        if cfg.select != "balanced":
            raise TrainError(f"--select {cfg.select}: --task categorical has no CCC; its epoch is kept by "
                             f"{cfg.dev_split} macro-F1 (--select balanced, the default)")
        return
    if class_targets is not None and not (class_targets[dev_idx] >= 0).any():
        raise TrainError(f"--task {cfg.task}: no {cfg.dev_split} row has one of the classes "
                         f"{' '.join(_codes(cfg))}; the epoch cannot be kept by macro-F1")
    if cfg.select == "balanced" and not np.isin(data.emotions[dev_idx], PRIMARY_EMOTIONS).any():
        raise TrainError(f"--select balanced needs {cfg.dev_split} rows with a primary emotion "
                         f"({' '.join(PRIMARY_EMOTIONS)}); none has one. Use --select ccc")
