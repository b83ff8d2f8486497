import h5py
import numpy as np
import pytest

from ser_cache.store import FeatureStore, StoreError, StoreLock, chunk_rows_for, export_hdf5, fingerprint, remove_store


def make(tmp_path, n=10, shape=(3,), rows=4):
    ids = [f"u{i:02d}" for i in range(n)]
    return FeatureStore.create(tmp_path / "s.zarr", ids, shape, {"fingerprint": "abc", "settings": {"k": 1}}, chunk_rows=rows)


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
