"""Which utterances a training epoch sees, and in what order.

The Task 2 winner balances MSP-Podcast's very skewed emotion distribution
(Neutral dwarfs Fear and Contempt) by *undersampling*: every epoch draws, from
each emotion class, as many utterances as the smallest class has, without
replacement.  A fresh draw per epoch means the large classes are still seen in
full over many epochs while each single epoch stays balanced.

"Other" (O) and "No agreement" (X) utterances carry attribute labels (arousal,
valence, dominance) even though they have no primary category, so the paper
keeps them in training as classes of their own and studies the variants of
its Table 5; :func:`select_training` expresses every row of that table.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch.utils.data

__all__ = [
    "OX_CODES",
    "OX_MODES",
    "EpochSampler",
    "is_ox",
    "select_training",
    "undersample",
]

OX_CODES: tuple[str, ...] = ("O", "X")
"""MSP-Podcast codes for "Other" and "No agreement" (no primary emotion)."""

OX_MODES: tuple[str, ...] = ("keep", "drop", "only", "train+dev", "train+dev-nonox")
"""Rows of the paper's Table 5, as accepted by :func:`select_training`.

- ``"keep"``: the training split as is, O/X rows included (the default).
- ``"drop"``: "− O/X (Train)", remove Train's O/X rows.
- ``"only"``: "− non-O/X (Train)", train only on Train's O/X rows.
- ``"train+dev"``: "+ O/X (Development)", Train as is plus Development's O/X rows.
- ``"train+dev-nonox"``: "+ O/X (Development) − non-O/X (Train)", Train's O/X
  rows plus Development's O/X rows.
"""


def _as_1d(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    return array


def undersample(classes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw an equal number of rows from every class present, in random order.

    The number per class is the size of the smallest class, so no row is
    repeated.  Classes are the distinct codes *in the array*: a class with no
    rows simply does not exist here and cannot drive the minimum to zero.

    Returns int64 indices into ``classes``; empty input gives an empty array.
    """
    classes = _as_1d(classes, "classes")
    if classes.size == 0:
        return np.empty(0, dtype=np.int64)
    _, inverse, counts = np.unique(classes, return_inverse=True, return_counts=True)
    per_class = int(counts.min())
    # Iterating codes in sorted order keeps the draw a pure function of the rng state.
    chosen = [
        rng.choice(np.flatnonzero(inverse == code), size=per_class, replace=False)
        for code in range(counts.size)
    ]
    return rng.permutation(np.concatenate(chosen)).astype(np.int64, copy=False)


def _epoch_size(classes: np.ndarray, undersampled: bool) -> int:
    """Number of rows one epoch draws, known without drawing."""
    if not undersampled or classes.size == 0:
        return int(classes.size)
    _, counts = np.unique(classes, return_counts=True)
    return int(counts.min()) * int(counts.size)


class EpochSampler(torch.utils.data.Sampler[int]):
    """Per-epoch (optionally undersampled) shuffle, sharded across ranks.

    Each epoch's draw comes from ``np.random.default_rng([seed, epoch])``, so it
    depends only on (seed, epoch): every rank computes the same global order
    without communicating, and a run resumed from :meth:`state_dict` draws what
    an uninterrupted run would have.  Rank ``r`` takes ``indices[r::world_size]``.
    Unless ``drop_last``, the global order is first padded by repeating it from
    the start so that every rank yields the same number of indices (DDP needs
    equal step counts); with ``drop_last`` it is truncated instead.

    As with ``DistributedSampler``, call :meth:`set_epoch` before each epoch;
    iterating does not advance the epoch by itself.
    """

    def __init__(
        self,
        classes: np.ndarray,
        *,
        undersample: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.classes = _as_1d(classes, "classes")
        self.undersample = undersample
        self.seed = int(seed)
        self.epoch = 0
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self._epoch_size = _epoch_size(self.classes, undersample)

    def set_epoch(self, epoch: int) -> None:
        """Select which epoch's draw the next iteration yields."""
        self.epoch = int(epoch)

    def epoch_indices(self) -> np.ndarray:
        """The whole current epoch's indices, before sharding and padding."""
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.undersample:
            return undersample(self.classes, rng)
        return rng.permutation(self.classes.size).astype(np.int64, copy=False)

    def _total_size(self) -> int:
        if self.drop_last:
            return (self._epoch_size // self.world_size) * self.world_size
        return -(-self._epoch_size // self.world_size) * self.world_size

    def __iter__(self) -> Iterator[int]:
        indices = self.epoch_indices()
        total = self._total_size()
        if indices.size:
            # np.resize repeats from the start, also when padding exceeds one pass.
            indices = np.resize(indices, total)
        return iter(indices[self.rank :: self.world_size].tolist())

    def __len__(self) -> int:
        return self._total_size() // self.world_size

    def state_dict(self) -> dict[str, int]:
        """What decides the draw: restoring it reproduces the same epochs."""
        return {"seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])


def is_ox(emotions: np.ndarray) -> np.ndarray:
    """Boolean mask of "Other" / "No agreement" rows."""
    return np.isin(_as_1d(emotions, "emotions"), OX_CODES)


def select_training(
    splits: np.ndarray,
    emotions: np.ndarray,
    mode: str,
    *,
    train_split: str = "Train",
    dev_split: str = "Development",
) -> tuple[np.ndarray, np.ndarray]:
    """Pick training rows and Development evaluation rows for one Table 5 variant.

    Returns ``(train_indices, dev_eval_indices)``, sorted int64 row indices.
    Development O/X rows that a mode moves into training leave the Development
    evaluation set, so no utterance is both trained and evaluated on.  See
    :data:`OX_MODES` for the meaning of each mode.
    """
    if mode not in OX_MODES:
        raise ValueError(f"unknown O/X mode {mode!r}; valid modes: {', '.join(OX_MODES)}")
    splits = _as_1d(splits, "splits")
    emotions = _as_1d(emotions, "emotions")
    if splits.shape != emotions.shape:
        raise ValueError(
            f"splits and emotions must have the same length, got {splits.size} and {emotions.size}"
        )
    ox = is_ox(emotions)
    train = splits == train_split
    dev = splits == dev_split
    moved = dev & ox if mode in ("train+dev", "train+dev-nonox") else np.zeros_like(dev)
    selected = {
        "keep": train,
        "drop": train & ~ox,
        "only": train & ox,
        "train+dev": train | moved,
        "train+dev-nonox": (train & ox) | moved,
    }[mode]
    return (
        np.flatnonzero(selected).astype(np.int64, copy=False),
        np.flatnonzero(dev & ~moved).astype(np.int64, copy=False),
    )
