"""The two kinds of input a training run reads, and how a batch of rows is gathered from each.

`InputStore`: a pooled store, read whole into memory, with the store row of each kept utterance.
`FrameInput`: a frame store, whose frames are held packed end to end for the kept rows (or for
one streamed block of them, `hold`), read again each epoch from a store that must not change
under it. A frame store with a layer axis ((T, L, D) rows, `extract --layers`) gives frames of
(L, D) for the model's learned layer weighting, or of one state (`layer_pos`).

Both give a batch (`batch`) from wherever `TrainingData.place` (rows.py) put them: on the
training device, gathered there with an index tensor (`index_tensor`); or in host memory, gathered
there, into pinned memory when training on a GPU (`take_packed` pads frame rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ser_cache.features.store_ref import StoreRef
from ser_cache.system.errors import TrainError

FRAME_BYTES = 2  # float16, as stores hold them
# A frame input's entry in a run's config.json ("inputs") when one position along its store's layer
# axis was kept (FrameInput.layer_pos): predict reads the store's frames, or the encoder's, at it.
LAYER_POSITION = "layer_position"


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

    A store with a layer axis (`shape` (T, L, D)) is held and batched with it: frames (L, D),
    batches (B, T_max, L, D), for a LayerWeighting per frame (model.FeatureModel). `layer_pos`
    keeps one position along that axis instead (0 to L-1, the store's held states in order:
    encoders.layers.stored_layers): frames (D,), batches (B, T_max, D), exactly what a store
    holding only that state gives; only that state is read into memory.
    """

    name: str
    path: Path
    attrs: dict
    shape: tuple[int, ...]  # the store's row: (T, D), or (T, L, D) with a layer axis; T its most frames per row
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
    layer_pos: int | None = None  # one position along the store's layer axis; None: keep the axis

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        if len(self.shape) not in (2, 3):
            raise TrainError(f"{self.path}: a frame store's rows are (frames, dim) or (frames, layers, dim), "
                             f"not {self.shape}")
        if self.layer_pos is not None:
            if len(self.shape) != 3:
                raise TrainError(f"frame input '{self.name}' ({self.path}): a layer was chosen, but the store "
                                 "keeps one hidden state (no layer axis); leave the layer out for it")
            if not 0 <= int(self.layer_pos) < self.shape[1]:
                raise TrainError(f"frame input '{self.name}' ({self.path}): layer position {self.layer_pos} is "
                                 f"outside the store's layer axis (positions 0-{self.shape[1] - 1})")
            self.layer_pos = int(self.layer_pos)

    @property
    def dim(self) -> int:
        """D, the size of each vector of a frame."""
        return int(self.shape[-1])

    @property
    def layers(self) -> int | None:
        """L, the states of each frame a batch holds (for the model's LayerWeighting); None when a
        batch's frames are single vectors (no layer axis, or one position kept: `layer_pos`)."""
        return int(self.shape[1]) if len(self.shape) == 3 and self.layer_pos is None else None

    @property
    def frame_shape(self) -> tuple[int, ...]:
        """One frame as held and batched: (L, D), or (D,)."""
        return (self.layers, self.dim) if self.layers is not None else (self.dim,)

    def record(self) -> dict:
        """config.json's entry for this input (store_ref.StoreRef.record): the store as it is, layer axis
        included; with `layer_pos`, also that position ("layer_position", which predict's gather reads
        the frames at: runs.gather) and the hidden state it holds ("layer", transformers' numbering)."""
        record = StoreRef.of(self.path, self.attrs, self.shape, name=self.name).record()
        if self.layer_pos is not None:
            from ser_cache.encoders.layers import stored_layers

            setting = (self.attrs.get("settings") or {}).get("layer")
            held = stored_layers(setting, axis_length=self.shape[1]) if setting is not None else None
            record[LAYER_POSITION] = self.layer_pos
            record["layer"] = held[self.layer_pos] if held and len(held) == self.shape[1] else None
        return record

    def frame_bytes(self, store_rows: np.ndarray) -> np.ndarray:
        """Bytes each of `store_rows` takes packed in memory (× L with the layer axis kept)."""
        return self.counts[store_rows] * (int(np.prod(self.frame_shape)) * FRAME_BYTES) + 8

    @property
    def held_bytes(self) -> int:
        return 0 if self.data is None else int(self.data.nelement() * self.data.element_size())

    def hold(self, store_rows: np.ndarray) -> None:
        """Read the frames of `store_rows` (whole chunks, `read_frames`; only position `layer_pos` of
        each frame when one is chosen) and hold them, packed, on the CPU."""
        import torch

        from ser_cache.features.errors import StoreError

        self.release()
        store_rows = np.unique(np.asarray(store_rows, dtype=np.int64))
        try:
            store = self._same_store()
            _, frames, _ = (store.read_frames(store_rows) if self.layer_pos is None
                            else store.read_frames(store_rows, layer=self.layer_pos))
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
        from ser_cache.features.errors import StoreError
        from ser_cache.features.store import FeatureStore

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
        ((B, T_max, *frame_shape) float16 frames zero-padded to the longest, on the device they are
        held on; (B,) int64 lengths). `host_idx`: the same rows as numpy, which gives T_max without reading
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
        frame = tuple(self.data.shape[1:])
        x = self.data.index_select(0, pos.reshape(-1)).view(idx.numel(), longest, *frame)
        x.masked_fill_(~valid.view(*valid.shape, *(1,) * len(frame)), 0)
        return x, lengths


def take_packed(data, offsets: np.ndarray, where: np.ndarray, *, pin: bool = False):
    """Rows `where` of packed frames (`data` a (total, D) or (total, L, D) tensor, row i =
    data[offsets[i]:offsets[i+1]]) zero-padded to the longest of them, as Frames.take does, but gathered
    on `data`'s device. `pin` (frames in host memory, training on a GPU): the batch is gathered into
    pinned memory."""
    import torch

    starts, lengths = offsets[where], offsets[where + 1] - offsets[where]
    longest = max(int(lengths.max(initial=0)), 1)
    step = np.arange(longest)
    valid = step[None, :] < lengths[:, None]
    frame = tuple(data.shape[1:])
    # (B, T_max) → broadcast over every element of a frame.
    mask = torch.from_numpy(~valid).view(*valid.shape, *(1,) * len(frame))
    # Padding positions point at the row's first frame (or frame 0) and are zeroed after the gather.
    pos = starts[:, None] + np.where(valid, step[None, :], 0)
    if data.shape[0] == 0:
        return data.new_zeros((where.size, longest, *frame)), torch.from_numpy(lengths)
    if pin and data.device.type == "cpu":
        out = _pinned((pos.size, *frame), data.dtype)
        x = torch.index_select(data, 0, torch.from_numpy(pos.reshape(-1)), out=out).view(*pos.shape, *frame)
        x.masked_fill_(mask, 0)
        return x, _pinned(lengths.shape, torch.int64).copy_(torch.from_numpy(lengths))
    x = data[torch.from_numpy(pos).to(data.device)]
    x.masked_fill_(mask.to(data.device), 0)
    return x, torch.from_numpy(lengths)
