"""What a store's features will take, told before extract encodes a row: exact for pooled rows,
estimated from a sample of the clips' durations for frame stores (a frame store of every layer is L
times a last-layer one).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ser_cache.data import audio as audio_lib
from ser_cache.data.records import Utterance
from ser_cache.features.store import STORE_DTYPE


@dataclass(frozen=True)
class SizeEstimate:
    """What a store's features will take (float16), told before the run: exact for pooled rows; for a
    frame store from the valid frames of a sample of the clips (their audio headers), scaled to every row."""

    store: Path
    rows: int
    row_shape: tuple[int, ...]  # a pooled row, or one frame of a frame store
    bytes: int
    frames: int | None = None  # a frame store: valid frames over every row (estimated)
    layers: int | None = None  # hidden states along the layer axis; None without one
    sampled: int = 0  # clips whose headers the frame estimate rests on; 0: every row's most frames (an upper bound)

    @property
    def frame_level(self) -> bool:
        return self.frames is not None


SIZE_SAMPLE = 256  # clips whose headers a frame store's estimate reads (spread evenly over the rows)


def estimate_size(encoder, utts: list[Utterance], store: Path, max_seconds: float,
                  sample: int = SIZE_SAMPLE) -> SizeEstimate:
    """The store's features in bytes: rows × row (pooled), or valid frames × frame (frame stores).

    The valid frames come from the durations of up to `sample` clips, evenly spread over the
    rows (cropped as extract crops them, counted by the encoder's own `frame_counts`); where no
    header can be read, every row is taken at its most frames.
    """
    from concurrent.futures import ThreadPoolExecutor

    shape = tuple(int(s) for s in encoder.feature_shape)
    itemsize = np.dtype(STORE_DTYPE).itemsize
    n = len(utts)
    if not encoder.frame_level:
        return SizeEstimate(store, n, shape, n * int(np.prod(shape)) * itemsize,
                            layers=shape[0] if len(shape) == 2 else None)  # pooled rows: (D,) or (L, D)
    frame = shape[1:]
    picked = sorted(set(np.linspace(0, n - 1, min(n, sample)).round().astype(int).tolist())) if n else []

    def samples(row: int) -> int | None:
        try:
            i = audio_lib.info(utts[row].path)
        except audio_lib.AudioError:
            return None
        return int(round(min(i.seconds, max_seconds) * audio_lib.SAMPLE_RATE))

    with ThreadPoolExecutor(max_workers=16) as pool:
        lengths = [x for x in pool.map(samples, picked) if x is not None]
    if lengths:
        per_row = float(encoder.frame_counts(np.array(lengths, dtype=np.int64)).mean())
        total = int(round(per_row * n))
    else:
        total = shape[0] * n
    return SizeEstimate(store, n, frame, total * int(np.prod(frame)) * itemsize, frames=total,
                        layers=frame[0] if len(frame) == 2 else None, sampled=len(lengths))
