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

`TrainingData.place(device)` then puts the inputs where training gathers its batches: each input
whose bytes fit `DEVICE_SHARE` of the device's free memory (with the inputs placed before it) is
held on the device as one tensor of the kept rows in kept-row order, so a batch is one
`index_select` there with an index tensor already on the device; the others stay in host memory
and each batch is gathered there (into pinned memory when the device is a GPU, so that its copy
over is asynchronous). On a CPU device the same code runs with CPU tensors (a pooled store's
array serves as it is, indexed through the kept rows' store rows: nothing is copied).

The two kinds of input, and how a batch is gathered from each, are in inputs.py.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ser_cache.features.store_ref import StoreRef

# In environment.py so that the CLI can show the default in --help without importing numpy.
from ser_cache.infra.environment import default_memory_budget_gb, physical_memory_bytes  # noqa: F401
from ser_cache.system.errors import TrainError
from ser_cache.system.inputs import FrameInput, InputStore, index_tensor
from ser_cache.system.layer_choice import layer_choices

log = logging.getLogger(__name__)

NO_EMOTION_CLASS = "?"  # undersampling class of training rows that have no emotion code
SPEAKER_EMBEDDING_KIND = "xvector"  # stores of this kind are speaker embeddings (the "+ S Emb" input)
# Of the training device's free memory (torch.cuda.mem_get_info; the host's available memory for a
# CPU device), the share the inputs placed on it may take together: the rest is for the weights,
# the optimizer state and the activations, which for ConvPools over frames are large.
DEVICE_SHARE = 0.5
# Where `place` put an input (config.json's memory.inputs): on the training device; in host memory
# with each batch gathered into pinned memory and copied asynchronously (a GPU); in host memory
# (a CPU device); frames read from the store block by block (streamed).
ON_DEVICE, HOST_PINNED, HOST, STREAMED = "device", "host, pinned batches", "host", "streamed"


def available_memory_bytes() -> int:
    """Memory the host can still give (MemAvailable: free plus reclaimable cache), else the free pages."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def device_free_bytes(device) -> int:
    """Free memory of the training device: the GPU's (torch.cuda.mem_get_info), or the host's."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return available_memory_bytes()


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
    device: object = None  # torch.device the inputs were placed for (`place`); None: not placed

    @property
    def frame_inputs(self) -> list[FrameInput]:
        return [s for s in self.inputs if isinstance(s, FrameInput)]

    @property
    def streamed(self) -> bool:
        return self.block_bytes is not None

    def batch(self, idx, host_idx: np.ndarray | None = None) -> dict:
        """Inputs of rows `idx`: a float16 tensor per pooled store (the heads convert it), and
        (padded float16 frames, lengths) per frame store, each on the device it is held on.

        `idx` is a numpy array, or an int64 tensor on the placed device (`index`); with a tensor,
        `host_idx` (the same rows as numpy) lets inputs held on the host and frame inputs (whose
        padded length is read on the host) do without reading `idx` back from the device.
        """
        return {s.name: s.batch(idx, host_idx) for s in self.inputs}

    def index(self, rows: np.ndarray):
        """`rows` as an int64 tensor on the device the inputs were placed for (the CPU if not placed):
        one copy, whose slices are batch indices."""
        return index_tensor(rows, self.device if self.device is not None else "cpu")

    def place(self, device, share: float | None = None) -> dict:
        """Hold the inputs where training on `device` gathers its batches; returns {name: where}.

        Each input not streamed, largest first, is held on `device` (pooled: the kept rows in
        kept-row order, gathered once, or on the CPU the store's array as it is; frames: the packed
        frames of every kept row, with the per-row starts and counts) while the inputs' bytes held
        there stay within `share` (default DEVICE_SHARE) of the device's free memory
        (device_free_bytes, read once, before any of them moves; on the CPU, where holding them
        copies nothing, the same rule keeps the code path one). The others stay in host memory and
        are gathered there per batch: into pinned memory when `device` is a GPU, so that the copy
        over is asynchronous (to_device's non_blocking); so are streamed frames, block by block.
        `memory` records where each input went, and the figures that decided.
        """
        import torch

        device = torch.device(device)
        share = DEVICE_SHARE if share is None else float(share)
        free = device_free_bytes(device)
        allowed = share * free
        cuda = device.type == "cuda"

        def need(s) -> int:
            """Bytes `s` adds on `device`: none when it is held there already (then `free` excludes it)."""
            if isinstance(s, InputStore):
                return 0 if s.held is not None and s.held.device == device else s.kept_bytes
            there = s.data is not None and s.data.device == device and (cuda or s.starts is not None)
            return 0 if there else s.held_bytes

        where: dict[str, str] = {}
        used = 0
        for s in sorted(self.inputs, key=need, reverse=True):
            if isinstance(s, FrameInput) and self.streamed:
                s.pin, where[s.name] = cuda, STREAMED
                continue
            n = need(s)
            if used + n <= allowed:
                s.hold_on(device)
                used += n
                where[s.name] = ON_DEVICE
                continue
            if isinstance(s, InputStore):  # placed before (another device or share): not any more
                s.held = s.held_rows = None
            else:
                s.starts = s.lengths = s.host_lengths = None
            s.pin, where[s.name] = cuda, HOST_PINNED if cuda else HOST
        self.device = device
        where = {s.name: where[s.name] for s in self.inputs}
        self.memory.update(device=str(device), device_free_gb=round(free / 1e9, 3), device_share=share,
                           device_inputs_gb=round(used / 1e9, 6), inputs=where)
        if cuda and any(w == ON_DEVICE for s, w in zip(self.inputs, where.values()) if isinstance(s, FrameInput)):
            self.memory["frames_on"] = str(device)
        log.info("%s", placement_text(device, where, used, free, share))
        return where

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


def label_index(values: Sequence[str | None], classes: Sequence[str]) -> np.ndarray:
    """Class index of each value; -1 for None or a value outside `classes` (unknown to the heads)."""
    lookup = {c: i for i, c in enumerate(classes)}
    return np.array([lookup.get(v, -1) if v is not None else -1 for v in values], dtype=np.int64)


# ----------------------------------------------------------------- --layer: one hidden state of a layered input



def layer_picks(specs: Sequence[str], data: TrainingData) -> dict[str, int]:
    """The heads' `layer_picks` of a run (heads.MultitaskHeads): the position `--layer` picks in each
    pooled input with a layer axis. A frame input's layer was picked when its rows were read
    (`load_rows`, FrameInput's layer_pos): a run (a sweep member) may not ask another of it."""
    choices = layer_choices(specs, data.inputs)
    picks = {}
    for s in data.inputs:
        if isinstance(s, InputStore):
            if s.name in choices:
                picks[s.name] = choices[s.name][1]
            continue
        read = getattr(s, "layer_pos", None)
        wanted = choices[s.name][1] if s.name in choices else None
        if read != wanted:
            raise TrainError(f"--layer: frame input {s.name} was read with "
                             f"{'layer position ' + str(read) if read is not None else 'every layer'}, this run asks "
                             f"for {'hidden state ' + str(choices[s.name][0]) if wanted is not None else 'every layer'}"
                             "; a sweep variant cannot change the layer of a frame store (its frames are read once): "
                             "give --layer to the sweep itself, or train the layer with train-heads")
    return picks

def _use_as_input(attrs: dict, speaker_head_on: bool) -> bool:
    """The paper keeps the speaker-embedding store out of the input when the speaker head is on."""
    return not (speaker_head_on and attrs.get("kind") == SPEAKER_EMBEDDING_KIND)


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
              memory_budget_gb: float | None = None, layer: Sequence[str] = ()) -> TrainingData:
    """The labelled train and dev rows of a corpus joined with cached stores; what `train_heads`
    and `finetune_wavlm` both start from. `require_inputs=False`: the stores may be none (the
    fine-tuned encoder is the input). `frames`: frame stores are welcome (train-heads' ConvPool
    takes them); their kept rows are read into memory when everything fits `memory_budget_gb`
    (default: default_memory_budget_gb()), and are left to stream otherwise. `layer`: train-heads'
    --layer values; a frame store with a layer axis is read at the layer they pick (FrameInput's
    layer_pos), a pooled one is read whole (the heads pick: layer_picks)."""
    from ser_cache.data.corpus import load_corpus, select_splits
    from ser_cache.data.records import CorpusError
    from ser_cache.features.store import FeatureStore

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
        ref = StoreRef.of(path, attrs, store.feature_shape)
        name = ref.name
        if not _use_as_input(attrs, speaker_head_on):
            log.info("%s: a speaker-embedding store; kept out of the input because the speaker head is on "
                     "(--speaker-weight %s), as in the paper", path, speaker_weight)
            excluded.append({**ref.record(),
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
        rows, ok = ref.join(store_ids, written, ids, error=TrainError)
        not_written = int((~ok).sum())
        if not_written:
            log.info("%s: %d utterance(s) have no features (failed at extraction) and are left out", path, not_written)
        counts[f"not_written[{name}]"] = not_written
        usable &= ok
        item.rows = rows
        inputs.append(item)
    if layer:
        for name, (_, pos) in layer_choices(layer, inputs).items():
            i = next(i for i, s in enumerate(inputs) if s.name == name)
            if isinstance(inputs[i], FrameInput):
                inputs[i] = replace(inputs[i], layer_pos=pos)
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


def size_text(n_bytes: float) -> str:
    """A size for people, in the decimal units of --memory-budget: 251 kB, 12.6 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            value = n_bytes / scale
            return f"{value:.3g} {unit}" if value < 1000 else f"{value:.0f} {unit}"
    return f"{int(n_bytes)} bytes"


def placement_text(device, where: dict[str, str], used: int, free: int, share: float) -> str:
    """The log line of `TrainingData.place`: which inputs went where, and the figures that decided."""
    said = {ON_DEVICE: f"held on {device}", HOST: "in host memory, each batch gathered there",
            HOST_PINNED: f"in host memory, each batch copied to {device} through pinned memory",
            STREAMED: "streamed from their stores block by block"}
    groups: dict[str, list[str]] = {}
    for name, place in where.items():
        groups.setdefault(place, []).append(name)
    placed = "; ".join(f"{', '.join(names)} {said.get(place, place)}" for place, names in groups.items())
    return (f"inputs: {placed} ({size_text(used)} on {device}, of up to {size_text(share * free)} allowed: "
            f"{share:.0%} of its {size_text(free)} free)")


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
        log.info("frames: %s packed for %d rows, held in memory (budget %s, pooled stores %s)",
                 size_text(frames), data.ids.size, size_text(budget), size_text(pooled))
        return
    data.block_bytes = max(int(budget - pooled), 0)
    data.memory["frames"] = "streamed"
    log.info("frames: %s packed for %d rows do not fit the budget of %s beside the pooled stores (%s): "
             "streamed each epoch in blocks of whole chunks of up to %s",
             size_text(frames), data.ids.size, size_text(budget), size_text(pooled), size_text(data.block_bytes))
