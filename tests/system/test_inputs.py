"""system.inputs.FrameInput on frame stores with a layer axis: batches of every state, or of one
(`layer_pos`) equal to a store holding that state alone; what they take in memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ser_cache.features.store import FeatureStore
from ser_cache.system.errors import TrainError
from ser_cache.system.inputs import FrameInput

T, L, D, N = 6, 3, 4, 10


def frame_store(path, frames: np.ndarray, counts: np.ndarray) -> FeatureStore:
    """A frame store of rows `frames` ((N, T, D) or (N, T, L, D)) with `counts` valid frames each."""
    store = FeatureStore.create(path, [f"u{i}" for i in range(len(frames))], frames.shape[1:],
                                {"fingerprint": path.stem, "created": "now"}, chunk_rows=4, frames=True)
    for c in range(store.n_chunks):
        start, end = store.chunk_bounds(c)
        store.write_chunk(c, frames[start:end], np.ones(end - start, bool), np.zeros(end - start, bool),
                          frames=counts[start:end])
    return store


def frame_input(store: FeatureStore, rows: np.ndarray, **kw) -> FrameInput:
    """As rows.load_rows opens a frame store."""
    return FrameInput(name=store.path.stem, path=store.path, attrs=store.attrs, shape=store.feature_shape,
                      chunk_rows=store.chunk_rows, counts=store.frame_counts(), rows=rows, **kw)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("layered")
    rng = np.random.default_rng(0)
    frames = rng.standard_normal((N, T, L, D)).astype(np.float32)
    counts = np.array([3, 6, 1, 0, 5, 2, 6, 4, 1, 3])
    layered = frame_store(root / "layered.zarr", frames, counts)
    alone = frame_store(root / "alone.zarr", frames[:, :, 1], counts)  # a store of the middle state only
    return layered, alone, frames.astype(np.float16), counts


def test_one_position_along_the_axis_equals_a_store_of_that_state_alone(stores):
    layered, alone, frames, counts = stores
    rows = np.array([7, 0, 4, 9, 2, 6])  # kept rows across both chunks, out of store order
    one = frame_input(layered, rows, layer_pos=1)
    ref = frame_input(alone, rows)
    assert one.frame_shape == ref.frame_shape == (D,) and one.layers is None and one.dim == D
    assert one.record()["feature_shape"] == [T, L, D]  # the run records the store as it is
    np.testing.assert_array_equal(one.frame_bytes(rows), ref.frame_bytes(rows))
    one.hold(rows)
    ref.hold(rows)
    assert one.held_bytes == ref.held_bytes and one.held_bytes == counts[rows].sum() * D * 2
    idx = np.array([0, 3, 5, 1])
    for placed in (False, True):  # gathered from the packed frames on the host, then placed (indexed there)
        x, lengths = one.batch(idx)
        y, ref_lengths = ref.batch(idx)
        assert x.shape == (4, counts[rows[idx]].max(), D) and x.dtype == torch.float16
        torch.testing.assert_close(x, y, rtol=0, atol=0)
        assert lengths.tolist() == ref_lengths.tolist() == counts[rows[idx]].tolist()
        if not placed:
            one.hold_on("cpu")
            ref.hold_on("cpu")


def test_frames_keep_their_layer_axis_for_the_weighting(stores):
    layered, _, frames, counts = stores
    rows = np.arange(N)
    every = frame_input(layered, rows)
    assert every.layers == L and every.frame_shape == (L, D) and every.dim == D
    np.testing.assert_array_equal(every.frame_bytes(rows), counts * L * D * 2 + 8)  # memory budgets count L
    every.hold(rows)
    assert every.held_bytes == counts.sum() * L * D * 2
    idx = np.array([3, 1, 8])
    for placed in (False, True):
        x, lengths = every.batch(idx)
        assert x.shape == (3, 6, L, D) and lengths.tolist() == [0, 6, 1]
        for b, r in enumerate(idx):
            np.testing.assert_array_equal(x[b, : counts[r]].numpy(), frames[r, : counts[r]])
            assert not x[b, counts[r]:].any()
        if not placed:
            every.hold_on("cpu")


def test_a_layer_position_is_checked(stores):
    layered, alone, _, _ = stores
    with pytest.raises(TrainError, match=r"layer position 3 is outside the store's layer axis \(positions 0-2\)"):
        frame_input(layered, np.arange(N), layer_pos=3)
    with pytest.raises(TrainError, match="keeps one hidden state"):
        frame_input(alone, np.arange(N), layer_pos=0)
