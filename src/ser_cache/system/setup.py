"""What a training run derives from its rows before the loop: which rows train and score, the label
range, the classes, the seeded model; one batch's loss and cut. train-heads (train/), every sweep
member and finetune wavlm (finetune/) go through the same set-up, which reads only the options they
share (options.TrainingOptions)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ser_cache.infra.runtime import compute_dtype
from ser_cache.system.options import TrainingOptions
from ser_cache.system.rows import (
    TrainError,
    TrainingData,
    label_index,
)
from ser_cache.system.scoring import head_classes, label_range

log = logging.getLogger(__name__)


BLOCK_ORDER = 1  # third word of the seed of the order in which streamed blocks are visited


def batch_loss(out: dict, target: dict, aam, *, gender_weight: float, speaker_weight: float,
               tensors: bool = False):
    """Paper Eq. 1 on one batch of head outputs: (total loss, its unweighted parts).

    `target` holds "avd" (B, 3), "gender" (B,) and "speaker" (B,) on the outputs' device. The parts
    are floats, or with `tensors` detached scalar tensors on that device (no wait for a GPU).
    """
    from ser_cache.system.losses import multitask_loss, multitask_loss_terms

    speaker_loss = aam(out["speaker_embedding"], target["speaker"]) if aam is not None else None
    with_gender = "gender_logits" in out
    return (multitask_loss_terms if tensors else multitask_loss)(out["avd"], target["avd"],
                          gender_logits=out["gender_logits"] if with_gender else None,
                          gender_target=target["gender"] if with_gender else None,
                          gender_weight=gender_weight, speaker_loss=speaker_loss, speaker_weight=speaker_weight)


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


def set_up(cfg: TrainingOptions, data: TrainingData, device) -> RunSetup:
    """The O/X variant's rows, the label range and classes from its training rows, and the model seeded
    with cfg.seed: the same for `train-heads` and for every member of a sweep."""
    import torch

    from ser_cache.system.heads import MultitaskHeads
    from ser_cache.system.losses import AAMSoftmax
    from ser_cache.system.model import FeatureModel

    train_idx, dev_idx = select_rows(cfg, data)
    check_selectable(cfg, data, dev_idx)
    # Everything the heads learn about labels comes from the training rows only.
    lo, hi = label_range(data.avd[train_idx])
    gender_labels = head_classes("gender", cfg.gender_weight, [data.genders[i] for i in train_idx])
    speaker_labels = head_classes("speaker", cfg.speaker_weight, [data.speakers[i] for i in train_idx])
    # A frame store reaches the heads as its ConvPool's (conv_dim,) vector. The heads are built
    # first, so that with pooled stores only the seeded initialisation is what it always was.
    pools = {s.name: {"in_dim": s.dim, "dim": cfg.conv_dim, "dropout": cfg.conv_dropout} for s in data.frame_inputs}
    torch.manual_seed(cfg.seed)
    heads = MultitaskHeads({s.name: (cfg.conv_dim,) if s.name in pools else s.shape for s in data.inputs},
                           hidden=cfg.hidden, dropout=cfg.dropout, label_min=lo, label_max=hi,
                           n_genders=len(gender_labels), n_speakers=len(speaker_labels),
                           aam_margin=cfg.aam_margin, aam_scale=cfg.aam_scale)
    model = FeatureModel(heads, pools).to(device)
    model.compute_dtype = compute_dtype(cfg.precision, device)
    aam = (AAMSoftmax(heads.speaker_embedding_dim, len(speaker_labels), margin=cfg.aam_margin,
                      scale=cfg.aam_scale).to(device) if speaker_labels else None)
    return RunSetup(train_idx, dev_idx, lo, hi, gender_labels, speaker_labels, label_index(data.genders, gender_labels),
                    label_index(data.speakers, speaker_labels), model, aam)


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


def check_selectable(cfg: TrainingOptions, data: TrainingData, dev_idx: np.ndarray) -> None:
    from ser_cache.system.metrics import PRIMARY_EMOTIONS

    if cfg.select == "balanced" and not np.isin(data.emotions[dev_idx], PRIMARY_EMOTIONS).any():
        raise TrainError(f"--select balanced needs {cfg.dev_split} rows with a primary emotion "
                         f"({' '.join(PRIMARY_EMOTIONS)}); none has one. Use --select ccc")
