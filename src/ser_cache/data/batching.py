"""Audio batches for fine-tuning: files decoded in worker processes, batches planned by length within a budget of
seconds, and each rank's share."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ser_cache.data import audio as audio_lib

# Utterances sorted by length together when batches are formed: large enough that a batch holds
# clips of similar length (little padding), small enough that batches still mix the epoch's draw.
BUCKET_BATCHES = 50


class AudioRows:
    """Decodes row i's file (in a DataLoader worker when there are any): (i, float32 waveform)."""

    def __init__(self, paths: Sequence[str], max_seconds: float):
        self.paths = list(paths)
        self.max_seconds = max_seconds

    def __getitem__(self, i: int):
        return i, audio_lib.load(self.paths[i], max_seconds=self.max_seconds)

    def __len__(self) -> int:
        return len(self.paths)


class PlannedBatches:
    """A batch sampler whose batches are set before each pass: one DataLoader (and its workers) serves
    every epoch's training plan and the evaluation plan."""

    def __init__(self):
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _collate(items):
    rows, waves = zip(*items)
    lengths = torch.tensor([len(w) for w in waves], dtype=torch.long)
    audio = torch.zeros(len(waves), int(lengths.max()), dtype=torch.float32)
    for i, w in enumerate(waves):
        audio[i, : len(w)] = torch.from_numpy(w)
    return np.asarray(rows, dtype=np.int64), audio, lengths


def audio_loader(paths: Sequence[str], max_seconds: float, workers: int):
    """(DataLoader, PlannedBatches): decoding in `workers` spawned processes (0: in this process)."""
    import functools
    import os

    from torch.utils.data import DataLoader

    from ser_cache.infra.workers import init_loader_worker

    plan = PlannedBatches()
    # Spawned, not forked (as in extract): a forked child of a process with threads running
    # (Zarr's I/O, torch's pools) can deadlock. Persistent, so they are spawned once per run.
    # init_loader_worker: a worker dies with this process, even one killed with SIGKILL (torch's
    # own check only runs between batches), and leaves Ctrl-C to it.
    loader = DataLoader(AudioRows(paths, max_seconds), batch_sampler=plan, collate_fn=_collate,
                        num_workers=workers, multiprocessing_context="spawn" if workers > 0 else None,
                        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
                        worker_init_fn=(functools.partial(init_loader_worker, parent_pid=os.getpid())
                                        if workers > 0 else None),
                        generator=torch.Generator())  # its own seed draws: dropout's stream stays untouched
    return loader, plan


def plan_batches(order: np.ndarray, seconds: np.ndarray, batch_seconds: float, rng: np.random.Generator | None,
                 min_rows: int = 2) -> list[np.ndarray]:
    """Split `order` into batches of about `batch_seconds` of audio (clips cropped to their length in `seconds`).

    Windows of the order (BUCKET_BATCHES batches' worth) are sorted by length before cutting, so a
    batch holds clips of similar length and pads little; `rng` then shuffles the batches (None keeps
    them in length order, for evaluation). A batch of fewer than `min_rows` rows, or a tail of less
    than half a batch, joins its neighbour: CCC needs at least two rows, and a short tail is noise.
    The plan depends on the order and the lengths only, never on the number of ranks.
    """
    order = np.asarray(order, dtype=np.int64)
    if order.size == 0:
        return []
    mean = float(np.mean(seconds[order]))
    window = max(1, int(BUCKET_BATCHES * batch_seconds / max(mean, 1e-3)))
    batches: list[list[int]] = []
    for start in range(0, order.size, window):
        part = order[start:start + window]
        part = part[np.argsort(seconds[part], kind="stable")]
        cur: list[int] = []
        total = 0.0
        for row in part.tolist():
            if cur and total + seconds[row] > batch_seconds:
                batches.append(cur)
                cur, total = [], 0.0
            cur.append(row)
            total += float(seconds[row])
        if cur:
            if batches and (len(cur) < min_rows or total < batch_seconds / 2):
                batches[-1].extend(cur)
            else:
                batches.append(cur)
    merged: list[list[int]] = []
    for b in batches:
        if merged and len(b) < min_rows:
            merged[-1].extend(b)
        else:
            merged.append(b)
    out = [np.asarray(b, dtype=np.int64) for b in merged]
    if rng is not None:
        out = [out[i] for i in rng.permutation(len(out))]
    return out


def shard(batch: np.ndarray, seconds: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's part of a global batch: every world-th clip by length, so the ranks' loads match."""
    by_length = batch[np.argsort(seconds[batch], kind="stable")]
    return by_length[rank::world]
