"""frames.Frames: packed variable-length rows against plain per-row numpy."""

import numpy as np
import pytest
import torch

from ser_cache.features.frames import Frames


def padded_rows(lengths=(3, 0, 5, 1), t=6, d=4, seed=0):
    """(n, t, d) rows with their first lengths[i] frames random, and garbage (not zeros) after."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((len(lengths), t, d)).astype(np.float32)
    return x, list(lengths)


def test_from_padded_keeps_only_the_valid_frames():
    x, lengths = padded_rows()
    f = Frames.from_padded(x, lengths)
    assert len(f) == 4 and f.dim == 4 and f.lengths.tolist() == lengths
    assert f.offsets.tolist() == [0, 3, 3, 8, 9] and f.data.shape == (9, 4)
    for i, n in enumerate(lengths):
        np.testing.assert_array_equal(f.row(i), x[i, :n])
    assert Frames.from_padded(x, lengths, dtype="float16").data.dtype == np.float16
    assert f.nbytes == f.data.nbytes + f.offsets.nbytes


def test_padded_and_take_round_trip_to_the_batch_longest_row():
    x, lengths = padded_rows()
    f = Frames.from_padded(x, lengths)
    out, got = f.padded([2, 0])
    assert out.shape == (2, 5, 4) and got.tolist() == [5, 3]
    np.testing.assert_array_equal(out[0], x[2, :5])
    np.testing.assert_array_equal(out[1, :3], x[0, :3])
    assert not out[1, 3:].any()  # padding is zeros, not the garbage that followed in x
    xs, ls = f.take([1, 3])
    assert isinstance(xs, torch.Tensor) and xs.shape == (2, 1, 4) and ls.tolist() == [0, 1]
    assert not xs[0].any()
    np.testing.assert_array_equal(xs[1].numpy(), x[3, :1])
    # Packing what `padded` gives returns the same rows.
    again = Frames.from_padded(*f.padded(range(len(f))))
    np.testing.assert_array_equal(again.data, f.data)
    np.testing.assert_array_equal(again.offsets, f.offsets)


def test_subset_copies_rows_in_the_order_asked():
    x, lengths = padded_rows()
    f = Frames.from_padded(x, lengths)
    s = f.subset([3, 0, 0])
    assert s.lengths.tolist() == [1, 3, 3]
    np.testing.assert_array_equal(s.row(0), x[3, :1])
    np.testing.assert_array_equal(s.row(2), x[0, :3])
    s.data[:] = 0
    assert f.data.any()  # a copy, not a view
    assert len(f.subset([])) == 0


def test_mean_equals_numpy_per_row_and_is_zero_for_an_empty_row():
    x, lengths = padded_rows()
    f = Frames.from_padded(x, lengths, dtype="float16")
    m = f.mean()
    assert m.shape == (4, 4) and m.dtype == np.float32
    for i, n in enumerate(lengths):
        want = x[i, :n].astype(np.float16).astype(np.float64).mean(0) if n else np.zeros(4)
        np.testing.assert_allclose(m[i], want, rtol=1e-6, atol=1e-6)


def test_empty_set_row_and_concat():
    f = Frames.empty([2, 0, 1], 3)
    assert f.data.dtype == np.float16 and not f.data.any()
    f.set_row(0, np.ones((2, 3)))
    f.set_row(2, np.full((1, 3), 2.0))
    with pytest.raises(ValueError, match=r"row 1 holds \(0, 3\) frames"):
        f.set_row(1, np.ones((1, 3)))
    both = Frames.concat([f, f.subset([2])])
    assert both.lengths.tolist() == [2, 0, 1, 1]
    np.testing.assert_array_equal(both.row(3), [[2.0, 2.0, 2.0]])
    with pytest.raises(ValueError):
        Frames.concat([])


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="lengths must lie in"):
        Frames.from_padded(np.zeros((2, 3, 4)), [1, 4])
    with pytest.raises(ValueError, match="expected"):
        Frames.from_padded(np.zeros((2, 3)), [1, 1])
    with pytest.raises(ValueError, match="end at"):
        Frames(np.zeros((3, 2)), np.array([0, 2]))
    with pytest.raises(ValueError, match="starting at 0"):
        Frames(np.zeros((3, 2)), np.array([1, 3]))


def test_frames_with_a_layer_axis_pack_pad_and_average_each_state():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 5, 4, 2)).astype(np.float32)  # (n, T, L, D): four states of two dims
    lengths = [2, 5, 0]
    f = Frames.from_padded(x, lengths)
    assert f.frame_shape == (4, 2) and f.dim == 2 and f.n_layers == 4 and f.data.shape == (7, 4, 2)
    out, got = f.padded([1, 0])
    assert out.shape == (2, 5, 4, 2) and got.tolist() == [5, 2]
    np.testing.assert_array_equal(out[1, :2], x[0, :2])
    assert not out[1, 2:].any()
    m = f.mean()
    assert m.shape == (3, 4, 2)
    np.testing.assert_allclose(m[1], x[1].mean(0), rtol=1e-6, atol=1e-6)
    assert not m[2].any()
    # One position along the axis: the frames a store of that state alone would give, not a view.
    third = f.layer(2)
    assert third.frame_shape == (2,) and third.n_layers is None
    np.testing.assert_array_equal(third.data, Frames.from_padded(x[:, :, 2], lengths).data)
    third.data[:] = 0
    assert f.data[:, 2].any()
    assert Frames.empty([1, 2], (4, 2)).data.shape == (3, 4, 2)
    s = f.subset([1])
    np.testing.assert_array_equal(s.row(0), x[1])
    with pytest.raises(ValueError, match=r"row 0 holds \(5, 4, 2\) frames"):
        s.set_row(0, np.zeros((5, 2)))
    with pytest.raises(ValueError, match="outside 0-3"):
        f.layer(4)
    with pytest.raises(ValueError, match="no layer axis"):
        third.layer(0)
