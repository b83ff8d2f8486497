"""`ser-cache export`: a feature store as one HDF5 file, for tools that read HDF5 rather than Zarr
(docs/feature-store.md), with the corpus's labels beside the rows when asked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ser_cache.features.store import STORE_DTYPE, FeatureStore
from ser_cache.infra.atomic import atomic_path

LABEL_FLOATS = ("arousal", "valence", "dominance")
LABEL_STRINGS = ("emotion", "gender", "speaker", "split")


def export_hdf5(store: FeatureStore, out: str | Path, labels=None) -> Path:
    """Write the same arrays and attributes to an HDF5 file (temporary file, then rename).

    Features are copied one chunk at a time: a frame store's padded features can be several times
    the memory its valid frames need. A frame store's `frames` counts come along. With `labels`
    (the corpus's utterances), `labels/arousal`, `valence`, `dominance` (float32, NaN where
    missing) and `labels/emotion`, `gender`, `speaker`, `split` (strings, "" where missing) are
    added, row for row with `ids`; an id the corpus lacks gets NaN and "".
    """
    import h5py

    out = Path(out)
    ids = store.ids()
    written, failed = store.flags()
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("ids", data=ids.astype(object), dtype=h5py.string_dtype())
        feats = f.create_dataset("features", shape=(store.n_rows, *store.feature_shape), dtype=STORE_DTYPE,
                                 chunks=(store.chunk_rows, *store.feature_shape), compression="gzip")
        for chunk in range(store.n_chunks):
            start, end = store.chunk_bounds(chunk)
            feats[start:end] = store.read_array("features", slice(start, end), chunk)
        f.create_dataset("written", data=written)
        f.create_dataset("failed", data=failed)
        if store.is_frames:
            f.create_dataset("frames", data=store.frame_counts().astype(np.int32))
        if labels is not None:
            by_id = {u.id: u for u in labels}
            rows = [by_id.get(str(i)) for i in ids]
            group = f.create_group("labels")
            for name in LABEL_FLOATS:
                values = [getattr(u, name, None) if u is not None else None for u in rows]
                group.create_dataset(name, data=np.array([np.nan if v is None else v for v in values], np.float32))
            for name in LABEL_STRINGS:
                values = [(getattr(u, name, None) or "") if u is not None else "" for u in rows]
                group.create_dataset(name, data=np.array(values, dtype=object), dtype=h5py.string_dtype())
            group.attrs["rows_without_labels"] = sum(u is None for u in rows)
        for k, v in store.attrs.items():
            f.attrs[k] = json.dumps(v) if isinstance(v, (dict, list)) else v
    return out
