"""train-heads and sweep train on one CPU thread unless told otherwise (the default's measurements:
docs/performance.md, "Threads for train-heads"); --threads N sets N, --threads 0 leaves torch's own."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from ser_cache.cli.app import app
from ser_cache.system.errors import TrainError
from ser_cache.train import recipe, sweep
from ser_cache.train.options import TrainHeadsConfig

TORCH_OWN = 3  # what torch is set to before each test: neither 1 nor a count a test passes


@pytest.fixture
def torch_own_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(TORCH_OWN)
    yield
    torch.set_num_threads(before)


def threads_seen(monkeypatch, module, name: str) -> list[int]:
    """Replace module.name (the training itself) by one that notes torch's threads and stops."""
    seen = []

    def stop(*args, **kwargs):
        seen.append(torch.get_num_threads())
        raise TrainError("stopped by the test once the threads were set")

    monkeypatch.setattr(module, name, stop)
    return seen


@pytest.mark.parametrize("command, module, name", [("train-heads", recipe, "_train_heads"),
                                                    ("sweep", sweep, "_sweep")])
@pytest.mark.parametrize("option, expected", [([], 1), (["--threads", "2"], 2), (["--threads", "0"], TORCH_OWN)])
def test_training_threads_default_to_one(tmp_path, monkeypatch, torch_own_threads, command, module, name, option,
                                         expected):
    seen = threads_seen(monkeypatch, module, name)
    result = CliRunner().invoke(app,
                                [command, "--features", str(tmp_path / "a.zarr"), "--data", str(tmp_path / "corpus"),
                                      "--out", str(tmp_path / "out"), *option])
    assert "stopped by the test" in result.output, result.output
    assert seen == [expected]
    assert torch.get_num_threads() == TORCH_OWN  # given back afterwards


def test_python_default_is_one_thread_and_negative_is_refused(tmp_path, monkeypatch, torch_own_threads):
    seen = threads_seen(monkeypatch, recipe, "_train_heads")
    cfg = TrainHeadsConfig(features=(tmp_path / "a.zarr",), data=tmp_path, out=tmp_path / "run")
    with pytest.raises(TrainError, match="stopped by the test"):
        recipe.train_heads(cfg)
    assert cfg.threads == 1 and seen == [1]
    with pytest.raises(TrainError, match=r"--threads -1: expected 1 or more, or 0 for torch's default"):
        TrainHeadsConfig(features=(tmp_path / "a.zarr",), data=tmp_path, out=tmp_path / "r", threads=-1).verify()
