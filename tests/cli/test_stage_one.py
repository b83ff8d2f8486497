import json

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from ser_cache.cli.app import app
from ser_cache.features.store import FeatureStore
from ser_cache.infra.environment import torchaudio_problem

runner = CliRunner()


def test_extract_info_export(models, corpus, tmp_path):
    out = tmp_path / "features"
    r = runner.invoke(app, ["extract", "--model", str(models["whisper"]), "--data", str(corpus), "--out", str(out),
                            "--split", "Train", "--split", "Test3", "--device", "cpu", "--workers", "0",
                            "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "rows written" in r.output
    store = out / "whisper-tiny.zarr"
    n = FeatureStore.open(store).n_rows
    from ser_cache.data.corpus import load_corpus

    assert n == len(load_corpus(corpus, ["Train"])) + 2  # Train + the 2 unlabeled files (Test3)

    r = runner.invoke(app, ["info", str(store), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert summary["rows"] == n and summary["written"] == n and summary["kind"] == "whisper"
    assert runner.invoke(app, ["info", str(store)]).exit_code == 0

    r = runner.invoke(app, ["export", str(store), "--format", "hdf5"])
    assert r.exit_code == 0, r.output
    with h5py.File(store.with_suffix(".h5")) as f:
        np.testing.assert_array_equal(f["features"][:], FeatureStore.open(store).read()[1])


def test_errors_are_one_line_with_exit_code_2(models, corpus, tmp_path):
    r = runner.invoke(app, ["extract", "--model", str(models["whisper"]), "--data", str(corpus), "--out",
                            str(tmp_path), "--split", "Nope", "--device", "cpu"])
    assert r.exit_code == 2
    assert "error:" in r.output and "--split Nope" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["info", str(tmp_path)])
    assert r.exit_code == 2 and "not a feature store" in r.output
    r = runner.invoke(app, ["export", str(tmp_path), "--format", "parquet"])
    # A fixed choice: click refuses it before any work, listing the choices.
    assert r.exit_code == 2 and "'--format'" in r.output and "'parquet' is not one of 'hdf5'" in r.output


@pytest.mark.slow
def test_python_dash_m_runs_the_same_cli():
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "ser_cache", "--help"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "extract" in p.stdout


def test_torchaudio_mismatch_is_one_clear_line():
    assert torchaudio_problem("2.13.0+cpu", "2.13.0") is None
    msg = torchaudio_problem("2.13.0+cpu", "2.11.0+cu128")
    assert "torchaudio 2.11.0+cu128" in msg and "torch is 2.13.0+cpu" in msg and "pip uninstall torchaudio" in msg
    assert "\n" not in msg
