"""Run files that cannot run code, one writer per run and store, and one-line refusals (issue 17).

The fine-tuning checkpoint is one safetensors file with a JSON tree (statefile.py): a crafted
pickle in a run directory is refused without being unpickled, a truncated checkpoint is one line,
and a resumed run still ends exactly where an uninterrupted one does. A run being fine-tuned is
locked like a store being extracted; neither leaves its lock file behind. Model folders whose
weights are a pickle torch refuses, or that hold a Whisper model given to `finetune wavlm`, are
one-line refusals too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from ser_cache.cli.app import app
from ser_cache.finetune.loop import finetune_wavlm
from ser_cache.finetune.options import FinetuneConfig
from ser_cache.infra import atomic
from ser_cache.runs import layout, rundir
from ser_cache.runs.checkpoint_file import CHECKPOINT

import factories
from finetune_support import base_config, cli_args, interrupted_run, learnable_corpus, subprocess_env
from synthetic import make_run

runner = CliRunner()
LEGACY_CHECKPOINT = "checkpoint.pt"  # what ser-cache 0.1.0 wrote: a pickle
CHECKPOINT_FORMAT = "ser-cache-finetune-checkpoint"


def lock_file(target: Path) -> Path:
    return Path(str(target) + ".lock")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result) -> str:
    """The command failed with exit 2 and said why in one line (its last), without a traceback;
    log lines of the work done before (the corpus read) may come first."""
    output = result.output.strip()
    assert result.exit_code == 2, result.output[-3000:]
    assert "Traceback" not in output and "internal error" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and output.splitlines()[-1] == errors[0], output[-3000:]
    return errors[0]


class RunsCode:
    """Unpickling it calls open(marker, "w"): the marker's existence proves the file was unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def pickle_that_runs_code(path: Path, marker: Path) -> Path:
    torch.save({"format": CHECKPOINT_FORMAT, "epoch": 1, "history": [], "payload": RunsCode(marker)}, path)
    return path


@pytest.fixture(scope="module")
def corpus_ft(tmp_path_factory) -> Path:
    return learnable_corpus(tmp_path_factory.mktemp("trust") / "corpus")


@pytest.fixture(scope="module")
def ft_config(corpus_ft, models, tmp_path_factory) -> FinetuneConfig:
    """Three epochs of the tiny WavLM on the learnable corpus; each test gives its own --out."""
    return base_config(corpus_ft, models["wavlm"], tmp_path_factory.mktemp("ft") / "run", epochs=3)


def unfinished_run_dir(path: Path) -> Path:
    """A run directory as `finetune wavlm` leaves it in progress: the marker, no config.json."""
    path.mkdir(parents=True)
    atomic.write_json_atomic(path / layout.IN_PROGRESS, {"format": layout.RUN_FORMAT, "system": "finetuned-wavlm"})
    return path


# --------------------------------------------------------------------------- the checkpoint's format


@pytest.mark.slow
def test_the_checkpoint_is_one_safetensors_file_and_resume_ends_exactly_as_without_a_stop(ft_config, tmp_path):
    cfg = ft_config
    whole = finetune_wavlm(replace(cfg, out=tmp_path / "uninterrupted"))
    out = interrupted_run(replace(cfg, out=tmp_path / "run"), after_epoch=2)
    assert not (out / LEGACY_CHECKPOINT).exists()
    from ser_cache.runs.checkpoint_file import CHECKPOINT_VERSION

    with safe_open(str(out / CHECKPOINT), framework="pt") as f:
        meta = f.metadata()
        names = set(f.keys())
    assert meta["format"] == CHECKPOINT_FORMAT and int(meta["format_version"]) == CHECKPOINT_VERSION
    tree = json.loads(meta["tree"])
    assert tree["epoch"] == 2 and len(tree["history"]) == 2
    assert any(n.startswith("model/wavlm.") for n in names) and any(n.startswith("optimizer/state/") for n in names)
    assert (out / f"best-epoch{tree['best']['epoch']:04d}.safetensors").is_file()

    resumed = finetune_wavlm(replace(cfg, out=out, resume=True))
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3] and resumed.best_epoch == whole.best_epoch
    a, b = load_file(str(whole.run_dir / layout.WEIGHTS)), load_file(str(out / layout.WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical
    assert (out / layout.DEV_PREDICTIONS).read_bytes() == (whole.run_dir / layout.DEV_PREDICTIONS).read_bytes()
    assert resumed.metrics == whole.metrics
    assert not (out / CHECKPOINT).exists() and layout.is_run_dir(out)


def test_plot_run_reads_an_unfinished_runs_checkpoint(ft_config, tmp_path):
    cfg = ft_config
    out = interrupted_run(replace(cfg, out=tmp_path / "run", epochs=2), after_epoch=1)
    r = invoke("plot", "run", out)
    assert r.exit_code == 0, r.output
    assert "1 epochs (in progress, best so far: epoch 1)" in r.output and (out / "curves.png").is_file()


def test_a_truncated_checkpoint_is_one_line_for_resume_and_plot(ft_config, tmp_path):
    cfg = ft_config
    out = interrupted_run(replace(cfg, out=tmp_path / "run"), after_epoch=1)
    path = out / CHECKPOINT
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    line = one_line_error(invoke(*cli_args(replace(cfg, out=out)), "--resume"))
    assert f"{path}: not a readable fine-tuning checkpoint" in line and "--overwrite" in line
    assert f"{path}: not a readable" in one_line_error(invoke("plot", "run", out))


def test_a_pickled_checkpoint_is_refused_unread_by_resume_and_plot(ft_config, tmp_path):
    cfg = ft_config
    out = unfinished_run_dir(tmp_path / "sent-to-me")
    marker = tmp_path / "code-ran"
    pickle_that_runs_code(out / LEGACY_CHECKPOINT, marker)

    line = one_line_error(invoke(*cli_args(replace(cfg, out=out)), "--resume"))
    assert f"{out / LEGACY_CHECKPOINT}: a pickled checkpoint" in line and "--overwrite" in line
    assert not marker.exists()
    line = one_line_error(invoke("plot", "run", out))
    assert f"{out / LEGACY_CHECKPOINT}: a pickled checkpoint" in line
    assert not marker.exists()
    # --overwrite starts the run again, as the message says (the pickle goes unread with the folder).
    r = invoke(*cli_args(replace(cfg, out=out, epochs=1)), "--overwrite")
    assert r.exit_code == 0, r.output[-3000:]
    assert not marker.exists() and not (out / LEGACY_CHECKPOINT).exists() and layout.is_run_dir(out)


def test_a_safetensors_checkpoint_that_does_not_hold_a_checkpoint_is_refused(tmp_path):
    from ser_cache.infra import statefile
    from ser_cache.runs.checkpoint_file import CHECKPOINT_VERSION, CheckpointError, read_checkpoint

    out = unfinished_run_dir(tmp_path / "run")
    path = out / CHECKPOINT
    # Model weights under the checkpoint's name: no format tag.
    rundir.write_weights(path, {"w": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="a safetensors file, but not a fine-tuning checkpoint"):
        read_checkpoint(out)
    # The format tag, but entries of the wrong type.
    statefile.save(path, {"epoch": "two", "history": "none"}, fmt=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION)
    with pytest.raises(CheckpointError, match=r'not a complete fine-tuning checkpoint \("epoch" must be int'):
        read_checkpoint(out)
    # A reference to a tensor the file does not hold.
    from safetensors.torch import save_file

    tree = {"epoch": 1, "model": {"w": {"__t": "tensor", "key": "absent"}}}
    save_file({"x": torch.zeros(1)}, str(path), metadata={"format": CHECKPOINT_FORMAT, "format_version": "1",
                                                          "tree": json.dumps(tree)})
    with pytest.raises(CheckpointError, match="does not decode"):
        read_checkpoint(out)
    # A newer format than this version reads.
    statefile.save(path, {}, fmt=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION + 1)
    with pytest.raises(CheckpointError, match="newer than this ser-cache reads"):
        read_checkpoint(out)
    r = invoke("plot", "run", out)
    assert "newer than this ser-cache reads" in one_line_error(r)


def test_the_state_file_keeps_every_type_it_is_given(tmp_path):
    import random

    import numpy as np

    from ser_cache.infra import statefile

    tree = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "by_int": {0: {"step": torch.tensor(3.0)}, 1: None}, "tuple": (0.9, 0.999), "nan": float("nan"),
            "inf": -float("inf"), "np_scalar": np.float64(0.1), "pred": np.random.rand(4, 3),
            "u32": np.arange(3, dtype=np.uint32),
            "tagged": {"__t": "looks like a tag"}, "empty": torch.zeros(0)}
    back = statefile.load(statefile.save(tmp_path / "s.safetensors", tree, fmt="t", version=1), fmt="t", version=1)
    assert back["python"] == tree["python"] and isinstance(back["python"], tuple)
    assert back["numpy"][0] == "MT19937" and np.array_equal(back["numpy"][1], tree["numpy"][1])
    assert back["numpy"][1].dtype == np.uint32 and back["numpy"][2:] == tree["numpy"][2:]
    assert torch.equal(back["torch"], tree["torch"]) and torch.equal(back["by_int"][0]["step"], torch.tensor(3.0))
    assert back["by_int"][1] is None and back["tuple"] == (0.9, 0.999) and np.isnan(back["nan"])
    assert back["inf"] == -float("inf") and type(back["np_scalar"]) is np.float64 and back["np_scalar"] == 0.1
    assert back["pred"].dtype == np.float64 and np.array_equal(back["pred"], tree["pred"])
    assert back["u32"].dtype == np.uint32 and back["tagged"] == tree["tagged"] and back["empty"].shape == (0,)
    with pytest.raises(TypeError, match="a RunsCode cannot be stored"):
        statefile.save(tmp_path / "x.safetensors", {"x": RunsCode(tmp_path / "m")}, fmt="t", version=1)


# --------------------------------------------------------------------------- one writer per run


WAIT_AFTER_FIRST_CHECKPOINT = """
import sys, time
from pathlib import Path
import ser_cache.finetune.loop as ft
ready = Path(sys.argv[1])
save = ft.save_checkpoint
def save_then_wait(*args, **kwargs):
    save(*args, **kwargs)
    ready.write_text("1")
    time.sleep(600)
ft.save_checkpoint = save_then_wait
from ser_cache.cli.app import main
sys.argv = ["ser-cache", *sys.argv[2:]]
main()
"""


@pytest.mark.slow
def test_a_run_being_fine_tuned_is_locked_against_a_second_process(ft_config, tmp_path):
    cfg = ft_config
    out = tmp_path / "run"
    script, ready = tmp_path / "wait.py", tmp_path / "ready"
    script.write_text(WAIT_AFTER_FIRST_CHECKPOINT)
    first = subprocess.Popen([sys.executable, str(script), str(ready), *cli_args(replace(cfg, out=out))],
                             env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not ready.exists():
            assert first.poll() is None, first.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "the first run never wrote a checkpoint"
            time.sleep(0.2)
        before = (out / CHECKPOINT).stat().st_mtime_ns
        for option in ("--resume", "--overwrite"):
            line = one_line_error(invoke(*cli_args(replace(cfg, out=out)), option))
            assert f"{out}: another process is training this run (pid {first.pid} on" in line, line
        assert (out / CHECKPOINT).stat().st_mtime_ns == before and layout.is_unfinished_run(out)
    finally:
        first.kill()  # SIGKILL: the kernel releases its lock
        first.wait()
    assert first.returncode == -signal.SIGKILL
    resumed = finetune_wavlm(replace(cfg, out=out, resume=True))
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert not lock_file(out).exists()  # taken over from the killed process, then removed


def test_a_lock_file_removed_by_its_holder_before_the_next_one_locks_it_is_not_shared(tmp_path, monkeypatch):
    from ser_cache.infra import locks

    target = tmp_path / "run"
    first = locks.FileLock(target)
    first.acquire()
    real, calls = locks._flock_waiting, []

    def first_releases_in_between(fd, kind):
        # The second process opened the file; the first removes it and unlocks before the second locks.
        if not calls:
            calls.append(1)
            first.release()
        real(fd, kind)

    monkeypatch.setattr(locks, "_flock_waiting", first_releases_in_between)
    second = locks.FileLock(target)
    second.acquire()
    monkeypatch.setattr(locks, "_flock_waiting", real)
    with pytest.raises(locks.Held, match=f"pid {os.getpid()}"):
        locks.FileLock(target).acquire()  # the second holds the file at the path, not a removed one
    second.release()
    assert not locks.lock_path(target).exists()


# --------------------------------------------------------------------------- stores leave no lock file


HOLD_STORE_LOCK = """
import sys, time
from pathlib import Path
from ser_cache.features.store_lock import StoreLock
StoreLock(Path(sys.argv[1])).acquire()
Path(sys.argv[2]).write_text("1")
time.sleep(600)
"""


def test_extract_leaves_no_lock_file_and_takes_over_one_left_by_a_killed_process(models, corpus, tmp_path):
    from ser_cache.features.extract import ExtractConfig, extract

    store = tmp_path / "f" / "whisper-tiny.zarr"
    script, ready = tmp_path / "hold.py", tmp_path / "ready"
    script.write_text(HOLD_STORE_LOCK)
    holder = subprocess.Popen([sys.executable, str(script), str(store), str(ready)], env=subprocess_env())
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert holder.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    holder.kill()
    holder.wait()
    assert lock_file(store).exists()  # what a kill -9 leaves: a file nobody locks

    cfg = ExtractConfig(model=str(models["whisper"]), data=corpus, out=tmp_path / "f", device="cpu", workers=0,
                        progress=False)
    result = extract(cfg)
    assert result.store == store and result.written == result.rows
    assert sorted(p.name for p in store.parent.iterdir()) == [store.name]  # no whisper-tiny.zarr.lock beside it


# --------------------------------------------------------------------------- model folders


def pickled_model_dir(path: Path, marker: Path) -> Path:
    """A WavLM folder whose weights are a pytorch_model.bin that torch's weights-only unpickler refuses.

    transformers now always saves safetensors (safe_serialization=False is gone), so the pickle is
    written by hand, as older tools wrote it, with an object in it that unpickling would call.
    """
    factories.tiny_wavlm(path)
    state = load_file(str(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    torch.save({**state, "extra": RunsCode(marker)}, path / "pytorch_model.bin")
    return path


def test_a_model_folder_with_a_refused_pickle_is_one_line(corpus, tmp_path):
    marker = tmp_path / "code-ran"
    model = pickled_model_dir(tmp_path / "old-wavlm", marker)
    expected = f"model '{model}' ({model}): its weights are a pickle (pytorch_model.bin)"
    line = one_line_error(invoke("extract", "--model", model, "--data", corpus, "--out", tmp_path / "f",
                                 "--device", "cpu", "--workers", 0, "--no-progress"))
    assert expected in line and "safetensors weights are needed" in line and "io.open" in line
    assert "add_safe_globals" not in line and "weights_only" not in line  # torch's advice to load it anyway
    cfg = base_config(corpus, model, tmp_path / "run", epochs=1)
    line = one_line_error(invoke(*cli_args(cfg)))
    assert expected in line and "safetensors weights are needed" in line
    assert not marker.exists()


def test_a_runs_encoder_with_a_refused_pickle_is_one_line(models, tmp_path):
    from ser_cache.runs.vox_profile import ImportConfig, import_vox_profile

    from vox_profile_checkpoints import authors_whisper_checkpoint

    src, _ = authors_whisper_checkpoint(tmp_path / "ckpt", models["whisper"])
    run = import_vox_profile(ImportConfig(source=str(src), out=tmp_path / "run",
                                          backbone=str(models["whisper"]))).run_dir
    (encoder,) = [p.parent for p in run.glob("*/model.safetensors")]  # the Whisper encoder the run carries
    state = load_file(str(encoder / "model.safetensors"))
    (encoder / "model.safetensors").unlink()
    marker = tmp_path / "code-ran"
    torch.save({**state, "extra": RunsCode(marker)}, encoder / "pytorch_model.bin")
    clip = factories.write_wav(tmp_path / "clip.wav", factories.tone(1.0))
    line = one_line_error(invoke("predict", run, clip, "--out", tmp_path / "p.csv", "--device", "cpu"))
    assert f"({encoder}): its weights are a pickle (pytorch_model.bin)" in line and "safetensors" in line
    assert not marker.exists()


def test_finetune_given_a_whisper_folder_says_it_needs_wavlm(models, corpus, tmp_path):
    cfg = base_config(corpus, models["whisper"], tmp_path / "run", epochs=1)
    line = one_line_error(invoke(*cli_args(cfg)))
    assert f"model '{models['whisper']}' holds a whisper model" in line and "fine-tunes a WavLM model" in line
    assert "lacks" not in line


# --------------------------------------------------------------------------- outputs name themselves


def test_a_failed_atomic_write_names_the_output_not_its_temporary_file(tmp_path):
    from ser_cache.infra.atomic import atomic_path

    target = tmp_path / "curves.png"
    with pytest.raises(PermissionError) as err:
        with atomic_path(target) as tmp:
            raise PermissionError(13, "Permission denied", str(tmp))
    assert err.value.filename == str(target)


def test_plot_run_where_the_figure_cannot_be_written_names_the_figure(tmp_path):
    run = make_run(tmp_path / "run")
    # Where the temporary file would go, something else is (what a read-only folder gives as root).
    (run / f".curves.png.tmp-{os.getpid()}").mkdir()
    line = one_line_error(invoke("plot", "run", run))
    assert line.startswith(f"error: {run / 'curves.png'}: ") and ".tmp-" not in line


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_plot_run_on_a_read_only_run_names_the_figure(tmp_path):
    run = make_run(tmp_path / "run")
    run.chmod(0o555)
    try:
        line = one_line_error(invoke("plot", "run", run))
    finally:
        run.chmod(0o755)
    assert line == f"error: {run / 'curves.png'}: Permission denied"
