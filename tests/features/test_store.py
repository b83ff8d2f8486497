import h5py
import numpy as np
import pytest

from ser_cache.features.errors import StoreError
from ser_cache.features.export import export_hdf5
from ser_cache.features.store import FeatureStore, chunk_rows_for, remove_store
from ser_cache.features.store_lock import StoreLock
from ser_cache.features.store_ref import fingerprint


def make(tmp_path, n=10, shape=(3,), rows=4):
    ids = [f"u{i:02d}" for i in range(n)]
    return FeatureStore.create(tmp_path / "s.zarr", ids, shape, {"fingerprint": "abc", "settings": {"k": 1}},
                               chunk_rows=rows)


def test_create_write_read(tmp_path):
    s = make(tmp_path)
    assert s.n_rows == 10 and s.n_chunks == 3 and s.pending_chunks() == [0, 1, 2]
    assert s.chunk_bounds(2) == (8, 10)
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    s.write_chunk(0, x, np.ones(4, bool), np.zeros(4, bool))
    s.write_chunk(2, np.ones((2, 3)), np.array([True, False]), np.array([False, True]))
    assert s.pending_chunks() == [1]
    assert s.pending_chunks(retry_failed=True) == [1, 2]
    ids, feats, written = FeatureStore.open(tmp_path / "s.zarr").read()
    assert ids.tolist()[0] == "u00" and feats.dtype == np.float16
    np.testing.assert_array_equal(feats[:4], x)
    assert written.tolist() == [True] * 4 + [False] * 4 + [True, False]


def test_partial_chunk_and_non_finite_writes_are_refused(tmp_path):
    s = make(tmp_path)
    with pytest.raises(StoreError, match="expects features"):
        s.write_chunk(0, np.ones((3, 3)), np.ones(3, bool), np.zeros(3, bool))
    bad = np.ones((4, 3))
    bad[1, 1] = np.nan
    with pytest.raises(StoreError, match="non-finite"):
        s.write_chunk(0, bad, np.ones(4, bool), np.zeros(4, bool))
    big = np.full((4, 3), 1e6)  # beyond float16: would become inf
    with pytest.raises(StoreError, match="non-finite"):
        s.write_chunk(0, big, np.ones(4, bool), np.zeros(4, bool))
    assert not s.flags()[0].any()


def test_open_refuses_other_folders(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match="not a feature store"):
        FeatureStore.open(tmp_path / "plain")
    with pytest.raises(StoreError):
        remove_store(tmp_path / "plain")
    assert (tmp_path / "plain").exists()


def test_chunk_rows_are_about_4_mib():
    assert chunk_rows_for((1280,), 10**6) * 1280 * 2 <= 4 << 20
    assert chunk_rows_for((1280,), 10**6) * 2 * 1280 * 2 > 4 << 20
    assert chunk_rows_for((25, 1024), 10**6) >= 16
    assert chunk_rows_for((4,), 5) == 5


def test_fingerprint_is_order_independent_and_sensitive():
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_lock_refuses_a_second_holder(tmp_path):
    p = tmp_path / "s.zarr"
    with StoreLock(p):
        with pytest.raises(StoreError, match="another extraction"):
            StoreLock(p).acquire()
    StoreLock(p).acquire()  # released: free again


def test_export_hdf5(tmp_path):
    s = make(tmp_path)
    s.write_chunk(1, np.full((4, 3), 2.0), np.ones(4, bool), np.zeros(4, bool))
    out = export_hdf5(s, tmp_path / "s.h5")
    with h5py.File(out) as f:
        np.testing.assert_array_equal(f["features"][:], s.read()[1])
        assert [x.decode() for x in f["ids"][:]] == s.ids().tolist()
        assert f["written"][:].sum() == 4 and f.attrs["fingerprint"] == "abc"


def make_frames(tmp_path, n=6, t=5, d=2, rows=4):
    ids = [f"u{i:02d}" for i in range(n)]
    return FeatureStore.create(tmp_path / "f.zarr", ids, (t, d), {"fingerprint": "fr"}, chunk_rows=rows, frames=True)


def test_frame_store_zeroes_padding_and_reads_valid_frames(tmp_path):
    s = make_frames(tmp_path)
    assert s.is_frames and not make(tmp_path).is_frames
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 5, 2)).astype(np.float32)  # garbage past each row's count too
    counts = np.array([3, 5, 0, 1, 2, 4])
    s.write_chunk(0, x[:4], np.array([True, True, True, False]), np.array([False, False, False, True]),
                  frames=counts[:4])
    s.write_chunk(1, x[4:], np.ones(2, bool), np.zeros(2, bool), frames=counts[4:])
    feats = s.read()[1]
    # Row 3 failed: its count is stored as 0, whatever was passed.
    assert s.frame_counts().tolist() == [3, 5, 0, 0, 2, 4]
    for i, n in enumerate(s.frame_counts()):
        np.testing.assert_array_equal(feats[i, :n], x[i, :n].astype(np.float16))
        assert not feats[i, n:].any(), i
    ids, frames, written = s.read_frames()
    assert ids.tolist() == [f"u{i:02d}" for i in range(6)] and frames.data.dtype == np.float16
    assert frames.lengths.tolist() == [3, 5, 0, 0, 2, 4]
    rows = [5, 1, 3, 0]  # rows of both chunks, out of order
    _, sub, _ = s.read_frames(np.array(rows))
    assert sub.lengths.tolist() == [4, 5, 0, 3]
    for j, r in enumerate(rows):
        np.testing.assert_array_equal(sub.row(j), frames.row(r))
        np.testing.assert_array_equal(sub.row(j), feats[r, : frames.lengths[r]])
    assert len(s.read_frames(np.array([], dtype=np.int64))[1]) == 0


def test_frame_counts_are_checked(tmp_path):
    s = make_frames(tmp_path)
    x, w, f = np.zeros((4, 5, 2)), np.ones(4, bool), np.zeros(4, bool)
    with pytest.raises(StoreError, match="needs 4 frame counts"):
        s.write_chunk(0, x, w, f)
    with pytest.raises(StoreError, match=r"must lie in \[0, 5\]"):
        s.write_chunk(0, x, w, f, frames=np.array([1, 2, 6, 0]))
    with pytest.raises(StoreError, match="not a frame store"):
        make(tmp_path).write_chunk(0, np.zeros((4, 3)), w, f, frames=np.ones(4))
    with pytest.raises(StoreError, match="--pooling frames"):
        make(tmp_path / "p").frame_counts()
    with pytest.raises(StoreError, match="frame store needs a"):
        FeatureStore.create(tmp_path / "x.zarr", ["a"], (3,), {}, frames=True)
    assert not s.flags()[0].any()


def test_frame_summary_and_hdf5_export_of_a_frame_store(tmp_path):
    s = make_frames(tmp_path)
    s.write_chunk(0, np.ones((4, 5, 2)), np.ones(4, bool), np.zeros(4, bool), frames=np.array([1, 2, 3, 4]))
    f = s.summary()["frames"]
    assert f["rows_written"] == 4 and f["frames_max"] == 4 and f["frames_mean"] == 2.5 and f["max_frames_per_row"] == 5
    assert f["frames_bytes"] == 10 * 2 * 2 and f["frames_bytes_per_row"] == 10.0
    assert f["size_bytes_per_row"] == s.summary()["size_bytes"] / 4
    assert "frames" not in make(tmp_path).summary()
    out = export_hdf5(s, tmp_path / "f.h5")
    with h5py.File(out) as h:
        np.testing.assert_array_equal(h["features"][:], s.read()[1])
        assert h["frames"][:].tolist() == [1, 2, 3, 4, 0, 0]


def test_a_frame_store_with_a_layer_axis_reads_every_state_or_one(tmp_path):
    ids = [f"u{i:02d}" for i in range(6)]
    s = FeatureStore.create(tmp_path / "l.zarr", ids, (5, 3, 2), {"fingerprint": "l"}, chunk_rows=4, frames=True)
    assert s.is_frames and s.frame_shape == (3, 2) and s.layer_axis == 3
    assert make_frames(tmp_path).layer_axis is None and make(tmp_path, shape=(4, 3)).layer_axis == 4
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 5, 3, 2)).astype(np.float32)  # garbage past each count
    counts = np.array([3, 5, 0, 1, 2, 4])
    s.write_chunk(0, x[:4], np.ones(4, bool), np.zeros(4, bool), frames=counts[:4])
    s.write_chunk(1, x[4:], np.ones(2, bool), np.zeros(2, bool), frames=counts[4:])
    feats = s.read()[1]
    for i, n in enumerate(counts):
        np.testing.assert_array_equal(feats[i, :n], x[i, :n].astype(np.float16))
        assert not feats[i, n:].any(), i
    _, frames, _ = s.read_frames(np.array([5, 0]))
    assert frames.frame_shape == (3, 2) and frames.lengths.tolist() == [4, 3]
    np.testing.assert_array_equal(frames.row(0), feats[5, :4])
    _, one, _ = s.read_frames(np.array([5, 0]), layer=1)
    assert one.frame_shape == (2,)
    np.testing.assert_array_equal(one.row(0), feats[5, :4, 1])
    np.testing.assert_array_equal(one.row(1), feats[0, :3, 1])
    with pytest.raises(StoreError, match="layer position 3 asked for, but the store has positions 0-2"):
        s.read_frames(layer=3)
    with pytest.raises(StoreError, match="has no layer axis"):
        make_frames(tmp_path / "f").read_frames(layer=0)
    f = s.summary()["frames"]
    assert f["layers"] == 3 and f["frames_bytes"] == counts.sum() * 3 * 2 * 2
    assert s.verify(deep=True) == []
    # A count one too small is found past it, in every state of the frame.
    s.group["frames"][5] = 3
    problems = s.verify(deep=True)
    assert len(problems) == 1 and "frame 3, past the count, is not all zeros" in str(problems[0])
    with pytest.raises(StoreError, match="past the count"):
        s.read_frames(np.array([5]))
    with h5py.File(export_hdf5(s, tmp_path / "l.h5")) as h:
        assert h["features"].shape == (6, 5, 3, 2)
        np.testing.assert_array_equal(h["features"][:], feats)


def test_chunks_of_layered_frame_rows_stay_bounded():
    from ser_cache.features.store import MAX_LAYERED_CHUNK_BYTES

    # Stores without a layer axis: as always, at least 16 rows (a Whisper large frame row, 1.9 MB).
    assert chunk_rows_for((750, 1280), 10_000) == 16 and chunk_rows_for((25, 1024), 10_000) == 64
    # Every state of Whisper large frame by frame: 63 MB a row, one row a chunk; four states: 8 rows.
    assert chunk_rows_for((750, 33, 1280), 10_000) == 1
    rows = chunk_rows_for((750, 4, 1280), 10_000)
    assert rows * 750 * 4 * 1280 * 2 <= MAX_LAYERED_CHUNK_BYTES < 2 * rows * 750 * 4 * 1280 * 2
    assert chunk_rows_for((10, 3, 8), 10_000) == chunk_rows_for((30, 8), 10_000)  # small rows: the 4-MiB rule
