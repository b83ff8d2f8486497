"""features/store_ref.py: a store as a run records it, finds it again and checks it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ser_cache.features.store_ref import StoreRef, fingerprint, store_name

SETTINGS = {"kind": "whisper", "model_id": "fake/w", "revision": "r1", "pooling": "mean", "rows": "abc"}
ATTRS = {"name": "w", "model_id": "fake/w", "revision": "r1", "kind": "whisper", "modality": "audio",
         "settings": SETTINGS, "fingerprint": fingerprint(SETTINGS)}


def test_the_record_is_config_jsons_inputs_entry_key_for_key_and_reads_back(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ref = StoreRef.of(Path("f") / "w.zarr", ATTRS, (4, 8))
    record = ref.record()
    # The very keys, in the very order, that runs have always written (config.json stays as it was).
    assert json.dumps(record) == json.dumps({
        "name": "w", "path": str((tmp_path / "f" / "w.zarr").resolve()), "fingerprint": ATTRS["fingerprint"],
        "model_id": "fake/w", "revision": "r1", "kind": "whisper", "modality": "audio", "feature_shape": [4, 8],
        "settings": SETTINGS})
    again = StoreRef.from_record(json.loads(json.dumps(record)))
    assert again.record() == record and again.feature_shape == (4, 8)


def test_a_stores_name_is_its_attribute_else_its_folder():
    assert store_name("x/a.zarr", {"name": "given"}) == "given"
    assert store_name("x/a.zarr", {}) == "a"
    assert StoreRef.of("x/a.zarr", {}, (3,)).name == "a"
    assert StoreRef.of("x/a.zarr", ATTRS, (3,), name="other").name == "other"


def test_a_moved_store_is_found_by_its_folder_name_under_features_dir(tmp_path):
    ref = StoreRef.from_record({"name": "w", "path": "/old/place/w.zarr"})
    assert ref.located(None) == Path("/old/place/w.zarr")
    assert ref.located(tmp_path) == tmp_path / "w.zarr"


def test_check_passes_the_same_numbers_and_names_every_other_setting():
    ref = StoreRef.of("w.zarr", ATTRS, (3,))
    ref.check(Path("w.zarr"), ATTRS, Path("run"), error=ValueError)  # same fingerprint
    more_rows = {**SETTINGS, "rows": "other"}  # re-extracted over more utterances: the same numbers
    ref.check(Path("w.zarr"), {"fingerprint": fingerprint(more_rows), "settings": more_rows}, Path("run"),
              error=ValueError)
    other = {**SETTINGS, "pooling": "mean+std"}
    with pytest.raises(ValueError, match=r"store w.zarr does not match run run \(input 'w', fingerprint .*\): "
                                         r"pooling: run has 'mean', found 'mean\+std'\. Re-extract"):
        ref.check(Path("w.zarr"), {"fingerprint": fingerprint(other), "settings": other}, Path("run"), error=ValueError)


def test_join_gives_each_wanted_ids_row_and_refuses_missing_or_twice_stored_ids():
    ref = StoreRef.of("w.zarr", ATTRS, (3,))
    rows, ok = ref.join(np.array(["a", "b", "c"]), np.array([True, False, True]), ["c", "b"], error=KeyError)
    assert rows.tolist() == [2, 1] and ok.tolist() == [True, False]
    with pytest.raises(KeyError, match=r"lacks 1 utterance\(s\) of the corpus: d; extract it over split\(s\) X"):
        ref.join(np.array(["a"]), np.array([True]), ["a", "d"], error=KeyError, splits_hint="split(s) X")
    with pytest.raises(KeyError, match=r"utterance a appears twice \(rows 0 and 1\)"):
        ref.join(np.array(["a", "a"]), np.array([True, True]), ["a"], error=KeyError)
