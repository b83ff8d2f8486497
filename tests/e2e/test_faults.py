"""Faults and bad options: never a traceback (unless it is a bug), a silent success or a process left behind."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ser_cache.cli.app import INTERRUPTED, app
from ser_cache.features.store import FeatureStore
from ser_cache.version import __version__

from factories import msp_corpus
from processes import ENDS_WITHIN, ended_within, start_blocked
from synthetic import make_corpus, make_store

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


# --------------------------------------------------------------------------- processes

# The scripts that processes.start_blocked runs, beside its stand-ins that block (processes.SLOW).
EXTRACT = '''
import faulthandler, signal, sys
if __name__ == "__main__":  # spawned workers import this file again
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the stacks, should the test find it stuck
    sys.path.insert(0, sys.argv.pop(1))
    import slow
    from ser_cache.data import audio
    audio.load_many = slow.load_many
    from ser_cache.cli.app import main
    sys.argv = ["ser-cache", *sys.argv[1:]]
    main()
'''

FINETUNE_LOADER = '''
import sys, time
if __name__ == "__main__":
    sys.path.insert(0, sys.argv[1])
    import slow
    from ser_cache.data import batching
    batching.AudioRows = slow.Rows
    loader, plan = batching.audio_loader(["a.wav", "b.wav"], 15.0, 1)
    plan.batches = [[0], [1]]
    next(iter(loader))
'''


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time) of a process, None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[1]), fields[0], int(fields[19])


def _descendants(root: int) -> dict[int, int]:
    """{pid: start time} of every process below `root`."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (s := _stat(int(entry.name))):
            children.setdefault(s[0], []).append(int(entry.name))
    found, todo = {}, [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            if (s := _stat(pid)) is not None:
                found[pid] = s[2]
                todo.append(pid)
    return found


def _alive(procs: dict[int, int]) -> dict[int, str]:
    """The processes of `procs` still running (a zombie waiting for init to reap it has ended)."""
    alive = {}
    for pid, start in procs.items():
        s = _stat(pid)
        if s is not None and s[2] == start and s[1] != "Z":
            alive[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
    return alive


def _killed_leaves_nothing(proc: subprocess.Popen, marker: Path) -> None:
    workers = _descendants(proc.pid)
    assert int(marker.read_text()) in workers  # the decoding worker is below the killed process
    try:
        proc.kill()  # SIGKILL: no clean-up runs in the parent
        proc.wait(timeout=10)
        deadline = time.monotonic() + 5
        while _alive(workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(workers), f"left behind: {_alive(workers)}"
    finally:
        for pid in _alive(workers):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.slow
def test_extract_killed_with_sigkill_leaves_no_worker_or_resource_tracker(models, tmp_path):
    corpus = msp_corpus(tmp_path / "corpus", n=4, unlabeled=0)
    proc, marker = start_blocked(tmp_path, EXTRACT,
                                 ["extract", "--model", str(models["whisper"]), "--data", str(corpus),
                                                     "--out", str(tmp_path / "f"), "--device", "cpu", "--workers", "1",
                                                     "--no-progress"])
    _killed_leaves_nothing(proc, marker)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.slow
def test_finetune_loader_killed_with_sigkill_leaves_no_worker(tmp_path):
    proc, marker = start_blocked(tmp_path, FINETUNE_LOADER, [])
    _killed_leaves_nothing(proc, marker)


@pytest.mark.slow
def test_ctrl_c_during_extract_is_one_line_and_exit_130(models, tmp_path):
    corpus = msp_corpus(tmp_path / "corpus", n=4, unlabeled=0)
    proc, _ = start_blocked(tmp_path, EXTRACT, ["extract", "--model", str(models["whisper"]), "--data", str(corpus),
                                                "--out", str(tmp_path / "f"), "--device", "cpu", "--workers", "1",
                                                "--no-progress"])
    os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C in a terminal: the parent and its workers
    # About 2 s to stop the worker, then the interpreter's exit (9 s seen on a loaded 2-core machine);
    # the worker blocks for 600 s, so a Ctrl-C held until it finishes still fails this.
    output = ended_within(proc, ENDS_WITHIN)
    assert proc.returncode == 130
    assert output.strip() == INTERRUPTED, output

    # The store is left resumable: the same command again finishes it, equal to an uninterrupted run.
    args = ["--model", str(models["whisper"]), "--data", str(corpus), "--device", "cpu", "--workers", "0",
            "--no-progress"]
    assert invoke("extract", *args, "--out", tmp_path / "f").exit_code == 0
    assert invoke("extract", *args, "--out", tmp_path / "ref").exit_code == 0
    again, ref = (FeatureStore.open(next((tmp_path / d).glob("*.zarr"))) for d in ("f", "ref"))
    for x, y in zip(again.read(), ref.read()):
        np.testing.assert_array_equal(x, y)


# --------------------------------------------------------------------------- the central handler


def test_an_internal_error_says_it_is_a_bug_then_shows_the_traceback(monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr("ser_cache.runs.ensemble.ensemble", broken)
    r = invoke("ensemble", tmp_path / "a.csv", tmp_path / "b.csv", "--out", tmp_path / "c.csv")
    assert r.exit_code == 1
    first = r.output.splitlines()[0]
    assert first == (f"internal error: ZeroDivisionError: division by zero — this is a bug in ser-cache {__version__}; "
                     "please report it at the project's issue tracker with the traceback below")
    assert "Traceback (most recent call last)" in r.output.split(first, 1)[1]


def test_failures_outside_the_library_call_go_through_the_same_place(monkeypatch, tmp_path):
    """Work a command does before or after `guarded` (here: setting up its logging) is covered too."""
    for raised, code, line in [
        (KeyboardInterrupt(), 130, INTERRUPTED),
        (PermissionError(errno.EACCES, "Permission denied", "/data/x.csv"), 2, "error: /data/x.csv: Permission denied"),
        (OSError(errno.ENOSPC, "No space left on device", "/data/x.csv"), 2,
         "error: no space left on device writing /data/x.csv; nothing written before was lost; free space and rerun "
         "to continue"),
    ]:
        def boom():
            raise raised  # noqa: B023 (boom is called in this iteration only)

        monkeypatch.setattr("ser_cache.cli.stage_two.log_to_stderr", boom)
        r = invoke("predict", tmp_path / "run", "--data", tmp_path / "corpus", "--split", "Test1", "--out",
                   tmp_path / "p.csv")
        assert (r.exit_code, r.output.strip()) == (code, line)


def test_a_known_error_stays_one_line(tmp_path):
    r = invoke("evaluate", tmp_path / "no-run", "--data", tmp_path, "--split", "Test1")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and r.output.startswith("error:")
    assert "Traceback" not in r.output


# --------------------------------------------------------------------------- disk full

ENOSPC = OSError(errno.ENOSPC, "No space left on device")  # as a write() raises it: no file name


def test_disk_full_during_extract_names_the_store_and_keeps_what_was_written(models, tmp_path, monkeypatch):
    corpus = msp_corpus(tmp_path / "corpus", n=8, unlabeled=0)
    calls = {"n": 0}
    original = FeatureStore.write_chunk

    def fill_disk_on_second(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise ENOSPC
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FeatureStore, "write_chunk", fill_disk_on_second)
    r = invoke("extract", "--model", models["whisper"], "--data", corpus, "--out", tmp_path / "f", "--device", "cpu",
               "--workers", 0, "--chunk-rows", 4, "--no-progress")
    store = tmp_path / "f" / "whisper-tiny.zarr"
    assert r.exit_code == 2
    assert r.output.strip().splitlines()[-1] == (f"error: no space left on device writing {store}; nothing written "
                                                 "before was lost; "
                                "free space and rerun to continue")
    assert FeatureStore.open(store).flags()[0].sum() == 4  # the first chunk stays


def test_disk_full_while_train_heads_saves_names_the_file(tmp_path, monkeypatch):
    import safetensors
    import safetensors.torch

    def full(*args, **kwargs):
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    manifest, ids, feats = make_corpus(tmp_path / "corpus", 60)
    store = make_store(tmp_path / "f" / "audio.zarr", ids, feats["audio"])
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    r = invoke("train-heads", "--features", store, "--data", manifest, "--out", tmp_path / "run", "--epochs", 1,
               "--device", "cpu", "--threads", 1, "--no-progress")
    assert r.exit_code == 2, r.output
    line = r.output.strip().splitlines()[-1]
    # The run is built in a folder beside --out and renamed when complete: the weights were being written there.
    # The run asked for (--out), not the staging folder the weights were being written into.
    assert line.startswith(f"error: no space left on device writing {tmp_path / 'run'};"), line
    assert line.endswith("; nothing written before was lost; free space and rerun to continue")
    assert "Traceback" not in r.output


# --------------------------------------------------------------------------- outputs that cannot be written


def test_an_output_that_cannot_be_written_fails_before_any_work(tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    cases = [
        (["extract", "--model", "no-such-model", "--data", tmp_path, "--out", a_file / "f"],
         f"--out {a_file / 'f'}: cannot write there ({a_file} is a file, not a folder)"),
        (["train-heads", "--features", tmp_path / "x.zarr", "--data", tmp_path, "--out", "/proc/ser-cache-run"],
         "--out /proc/ser-cache-run: cannot write there (cannot create a file in /proc: "),
        (["predict", tmp_path / "no-run", "--data", tmp_path, "--split", "Test1", "--out", tmp_path],
         f"--out {tmp_path}: cannot write there (it is a folder; expected a file name)"),
        (["evaluate", a_file / "run", "--data", tmp_path, "--split", "Test1"],
         f"--out {a_file / 'run' / 'eval_Test1.json'}: cannot write there ({a_file} is a file, not a folder)"),
        (["export", tmp_path / "x.zarr", "--out", a_file / "x.h5"], f"--out {a_file / 'x.h5'}: cannot write there"),
        (["ensemble", tmp_path / "a.csv", tmp_path / "b.csv", "--out", a_file / "e.csv"],
         f"--out {a_file / 'e.csv'}: cannot write there"),
        (["demo", "--workdir", a_file / "demo"], f"--workdir {a_file / 'demo'}: cannot write there"),
        (["finetune", "wavlm", "--data", tmp_path, "--out", a_file / "ft"],
         f"--out {a_file / 'ft'}: cannot write there"),
        (["transcribe", "--data", tmp_path, "--out", a_file / "asr.csv"],
         f"--out {a_file / 'asr.csv'}: cannot write there"),
    ]
    for args, expected in cases:
        r = invoke(*args)
        assert r.exit_code == 2, (args, r.output)
        assert r.output.startswith(f"error: {expected}"), (args, r.output)
        assert len(r.output.strip().splitlines()) == 1, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]  # the checks leave nothing behind


# --------------------------------------------------------------------------- runs that write nothing


def test_extract_that_writes_no_row_exits_1(models, corpus, tmp_path):
    r = invoke("extract", "--model", models["whisper"], "--data", corpus, "--out", tmp_path / "f", "--device", "cpu",
               "--workers", 0, "--max-seconds", 0.01, "--no-progress")
    store = tmp_path / "f" / "whisper-tiny.zarr"
    assert r.exit_code == 1
    assert r.output.strip().splitlines()[-1] == (f"error: nothing was written: all 14 row(s) of {store} failed; the "
                                                 f"reasons are in {tmp_path / 'f' / 'whisper-tiny.errors.csv'}")
    assert (tmp_path / "f" / "whisper-tiny.errors.csv").is_file()


@pytest.mark.parametrize("kind", ["text", "xvector"])
def test_a_kind_the_model_is_not_is_refused_before_loading(models, corpus, tmp_path, kind):
    r = invoke("extract", "--model", models["whisper"], "--data", corpus, "--out", tmp_path / "f", "--device", "cpu",
               "--kind", kind, "--no-progress")
    assert r.exit_code == 2
    assert r.output.strip().splitlines()[-1] == (f"error: --kind {kind}: model '{models['whisper']}' is a whisper "
                                                 "model "
                                "(WhisperForConditionalGeneration), an encoder of kind whisper; leave --kind out "
                                "(it is detected) or pass --kind whisper")
    assert not (tmp_path / "f").exists()


def test_an_audio_kind_on_a_text_model_is_refused(models, tmp_path):
    from ser_cache.encoders import EncoderError, load_encoder

    model = tmp_path / "text-model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "bert", "architectures": ["BertModel"]}')
    with pytest.raises(EncoderError,
                       match=r"--kind wavlm: model '.*' is a bert model \(BertModel\), an encoder of kind text"):
        load_encoder(str(model), kind="wavlm", device="cpu")
    load_encoder(str(models["xvector"]), kind="wavlm", device="cpu")  # an x-vector checkpoint holds a whole WavLM


# --------------------------------------------------------------------------- wording and refusals


def test_ensemble_refuses_to_overwrite_its_own_input(tmp_path):
    member = tmp_path / "a.csv"
    member.write_text("FileName,EmoAct,EmoVal,EmoDom\nx.wav,4,4,4\ny.wav,3,3,3\n")
    before = member.read_text()
    r = invoke("ensemble", member, member, "--out", member)
    assert r.exit_code == 2
    assert r.output.strip() == (f"error: --out {member}: is also an input (the member {member}); writing it would "
                                "destroy that input; choose another --out")
    assert member.read_text() == before


def test_on_error_fail_names_the_report_file_that_exists(models, corpus, tmp_path):
    bad = sorted((corpus / "Audios").iterdir())[0]
    bad.write_bytes(b"not a wav file")
    r = invoke("extract", "--model", models["whisper"], "--data", corpus, "--out", tmp_path / "f", "--device", "cpu",
               "--workers", 0, "--on-error", "fail", "--no-progress")
    assert r.exit_code == 2
    named = Path(r.output.split("the failure is listed in ", 1)[1].split(")")[0].replace("\n", ""))
    assert named.is_file() and bad.name in named.read_text()


def test_a_bad_train_or_dev_split_is_reported_under_its_own_option(tmp_path):
    manifest, ids, feats = make_corpus(tmp_path / "corpus", 40)
    store = make_store(tmp_path / "f" / "audio.zarr", ids, feats["audio"])
    for option in ("--train-split", "--dev-split"):
        r = invoke("train-heads", "--features", store, "--data", manifest, "--out", tmp_path / "run", option, "Nope",
                   "--device", "cpu", "--no-progress")
        assert r.exit_code == 2
        assert r.output.startswith(f"error: {option} Nope: not a split of {manifest}"), r.output
