"""Frame-level features held compactly in memory: every valid frame of every row, no padding.

A frame store (`extract --pooling frames`) keeps, per utterance, the encoder's last layer at every
frame of the clip's real length. On disk each row is padded to the store's longest possible length
(zeros, which Zarr's compressor reduces to almost nothing); in memory the padding would cost 2-3x
the real frames (a 5.5-s clip fills 275 of Whisper's 750 positions), so rows are packed end to end:

    data     (total_frames, D) float16   row i is data[offsets[i]:offsets[i + 1]]
    offsets  (n + 1,) int64

A store that keeps several hidden states (`extract --pooling frames --layers ...`) has frames of
(L, D), one vector per state: data is then (total_frames, L, D), and everything below works on
whatever a frame is (`frame_shape`); `layer(k)` keeps position k along that axis.

`take(idx)` pads just the rows of one batch, to that batch's longest row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Frames"]


@dataclass
class Frames:
    """Rows of variable-length (T_i, D) (or (T_i, L, D)) frames, packed end to end (see the module docstring)."""

    data: np.ndarray  # (total_frames, D), or (total_frames, L, D) with a layer axis
    offsets: np.ndarray  # (n + 1,) int64, offsets[0] == 0, non-decreasing

    def __post_init__(self) -> None:
        self.offsets = np.asarray(self.offsets, dtype=np.int64)
        if self.data.ndim not in (2, 3):
            raise ValueError(f"frames data must be (total_frames, D) or (total_frames, L, D), got {self.data.shape}")
        if self.offsets.ndim != 1 or self.offsets.size < 1 or self.offsets[0] != 0:
            raise ValueError("frames offsets must be a 1-d array starting at 0")
        if np.any(np.diff(self.offsets) < 0) or self.offsets[-1] != self.data.shape[0]:
            raise ValueError(f"frames offsets must be non-decreasing and end at {self.data.shape[0]}")

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_padded(cls, padded: np.ndarray, lengths: Sequence[int], dtype=None) -> Frames:
        """Pack (n, T, D) (or (n, T, L, D)) padded rows whose first lengths[i] frames are valid."""
        padded = np.asarray(padded)
        lengths = np.asarray(lengths, dtype=np.int64)
        if padded.ndim not in (3, 4) or lengths.shape != (padded.shape[0],):
            raise ValueError(f"expected (n, T, D) or (n, T, L, D) rows and n lengths, got {padded.shape} and "
                             f"{lengths.shape}")
        if lengths.size and (lengths.min() < 0 or lengths.max() > padded.shape[1]):
            raise ValueError(f"frame lengths must lie in [0, {padded.shape[1]}]")
        offsets = np.zeros(lengths.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        data = np.empty((int(offsets[-1]), *padded.shape[2:]), dtype=dtype or padded.dtype)
        for i, n in enumerate(lengths.tolist()):
            data[offsets[i]:offsets[i] + n] = padded[i, :n]
        return cls(data, offsets)

    @classmethod
    def empty(cls, lengths: Sequence[int], frame_shape: int | Sequence[int], dtype="float16") -> Frames:
        """Room for rows of the given lengths, to be filled with `set_row` (e.g. while reading a store).

        `frame_shape`: D, or (D,), or (L, D) for frames with a layer axis."""
        lengths = np.asarray(lengths, dtype=np.int64)
        offsets = np.zeros(lengths.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        shape = (int(frame_shape),) if np.ndim(frame_shape) == 0 else tuple(int(s) for s in frame_shape)
        return cls(np.zeros((int(offsets[-1]), *shape), dtype=dtype), offsets)

    @classmethod
    def concat(cls, parts: Sequence[Frames]) -> Frames:
        if not parts:
            raise ValueError("nothing to concatenate")
        data = np.concatenate([p.data for p in parts])
        lengths = np.concatenate([p.lengths for p in parts])
        offsets = np.zeros(lengths.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(data, offsets)

    # ----------------------------------------------------------------- access
    def __len__(self) -> int:
        return int(self.offsets.size - 1)

    @property
    def dim(self) -> int:
        """D: the size of one vector (of each state's, with a layer axis)."""
        return int(self.data.shape[-1])

    @property
    def frame_shape(self) -> tuple[int, ...]:
        """(D,), or (L, D) with a layer axis."""
        return tuple(int(s) for s in self.data.shape[1:])

    @property
    def n_layers(self) -> int | None:
        """L, the states along the layer axis; None without one."""
        return int(self.data.shape[1]) if self.data.ndim == 3 else None

    def layer(self, position: int) -> Frames:
        """The frames of one position along the layer axis, (total_frames, D), copied (the rest is
        not kept alive by it); the same offsets."""
        if self.data.ndim != 3:
            raise ValueError("these frames have no layer axis")
        if not 0 <= position < self.data.shape[1]:
            raise ValueError(f"layer position {position} is outside 0-{self.data.shape[1] - 1}")
        return Frames(np.ascontiguousarray(self.data[:, position]), self.offsets.copy())

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes + self.offsets.nbytes)

    def row(self, i: int) -> np.ndarray:
        return self.data[self.offsets[i]:self.offsets[i + 1]]

    def set_row(self, i: int, frames: np.ndarray) -> None:
        n = int(self.offsets[i + 1] - self.offsets[i])
        if frames.shape != (n, *self.frame_shape):
            raise ValueError(f"row {i} holds {(n, *self.frame_shape)} frames, got {frames.shape}")
        self.data[self.offsets[i]:self.offsets[i + 1]] = frames

    def padded(self, idx: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(B, T_max, D) (or (B, T_max, L, D)) rows `idx` zero-padded to the longest of them, and their
        lengths (B,) int64."""
        idx = np.asarray(idx, dtype=np.int64)
        lengths = self.lengths[idx]
        longest = max(int(lengths.max()) if lengths.size else 0, 1)
        out = np.zeros((idx.size, longest, *self.frame_shape), dtype=self.data.dtype)
        for b, i in enumerate(idx.tolist()):
            out[b, : lengths[b]] = self.row(i)
        return out, lengths

    def take(self, idx: Sequence[int]):
        """Torch tensors of `padded(idx)`: ((B, T_max, D) or (B, T_max, L, D) features, (B,) int64 lengths)."""
        import torch

        x, lengths = self.padded(idx)
        return torch.from_numpy(x), torch.from_numpy(lengths)

    def subset(self, idx: Sequence[int]) -> Frames:
        """A new Frames holding rows `idx` (copied), in that order."""
        idx = np.asarray(idx, dtype=np.int64)
        lengths = self.lengths[idx]
        out = Frames.empty(lengths, self.frame_shape, dtype=self.data.dtype)
        for j, i in enumerate(idx.tolist()):
            out.data[out.offsets[j]:out.offsets[j + 1]] = self.row(i)
        return out

    def mean(self) -> np.ndarray:
        """(n, D) (or (n, L, D)) float32 mean over each row's frames (zeros for an empty row)."""
        csum = np.zeros((self.data.shape[0] + 1, *self.frame_shape), dtype=np.float64)
        np.cumsum(self.data, axis=0, dtype=np.float64, out=csum[1:])
        sums = csum[self.offsets[1:]] - csum[self.offsets[:-1]]
        counts = np.maximum(self.lengths, 1).reshape(-1, *([1] * len(self.frame_shape)))
        return (sums / counts).astype(np.float32)
