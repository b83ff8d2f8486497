"""The rows stage two trains on: the corpus joined with its feature stores, and each batch's inputs.

`load_rows` reads the corpus and every store, joins them by utterance id and drops the rows that
cannot be used (no labels, features not written), counting each reason. What it returns,
`TrainingData`, gives a batch's inputs by row index (`batch`): a float16 tensor per pooled
store, and for a frame store ((T_i, D) frames per row, `extract --pooling frames`) the batch's
frames zero-padded to its longest row with their counts, `(x, lengths)`.

Pooled stores are small (116k × 1280 float16 is 300 MB) and are read whole. Frame stores are two
orders larger (MSP-Podcast's 116k clips × ~275 Whisper frames × 1280 is 82 GB), so they are read
only for the kept rows, packed end to end (as frames.Frames holds them), and only when they fit
the memory budget. When they do not, they are streamed: `in_blocks` visits the store's chunks in
blocks that fit, holding one block at a time (docs/training.md, "Frame inputs").
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

NO_EMOTION_CLASS = "?"  # undersampling class of training rows that have no emotion code
SPEAKER_EMBEDDING_KIND = "xvector"  # stores of this kind are speaker embeddings (the "+ S Emb" input)
FRAME_BYTES = 2  # float16, as stores hold them


class TrainError(Exception):
    """Training cannot start or go on as asked; the message names the option, store or utterance."""


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_memory_budget_gb() -> float:
    """Half of the machine's physical memory: the rest is for torch, the batches and everyone else."""
    return physical_memory_bytes() / 2 / 1e9


def store_record(name: str, path: Path, attrs: dict, shape: Sequence[int]) -> dict:
    """What config.json keeps of a store: enough to find it again, check it, or rebuild its encoder."""
    return {
        "name": name,
        "path": str(Path(path).resolve()),
        "fingerprint": attrs.get("fingerprint"),
        "model_id": attrs.get("model_id"),
        "revision": attrs.get("revision"),
        "kind": attrs.get("kind"),
        "modality": attrs.get("modality"),
        "feature_shape": list(shape),
        "settings": attrs.get("settings", {}),
    }


# --------------------------------------------------------------------------- the two input kinds


@dataclass
class InputStore:
    """A pooled store held whole in memory, and for each kept utterance the store row it lives in."""

    name: str
    path: Path
    attrs: dict
    features: np.ndarray  # (N_store, *shape) float16, as read, in store order
    rows: np.ndarray  # (n,) int64, store row of each kept utterance

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.features.shape[1:])

    def record(self) -> dict:
        return store_record(self.name, self.path, self.attrs, self.shape)

    def batch(self, idx: np.ndarray):
        import torch

        return torch.from_numpy(self.features[self.rows[idx]])


@dataclass
class FrameInput:
    """A frame store: for each kept utterance its store row, and the frames of the rows held now.

    `rows` means what it means for InputStore (store row of each kept utterance), so code that
    subsets the kept rows treats both alike. The frames of the store rows held (all kept rows, or
    one streamed block) sit packed in `data` (a tensor, on the CPU or the training GPU) with
    `offsets`; `slot` maps a store row to its position there.
    """

    name: str
    path: Path
    attrs: dict
    shape: tuple[int, int]  # (T, D): the store's most frames per row, the frame dimension
    chunk_rows: int
    counts: np.ndarray  # (N_store,) int64, valid frames of each store row (0 where not written)
    rows: np.ndarray  # (n,) int64, store row of each kept utterance
    data: object = None  # torch.Tensor (held frames, D) float16, or None while nothing is held
    offsets: np.ndarray | None = None  # (held + 1,) int64
    slot: np.ndarray | None = None  # (N_store,) int64, position of each held store row in `offsets`; -1: not held

    @property
    def dim(self) -> int:
        return int(self.shape[1])

    def record(self) -> dict:
        return store_record(self.name, self.path, self.attrs, self.shape)

    def frame_bytes(self, store_rows: np.ndarray) -> np.ndarray:
        """Bytes each of `store_rows` takes packed in memory."""
        return self.counts[store_rows] * (self.dim * FRAME_BYTES) + 8

    @property
    def held_bytes(self) -> int:
        return 0 if self.data is None else int(self.data.nelement() * self.data.element_size())

    def hold(self, store_rows: np.ndarray) -> None:
        """Read the frames of `store_rows` (whole chunks, `read_frames`) and hold them, packed, on the CPU."""
        import torch

        from ser_cache.store import FeatureStore

        self.release()
        store_rows = np.unique(np.asarray(store_rows, dtype=np.int64))
        _, frames, _ = FeatureStore.open(self.path).read_frames(store_rows)
        self.data, self.offsets = torch.from_numpy(frames.data), frames.offsets
        self.slot = np.full(self.counts.size, -1, dtype=np.int64)
        self.slot[store_rows] = np.arange(store_rows.size)

    def release(self) -> None:
        self.data = self.offsets = self.slot = None

    def batch(self, idx: np.ndarray):
        """Kept rows `idx`: ((B, T_max, D) float16 frames zero-padded to the longest, on the device
        they are held on; (B,) int64 lengths)."""
        if self.slot is None:
            raise RuntimeError(f"frame input '{self.name}': no frames held")
        where = self.slot[self.rows[idx]]
        if (where < 0).any():
            raise RuntimeError(f"frame input '{self.name}': rows asked for that are not held")
        return take_packed(self.data, self.offsets, where)


def take_packed(data, offsets: np.ndarray, where: np.ndarray):
    """Rows `where` of packed frames (`data` a (total, D) tensor, row i = data[offsets[i]:offsets[i+1]])
    zero-padded to the longest of them, as Frames.take does, but gathered on `data`'s device."""
    import torch

    starts, lengths = offsets[where], offsets[where + 1] - offsets[where]
    longest = max(int(lengths.max(initial=0)), 1)
    step = np.arange(longest)
    valid = step[None, :] < lengths[:, None]
    # Padding positions point at the row's first frame (or frame 0) and are zeroed after the gather.
    pos = starts[:, None] + np.where(valid, step[None, :], 0)
    if data.shape[0] == 0:
        return data.new_zeros((where.size, longest, data.shape[1])), torch.from_numpy(lengths)
    x = data[torch.from_numpy(pos).to(data.device)]
    x.masked_fill_(~torch.from_numpy(valid).to(data.device)[..., None], 0)
    return x, torch.from_numpy(lengths)


# --------------------------------------------------------------------------- the rows


@dataclass
class TrainingData:
    """The kept rows (labelled, features written) of the train and dev splits, and their inputs."""

    ids: np.ndarray  # (n,) str
    paths: np.ndarray  # (n,) str, the audio file of each row (for training on audio)
    splits: np.ndarray  # (n,) str
    emotions: np.ndarray  # (n,) str, NO_EMOTION_CLASS where the corpus has none
    avd: np.ndarray  # (n, 3) float32
    genders: list[str | None]
    speakers: list[str | None]
    inputs: list[InputStore | FrameInput]
    excluded_stores: list[dict]
    counts: dict
    train_split: str  # the corpus's spelling of the split names
    dev_split: str
    block_bytes: int | None = None  # frames streamed in blocks of about this size; None: all held
    memory: dict = field(default_factory=dict)  # what was held where, for config.json

    @property
    def frame_inputs(self) -> list[FrameInput]:
        return [s for s in self.inputs if isinstance(s, FrameInput)]

    @property
    def streamed(self) -> bool:
        return self.block_bytes is not None

    def batch(self, idx: np.ndarray) -> dict:
        """Inputs of rows `idx`: a float16 tensor per pooled store (the heads convert it), and
        (padded float16 frames, lengths) per frame store."""
        return {s.name: s.batch(idx) for s in self.inputs}

    def frame_lengths(self, idx: np.ndarray) -> np.ndarray:
        """Frames of rows `idx` in the first frame input (zeros without one)."""
        if not self.frame_inputs:
            return np.zeros(len(idx), dtype=np.int64)
        s = self.frame_inputs[0]
        return s.counts[s.rows[idx]]

    def in_blocks(self, rows: np.ndarray, rng: np.random.Generator | None = None, *,
                  min_rows: int = 1) -> Iterator[np.ndarray]:
        """Positions into `rows`, ascending, one array per block; the block's frames are held while it is used.

        All frames held (or none to hold): one block, every position, so `rows` is used as given.
        Streamed: the chunks of the largest frame store that hold some of `rows` are visited in a
        random order (`rng`; store order without one) and grouped into blocks whose frames, over
        every frame store, fit `block_bytes`, with at least one chunk and `min_rows` rows a block
        (a training batch needs two rows for its CCC). Every row of `rows` is in exactly one block,
        and within a block the rows keep their order in `rows`.
        """
        rows = np.asarray(rows, dtype=np.int64)
        if not self.streamed:
            yield np.arange(rows.size)
            return
        lead = max(self.frame_inputs, key=lambda s: s.dim)
        chunks, inverse = np.unique(lead.rows[rows] // lead.chunk_rows, return_inverse=True)
        row_bytes = sum(s.frame_bytes(s.rows[rows]) for s in self.frame_inputs)
        chunk_bytes = np.bincount(inverse, weights=row_bytes, minlength=chunks.size)
        chunk_size = np.bincount(inverse, minlength=chunks.size)
        blocks: list[list[int]] = [[]]
        size = n = 0
        for c in (rng.permutation(chunks.size) if rng is not None else np.arange(chunks.size)).tolist():
            if blocks[-1] and n >= min_rows and size + chunk_bytes[c] > self.block_bytes:
                blocks.append([])
                size = n = 0
            blocks[-1].append(c)
            size, n = size + chunk_bytes[c], n + chunk_size[c]
        if len(blocks) > 1 and n < min_rows:  # too few rows left for a block of their own
            blocks[-2] += blocks.pop()
        try:
            for block in blocks:
                positions = np.flatnonzero(np.isin(inverse, block))
                for s in self.frame_inputs:
                    s.hold(s.rows[rows[positions]])
                yield positions
        finally:
            for s in self.frame_inputs:
                s.release()

    def frames_to(self, device) -> bool:
        """Move frames held whole onto a CUDA device when they fit in half its free memory (the
        other half is for the model's activations); True if they moved."""
        import torch

        if device.type != "cuda" or self.streamed or not self.frame_inputs:
            return False
        need = sum(s.held_bytes for s in self.frame_inputs)
        free, _ = torch.cuda.mem_get_info(device)
        if need > free / 2:
            log.info("frames: %.1f GB held in CPU memory; they do not fit in half the GPU's free %.1f GB",
                     need / 1e9, free / 1e9)
            return False
        for s in self.frame_inputs:
            s.data = s.data.to(device)
        self.memory["frames_on"] = str(device)
        log.info("frames: %.1f GB moved onto %s", need / 1e9, device)
        return True


def label_index(values: Sequence[str | None], classes: Sequence[str]) -> np.ndarray:
    """Class index of each value; -1 for None or a value outside `classes` (unknown to the heads)."""
    lookup = {c: i for i, c in enumerate(classes)}
    return np.array([lookup.get(v, -1) if v is not None else -1 for v in values], dtype=np.int64)


def _store_name(path: Path, attrs: dict) -> str:
    return str(attrs.get("name") or Path(path).name.removesuffix(".zarr"))


def _use_as_input(attrs: dict, speaker_head_on: bool) -> bool:
    """The paper keeps the speaker-embedding store out of the input when the speaker head is on."""
    return not (speaker_head_on and attrs.get("kind") == SPEAKER_EMBEDDING_KIND)


def _join_store(store_path: Path, name: str, store_ids: np.ndarray, written: np.ndarray,
                wanted: Sequence[str], *, error: type[Exception] = TrainError,
                splits_hint: str = "the training and development splits") -> tuple[np.ndarray, np.ndarray]:
    """(store row of each wanted id, written flag of each); missing or duplicated ids raise `error`."""
    index: dict[str, int] = {}
    for row, uid in enumerate(store_ids.tolist()):
        if uid in index:
            raise error(f"store {store_path}: utterance {uid} appears twice (rows {index[uid]} and {row}); "
                        "re-extract the store")
        index[uid] = row
    missing = [u for u in wanted if u not in index]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise error(f"store {store_path} ('{name}') lacks {len(missing)} utterance(s) of the corpus: {shown}; "
                    f"extract it over {splits_hint}")
    rows = np.fromiter((index[u] for u in wanted), dtype=np.int64, count=len(wanted))
    return rows, written[rows]


def _open_input(store, path: Path, name: str, attrs: dict):
    """(store ids, written flags, the input): a pooled store read whole; a frame store's counts only."""
    if not store.is_frames:
        store_ids, feats, written = store.read()
        return store_ids, written, InputStore(name=name, path=path, attrs=attrs, features=feats,
                                              rows=np.empty(0, np.int64))
    written = store.flags()[0]
    counts = np.where(written, store.frame_counts(), 0)
    written = written & (counts > 0)  # a row with no frame has nothing to pool
    return store.ids(), written, FrameInput(name=name, path=path, attrs=attrs, shape=store.feature_shape,
                                            chunk_rows=store.chunk_rows, counts=counts,
                                            rows=np.empty(0, np.int64))


def load_rows(data: Path, train_split: str, dev_split: str, stores: Sequence[Path], *, speaker_weight: float,
              require_inputs: bool = True, frames: bool = False,
              memory_budget_gb: float | None = None) -> TrainingData:
    """The labelled train and dev rows of a corpus joined with cached stores; what `train_heads`
    and `finetune_wavlm` both start from. `require_inputs=False`: the stores may be none (the
    fine-tuned encoder is the input). `frames`: frame stores are welcome (train-heads' ConvPool
    takes them); their kept rows are read into memory when everything fits `memory_budget_gb`
    (default: default_memory_budget_gb()), and are left to stream otherwise."""
    from ser_cache.corpus import CorpusError, load_corpus, select_splits
    from ser_cache.store import FeatureStore

    utts = load_corpus(data)
    for option, split in (("--train-split", train_split), ("--dev-split", dev_split)):
        try:  # one split at a time: select_splits names its error "--split", the user typed `option`
            select_splits(utts, [split], source=data)
        except CorpusError as exc:
            raise CorpusError(str(exc).replace("--split", option, 1)) from None
    utts = select_splits(utts, [train_split, dev_split], source=data)
    # select_splits matches case-insensitively; use the corpus's own spelling from here on.
    split_of = {s.lower(): s for s in {u.split for u in utts}}
    train_split, dev_split = split_of[train_split.lower()], split_of[dev_split.lower()]
    ids = [u.id for u in utts]
    counts: dict = {"corpus_rows": len(utts)}

    speaker_head_on = speaker_weight > 0
    inputs: list[InputStore | FrameInput] = []
    excluded: list[dict] = []
    usable = np.ones(len(utts), dtype=bool)
    names: dict[str, Path] = {}
    for path in stores:
        path = Path(path)
        store = FeatureStore.open(path)
        attrs = store.attrs
        name = _store_name(path, attrs)
        if not _use_as_input(attrs, speaker_head_on):
            log.info("%s: a speaker-embedding store; kept out of the input because the speaker head is on "
                     "(--speaker-weight %s), as in the paper", path, speaker_weight)
            excluded.append({**store_record(name, path, attrs, store.feature_shape),
                             "reason": "speaker-embedding store kept out of the input: speaker head on"})
            continue
        if store.is_frames and not frames:
            raise TrainError(f"{path}: a frame store (one vector per frame); this command takes pooled stores. "
                             "Train heads on it with `ser-cache train-heads`, or extract a pooled store")
        if name in names:
            raise TrainError(f"stores {names[name]} and {path} are both named '{name}'; extract one with --name")
        names[name] = path
        # A store being written, or one whose written rows lack their chunks on disk (which Zarr
        # would read as zeros), must not be trained on: refuse it with the chunk and the remedy.
        store.check_readable()
        store_ids, written, item = _open_input(store, path, name, attrs)
        rows, ok = _join_store(path, name, store_ids, written, ids)
        not_written = int((~ok).sum())
        if not_written:
            log.info("%s: %d utterance(s) have no features (failed at extraction) and are left out", path, not_written)
        counts[f"not_written[{name}]"] = not_written
        usable &= ok
        item.rows = rows
        inputs.append(item)
    if not inputs and require_inputs:
        raise TrainError("no input features left: every --features store is a speaker-embedding store, which is "
                         "kept out of the input while the speaker head is on; add a speech or text store, or pass "
                         "--speaker-weight 0 to use the speaker embeddings as input")

    avd = np.array([[np.nan if v is None else v for v in u.avd] for u in utts], dtype=np.float64).reshape(-1, 3)
    labelled = np.isfinite(avd).all(axis=1)
    counts["unlabelled"] = int((~labelled).sum())
    if counts["unlabelled"]:
        log.info("%d utterance(s) lack an arousal, valence or dominance label and are left out", counts["unlabelled"])
    keep = usable & labelled
    splits = np.array([u.split for u in utts], dtype=object)
    for split in (train_split, dev_split):
        in_split = splits == split
        if not (keep & in_split).any():
            raise TrainError(f"split {split} of {data} has no usable row: {int(in_split.sum())} utterance(s), "
                             f"{int((in_split & labelled).sum())} with labels, "
                             f"{int((in_split & labelled & usable).sum())} of those with features in every store")
    k = np.flatnonzero(keep)
    for s in inputs:
        s.rows = s.rows[k]
    emotions = np.array([utts[i].emotion or NO_EMOTION_CLASS for i in k], dtype=object)
    counts["kept_rows"] = int(k.size)
    rows = TrainingData(
        ids=np.array([utts[i].id for i in k], dtype=object),
        paths=np.array([str(utts[i].path) for i in k], dtype=object),
        splits=splits[k],
        emotions=emotions,
        avd=avd[k].astype(np.float32),
        genders=[utts[i].gender for i in k],
        speakers=[utts[i].speaker for i in k],
        inputs=inputs,
        excluded_stores=excluded,
        counts=counts,
        train_split=train_split,
        dev_split=dev_split,
    )
    if rows.frame_inputs:
        _hold_or_stream(rows, default_memory_budget_gb() if memory_budget_gb is None else memory_budget_gb)
    return rows


def _hold_or_stream(data: TrainingData, budget_gb: float) -> None:
    """Read every frame input's kept rows when they fit the budget beside the pooled stores; else stream."""
    budget = budget_gb * 1e9
    pooled = sum(s.features.nbytes for s in data.inputs if isinstance(s, InputStore))
    frames = int(sum(s.frame_bytes(s.rows).sum() for s in data.frame_inputs))
    data.memory.update(budget_gb=budget_gb, pooled_gb=round(pooled / 1e9, 6), frames_gb=round(frames / 1e9, 6))
    if pooled + frames <= budget:
        for s in data.frame_inputs:
            s.hold(s.rows)
        data.memory["frames"] = "held"
        log.info("frames: %.3g GB packed for %d rows, held in memory (budget %.3g GB, pooled stores %.3g GB)",
                 frames / 1e9, data.ids.size, budget_gb, pooled / 1e9)
        return
    data.block_bytes = max(int(budget - pooled), 0)
    data.memory["frames"] = "streamed"
    log.info("frames: %.3g GB packed for %d rows do not fit the budget of %.3g GB beside the pooled stores "
             "(%.3g GB): streamed each epoch in blocks of whole chunks of up to %.3g GB",
             frames / 1e9, data.ids.size, budget_gb, pooled / 1e9, data.block_bytes / 1e9)
