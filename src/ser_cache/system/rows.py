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
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# In environment.py so that the CLI can show the default in --help without importing numpy.
from ser_cache.infra.environment import default_memory_budget_gb, physical_memory_bytes  # noqa: F401
from ser_cache.features.store_ref import StoreRef

log = logging.getLogger(__name__)

NO_EMOTION_CLASS = "?"  # undersampling class of training rows that have no emotion code
SPEAKER_EMBEDDING_KIND = "xvector"  # stores of this kind are speaker embeddings (the "+ S Emb" input)
FRAME_BYTES = 2  # float16, as stores hold them
# Of the training device's free memory (torch.cuda.mem_get_info; the host's available memory for a
# CPU device), the share the inputs placed on it may take together: the rest is for the weights,
# the optimizer state and the activations, which for ConvPools over frames are large.
DEVICE_SHARE = 0.5
# Where `place` put an input (config.json's memory.inputs): on the training device; in host memory
# with each batch gathered into pinned memory and copied asynchronously (a GPU); in host memory
# (a CPU device); frames read from the store block by block (streamed).
ON_DEVICE, HOST_PINNED, HOST, STREAMED = "device", "host, pinned batches", "host", "streamed"


class TrainError(Exception):
    """Training cannot start or go on as asked; the message names the option, store or utterance."""


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


def index_tensor(idx, device):
    """Row indices as an int64 tensor on `device`: a numpy array is copied over (from pinned memory,
    asynchronously, to a GPU), a tensor moved only when it is elsewhere."""
    import torch

    device = torch.device(device)
    if torch.is_tensor(idx):
        return idx if idx.device == device else idx.to(device, non_blocking=True)
    t = torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def host_index(idx, host_idx=None) -> np.ndarray:
    """The same rows as a numpy array: `host_idx` when given, else `idx` itself (a tensor on a GPU is
    copied back, which waits for the GPU: callers that have the host copy pass it)."""
    import torch

    if host_idx is not None:
        return np.asarray(host_idx, dtype=np.int64)
    if torch.is_tensor(idx):
        return idx.cpu().numpy()
    return np.asarray(idx, dtype=np.int64)


def _pinned(shape, dtype):
    """An empty pinned host tensor. The caching host allocator hands the block out again only after
    the asynchronous copy that read it has finished, so a new one per batch is safe and cheap."""
    import torch

    return torch.empty(shape, dtype=dtype, pin_memory=True)


# --------------------------------------------------------------------------- the two input kinds


@dataclass
class InputStore:
    """A pooled store held whole in memory, and for each kept utterance the store row it lives in."""

    name: str
    path: Path
    attrs: dict
    features: np.ndarray  # (N_store, *shape) float16, as read, in store order
    rows: np.ndarray  # (n,) int64, store row of each kept utterance
    # Placed (`TrainingData.place`): on a GPU, the kept rows gathered once in kept-row order, a
    # (n, *shape) float16 tensor there; on the CPU, the store's own array as a tensor (no copy: a
    # second copy of the pooled stores would only take host memory) and `held_rows` the kept rows'
    # places in it, None when those are the store's rows in order.
    held: object = None
    held_rows: object = None
    pin: bool = False  # not held: batches are gathered into pinned host memory (the device is a GPU)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.features.shape[1:])

    def record(self) -> dict:
        """config.json's entry for this input (store_ref.StoreRef.record)."""
        return StoreRef.of(self.path, self.attrs, self.shape, name=self.name).record()

    @property
    def kept_bytes(self) -> int:
        """Bytes of the kept rows: what holding them on a device takes."""
        return int(self.rows.size * np.prod(self.shape, dtype=np.int64) * self.features.itemsize)

    def hold_on(self, device) -> None:
        """Hold the kept rows on `device`: gathered once, in kept-row order, on a GPU; the store's
        array itself (a tensor view) with the kept rows' index on the CPU."""
        import torch

        device = torch.device(device)
        if self.held is not None and self.held.device == device:
            return
        in_order = self.rows.size == len(self.features) and np.array_equal(self.rows, np.arange(self.rows.size))
        if device.type == "cpu":
            self.held = torch.from_numpy(self.features)
            self.held_rows = None if in_order else torch.from_numpy(self.rows)
        else:
            self.held = torch.from_numpy(self.features if in_order else self.features[self.rows]).to(device)
            self.held_rows = None
        self.pin = False

    def batch(self, idx, host_idx: np.ndarray | None = None):
        """Kept rows `idx` (a numpy array, or an int64 tensor, best on the device they are held on):
        (B, *shape) float16 on that device when held, else gathered in host memory from `host_idx`
        (the same rows as numpy; without it they are read off `idx`)."""
        import torch

        if self.held is not None:
            idx = index_tensor(idx, self.held.device)
            return self.held.index_select(0, idx if self.held_rows is None else self.held_rows.index_select(0, idx))
        rows = self.rows[host_index(idx, host_idx)]
        if not self.pin:
            return torch.from_numpy(self.features[rows])
        store = torch.from_numpy(self.features)
        return torch.index_select(store, 0, torch.from_numpy(rows), out=_pinned((rows.size, *self.shape), store.dtype))


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
    # Placed (`TrainingData.place`, every kept row held): each kept row's first frame in `data` and
    # its frame count, as int64 tensors on `data`'s device, and the counts on the host (a batch's
    # padded length is read there, so the host never waits for the device to learn it).
    starts: object = None
    lengths: object = None
    host_lengths: np.ndarray | None = None
    pin: bool = False  # not placed: batches are gathered into pinned host memory (the device is a GPU)

    @property
    def dim(self) -> int:
        return int(self.shape[1])

    def record(self) -> dict:
        """config.json's entry for this input (store_ref.StoreRef.record)."""
        return StoreRef.of(self.path, self.attrs, self.shape, name=self.name).record()

    def frame_bytes(self, store_rows: np.ndarray) -> np.ndarray:
        """Bytes each of `store_rows` takes packed in memory."""
        return self.counts[store_rows] * (self.dim * FRAME_BYTES) + 8

    @property
    def held_bytes(self) -> int:
        return 0 if self.data is None else int(self.data.nelement() * self.data.element_size())

    def hold(self, store_rows: np.ndarray) -> None:
        """Read the frames of `store_rows` (whole chunks, `read_frames`) and hold them, packed, on the CPU."""
        import torch

        from ser_cache.features.store import StoreError

        self.release()
        store_rows = np.unique(np.asarray(store_rows, dtype=np.int64))
        try:
            _, frames, _ = self._same_store().read_frames(store_rows)
        except (StoreError, OSError):
            self._same_store()  # the store changed under the read: say so
            raise
        self._same_store()  # and not while it was read
        self.data, self.offsets = torch.from_numpy(frames.data), frames.offsets
        self.slot = np.full(self.counts.size, -1, dtype=np.int64)
        self.slot[store_rows] = np.arange(store_rows.size)

    def _same_store(self):
        """The store, opened again (streamed frames are read every epoch), refused unless it is the store
        training started on: `extract --overwrite` may have removed it, or built another in its place,
        whose rows are not those the run was set up with."""
        from ser_cache.features.store import FeatureStore, StoreError

        changed = (f"{self.path}: the frame store changed while training was reading it (rebuilt by `extract "
                   "--overwrite`, or replaced): training stopped, nothing written; rerun it once the store is complete")
        try:
            store = FeatureStore.open(self.path)
            now = store.attrs
        except StoreError as exc:
            raise TrainError(f"{changed} (now: {exc})") from None
        for key in ("fingerprint", "created"):  # created: a rebuild with the very same settings
            if now.get(key) != self.attrs.get(key):
                raise TrainError(f"{changed} ({key}: {self.attrs.get(key)!r} when training started, now "
                                 f"{now.get(key)!r})")
        return store

    def release(self) -> None:
        self.data = self.offsets = self.slot = None
        self.starts = self.lengths = self.host_lengths = None

    def hold_on(self, device) -> None:
        """Move the frames held (every kept row) onto `device` and index them there by kept row."""
        import torch

        if self.slot is None:
            raise RuntimeError(f"frame input '{self.name}': no frames held")
        device = torch.device(device)
        where = self.slot[self.rows]
        if (where < 0).any():
            raise RuntimeError(f"frame input '{self.name}': not every kept row is held")
        starts = self.offsets[where]
        self.host_lengths = self.offsets[where + 1] - starts
        self.data = self.data.to(device)
        self.starts = torch.from_numpy(starts).to(device)
        self.lengths = torch.from_numpy(self.host_lengths).to(device)
        self.pin = False

    def batch(self, idx, host_idx: np.ndarray | None = None):
        """Kept rows `idx` (a numpy array, or an int64 tensor on the device the frames are held on):
        ((B, T_max, D) float16 frames zero-padded to the longest, on the device they are held on;
        (B,) int64 lengths). `host_idx`: the same rows as numpy, which gives T_max without reading
        `idx` back from the device."""
        if self.slot is None:
            raise RuntimeError(f"frame input '{self.name}': no frames held")
        host = host_index(idx, host_idx)
        if self.starts is not None:
            return self._gather_placed(index_tensor(idx, self.data.device), host)
        where = self.slot[self.rows[host]]
        if (where < 0).any():
            raise RuntimeError(f"frame input '{self.name}': rows asked for that are not held")
        return take_packed(self.data, self.offsets, where, pin=self.pin)

    def _gather_placed(self, idx, host: np.ndarray):
        """take_packed's gather, computed on the frames' device from the kept-row index `idx`; only
        the padded length comes from the host."""
        import torch

        longest = max(int(self.host_lengths[host].max(initial=0)), 1)
        starts, lengths = self.starts.index_select(0, idx), self.lengths.index_select(0, idx)
        step = torch.arange(longest, device=idx.device)
        valid = step[None, :] < lengths[:, None]
        pos = starts[:, None] + torch.where(valid, step[None, :], 0)
        x = self.data.index_select(0, pos.reshape(-1)).view(idx.numel(), longest, self.data.shape[1])
        x.masked_fill_(~valid[..., None], 0)
        return x, lengths


def take_packed(data, offsets: np.ndarray, where: np.ndarray, *, pin: bool = False):
    """Rows `where` of packed frames (`data` a (total, D) tensor, row i = data[offsets[i]:offsets[i+1]])
    zero-padded to the longest of them, as Frames.take does, but gathered on `data`'s device.
    `pin` (frames in host memory, training on a GPU): the batch is gathered into pinned memory."""
    import torch

    starts, lengths = offsets[where], offsets[where + 1] - offsets[where]
    longest = max(int(lengths.max(initial=0)), 1)
    step = np.arange(longest)
    valid = step[None, :] < lengths[:, None]
    # Padding positions point at the row's first frame (or frame 0) and are zeroed after the gather.
    pos = starts[:, None] + np.where(valid, step[None, :], 0)
    if data.shape[0] == 0:
        return data.new_zeros((where.size, longest, data.shape[1])), torch.from_numpy(lengths)
    if pin and data.device.type == "cpu":
        out = _pinned((pos.size, data.shape[1]), data.dtype)
        x = torch.index_select(data, 0, torch.from_numpy(pos.reshape(-1)), out=out).view(*pos.shape, -1)
        x.masked_fill_(~torch.from_numpy(valid)[..., None], 0)
        return x, _pinned(lengths.shape, torch.int64).copy_(torch.from_numpy(lengths))
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
              memory_budget_gb: float | None = None) -> TrainingData:
    """The labelled train and dev rows of a corpus joined with cached stores; what `train_heads`
    and `finetune_wavlm` both start from. `require_inputs=False`: the stores may be none (the
    fine-tuned encoder is the input). `frames`: frame stores are welcome (train-heads' ConvPool
    takes them); their kept rows are read into memory when everything fits `memory_budget_gb`
    (default: default_memory_budget_gb()), and are left to stream otherwise."""
    from ser_cache.data.corpus import CorpusError, load_corpus, select_splits
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
