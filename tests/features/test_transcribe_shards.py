"""`ser-cache transcribe --shard I/N`: the shares partition the plan, N shards (one killed and rerun,
or all started at once) write the table and error report one process writes, refusals, the CLI.

A fake transcriber stands in for Whisper: a row's text names its clip's length *and its batch*, so
a row transcribed in another batch than one process would give it shows (with Whisper, batch-mates
change the padding and so the rounding).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from ser_cache.cli.app import app
from ser_cache.data.transcripts import sidecar_path
from ser_cache.features.transcribe import TranscribeConfig, TranscribeError, report_path, transcribe
from ser_cache.features.transcribe_plan import pack
from ser_cache.features.transcribe_shards import shard_journal_path, unsharded_lock_target
from ser_cache.features.transcriber import WhisperTranscriber
from ser_cache.features.transcript_table import Journal, journal_path, read_table
from ser_cache.infra import locks
from ser_cache.infra.shards import Shard, lock_target

from factories import tone, write_wav

runner = CliRunner()
FORK = multiprocessing.get_context("fork")


class BatchTranscriber:
    """Each clip's text: its length and the lengths of its whole batch; `delay` slows each batch."""

    def __init__(self, delay: float = 0.0, beams: int = 1):
        self.delay, self.beams = delay, beams
        self.batches: list[list[int]] = []

    def settings(self, max_seconds: float) -> dict:
        return {"model_id": "batch-lengths", "revision": "0", "language": None, "beams": self.beams,
                "max_new_tokens": 1, "max_seconds": max_seconds, "precision": "fp32", "timestamps": False}

    def transcribe(self, waves):
        time.sleep(self.delay)
        sizes = [len(w) for w in waves]
        self.batches.append(sizes)
        return [f"{n} samples, batch {'+'.join(map(str, sizes))}" for n in sizes]


def make_audio(root: Path, n: int, *, broken: bool = True) -> list[Path]:
    """`n` clips of 0.3-1.5 s; with `broken`, one that has no readable header and one whose samples
    are NaN (its header reads fine: it fails when its batch is decoded)."""
    rng = np.random.default_rng(n)
    files = [write_wav(root / f"u{i:03d}.wav", tone(float(rng.uniform(0.3, 1.5)), seed=i)) for i in range(n)]
    if broken:
        bad = root / "u900.wav"
        bad.write_bytes(b"RIFF....WAVEnot really audio")
        nan = root / "u901.wav"
        x = tone(0.8, seed=99)
        x[100] = np.nan
        sf.write(str(nan), x, 16_000, subtype="FLOAT")
        files += [bad, nan]
    return files


def config(files, out: Path, shard: Shard | None = None, **kw) -> TranscribeConfig:
    return TranscribeConfig(out=out, model="unused", files=tuple(files), batch_seconds=2.0, progress=False,
                            shard=shard, **kw)


def reference(files, tmp_path: Path) -> tuple[bytes, bytes | None]:
    """The table and error report one uninterrupted process writes."""
    out = tmp_path / "ref" / "asr.csv"
    out.parent.mkdir()
    transcribe(config(files, out), transcriber=BatchTranscriber())
    report = report_path(out)
    return out.read_bytes(), report.read_bytes() if report.is_file() else None


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.endswith((".partial", ".lock")))


# --------------------------------------------------------------------------- the plan's shares


@pytest.mark.parametrize("n_utts", [1, 7, 23, 61])
def test_each_utterance_is_in_exactly_one_shards_batches(n_utts):
    rng = np.random.default_rng(n_utts)
    seconds = {f"u{i:03d}": float(x) for i, x in enumerate(rng.uniform(0.3, 30, n_utts))}
    plan = pack(seconds, 45.0)
    for count in range(1, 8):
        taken = [i for k in range(count) for b in Shard(k, count).share(plan) for i in b]
        assert sorted(taken) == sorted(seconds), count


def test_shards_of_every_count_transcribe_each_row_once(tmp_path, monkeypatch):
    files = make_audio(tmp_path / "audio", 13, broken=False)
    table = reference(files, tmp_path)[0]
    n_batches = len(pack({f.name: sf.info(str(f)).duration for f in files}, 2.0))
    assert n_batches > 4
    journaled: dict[str, list[str]] = {}
    original = Journal.append

    def spy(self, rows):
        journaled.setdefault(self.path.name, []).extend(i for i, _ in rows)
        original(self, rows)

    monkeypatch.setattr(Journal, "append", spy)
    for count in range(1, 8):
        out = tmp_path / f"n{count}" / "asr.csv"
        journaled.clear()
        results = [transcribe(config(files, out, Shard(k, count)), transcriber=BatchTranscriber())
                   for k in range(count)]
        ids = [i for rows in journaled.values() for i in rows]
        assert sorted(ids) == sorted(f.name for f in files)  # each row once, by one shard
        assert len(journaled) == min(count, n_batches)  # a shard whose share is empty writes no journal
        assert [r.complete for r in results] == [False] * (count - 1) + [True]
        assert sum(r.transcribed for r in results) == 13
        assert out.read_bytes() == table, count
        assert leftovers(out) == []


# --------------------------------------------------------------------------- one after another, one killed


def _killed_run(files, out: Path, shard: Shard | None, cut: int = 4) -> None:
    """Runs in a forked child: transcribes its first batch, leaves the journal's last record cut
    (`cut` bytes short: a kill in the middle of the append), and dies by SIGKILL."""

    original = Journal.append

    def append(self, rows):
        original(self, rows)
        with open(self.path, "r+b") as f:
            f.truncate(f.seek(0, os.SEEK_END) - cut)
        os.kill(os.getpid(), signal.SIGKILL)

    Journal.append = append  # in the child only
    transcribe(config(files, out, shard), transcriber=BatchTranscriber())


@pytest.mark.slow
def test_three_shards_one_killed_and_rerun_write_what_one_process_writes(tmp_path):
    files = make_audio(tmp_path / "audio", 21)
    table, report = reference(files, tmp_path)
    out = tmp_path / "asr.csv"

    child = FORK.Process(target=_killed_run, args=(files, out, Shard(1, 3)))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    journal = shard_journal_path(out, Shard(1, 3))
    assert journal.is_file() and not journal.read_bytes().endswith(b"\n")  # a record cut short
    assert json.loads(sidecar_path(out).read_text())["complete"] is False

    first = transcribe(config(files, out, Shard(0, 3)), transcriber=BatchTranscriber())
    assert not first.complete and first.transcribed > 0 and not out.exists()
    assert set(first.pending_by_shard) == {"1/3", "2/3"}

    fake = BatchTranscriber()
    again = transcribe(config(files, out, Shard(1, 3)), transcriber=fake)
    # The batch cut by the kill is transcribed whole (its rows' texts depend on it), only its lost row is new.
    assert again.skipped > 0 and not again.complete and list(again.pending_by_shard) == ["2/3"]
    assert sum(len(b) for b in fake.batches) > again.transcribed

    last = transcribe(config(files, out, Shard(2, 3)), transcriber=BatchTranscriber())
    assert last.complete and last.pending_by_shard == {} and last.failed == 2 and last.rows == 21
    assert out.read_bytes() == table
    assert report_path(out).read_bytes() == report
    side = json.loads(sidecar_path(out).read_text())
    assert side["complete"] and side["rows"] == 21 and side["failed"] == 2
    assert side["settings"] == BatchTranscriber().settings(30.0)
    assert leftovers(out) == []

    # Reruns after completion, of any shard, do nothing (the failures stay failures).
    stamp = out.stat().st_mtime_ns, sidecar_path(out).stat().st_mtime_ns
    for k in range(3):
        fake = BatchTranscriber()
        r = transcribe(config(files, out, Shard(k, 3)), transcriber=fake)
        assert r.complete and r.transcribed == 0 and fake.batches == [] and r.failed == 2
    assert (out.stat().st_mtime_ns, sidecar_path(out).stat().st_mtime_ns) == stamp

    # Utterances added later: a new round, whose shards add only them.
    more = files + [write_wav(tmp_path / "audio" / "u950.wav", tone(0.7, seed=50))]
    results = [transcribe(config(more, out, Shard(k, 3)), transcriber=BatchTranscriber()) for k in range(3)]
    assert sum(r.transcribed for r in results) == 1 and results[-1].complete
    assert "u950.wav" in read_table(out) and len(read_table(out)) == 22


def test_shards_take_over_from_a_killed_run_without_shard(tmp_path):
    files = make_audio(tmp_path / "audio", 15)
    table, report = reference(files, tmp_path)
    out = tmp_path / "asr.csv"
    child = FORK.Process(target=_killed_run, args=(files, out, None, 0))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    done = Journal(journal_path(out)).read()
    assert 0 < len(done) < 15
    results = [transcribe(config(files, out, Shard(k, 2)), transcriber=BatchTranscriber()) for k in range(2)]
    assert sum(r.transcribed for r in results) == 15 - len(done)  # the journal's rows count as done
    assert results[-1].complete and out.read_bytes() == table and report_path(out).read_bytes() == report
    assert leftovers(out) == []


# --------------------------------------------------------------------------- all at once


def _racing_shard(files, out, shard, barrier, results):
    barrier.wait()
    start = time.monotonic()
    r = transcribe(config(files, out, shard), transcriber=BatchTranscriber(delay=0.05))
    results.put((shard.label, r.transcribed, r.complete, start, time.monotonic()))


@pytest.mark.slow
def test_four_shards_started_at_once_agree_on_one_sidecar_and_write_the_table(tmp_path):
    files = make_audio(tmp_path / "audio", 31)
    table, report = reference(files, tmp_path)
    out = tmp_path / "asr.csv"
    barrier, results = FORK.Barrier(4), FORK.Queue()
    procs = [FORK.Process(target=_racing_shard, args=(files, out, Shard(k, 4), barrier, results)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 4
    got = [results.get(timeout=5) for _ in procs]
    assert max(start for *_, start, _ in got) < min(end for *_, end in got)  # all four ran at once
    assert sum(n for _, n, *_ in got) == 31 and any(done for _, _, done, *_ in got)
    assert out.read_bytes() == table and report_path(out).read_bytes() == report
    side = json.loads(sidecar_path(out).read_text())
    assert side["complete"] and side["rows"] == 31 and side["settings"] == BatchTranscriber().settings(30.0)
    assert leftovers(out) == []


# --------------------------------------------------------------------------- refusals


def test_a_second_copy_of_a_shard_and_mixing_with_an_unsharded_run_are_refused(tmp_path):
    files = make_audio(tmp_path / "audio", 9, broken=False)
    out = tmp_path / "asr.csv"
    with locks.FileLock(lock_target(out, Shard(1, 3))):  # shard 1/3 runs elsewhere
        with pytest.raises(TranscribeError, match=r"--shard 1/3 of .*asr.csv is already running \(pid \d+"):
            transcribe(config(files, out, Shard(1, 3)), transcriber=BatchTranscriber())
        with pytest.raises(TranscribeError, match=r"shard 1/3 \(pid \d+.*\) of a sharded transcribe is running"):
            transcribe(config(files, out), transcriber=BatchTranscriber())
    with locks.FileLock(unsharded_lock_target(out)):  # a run without --shard
        with pytest.raises(TranscribeError, match="a transcribe without --shard is writing it"):
            transcribe(config(files, out, Shard(0, 3)), transcriber=BatchTranscriber())
        with pytest.raises(TranscribeError, match=r"another transcribe of .* \(without --shard\) is running"):
            transcribe(config(files, out), transcriber=BatchTranscriber())

    transcribe(config(files, out, Shard(0, 3)), transcriber=BatchTranscriber())
    # Shard journals left: a run without --shard would make other batches; refused, or --overwrite.
    with pytest.raises(TranscribeError, match=r"sharded transcribe has not finished \(asr.csv.shard-0-of-3.partial"):
        transcribe(config(files, out), transcriber=BatchTranscriber())
    with pytest.raises(TranscribeError, match=r"other settings \(beams 1 → 2\): every shard needs the same"):
        transcribe(config(files, out, Shard(1, 3)), transcriber=BatchTranscriber(beams=2))
    with pytest.raises(TranscribeError, match="--overwrite with --shard 1/3"):
        transcribe(config(files, out, Shard(1, 3), overwrite=True), transcriber=BatchTranscriber())
    r = transcribe(config(files, out, overwrite=True), transcriber=BatchTranscriber())
    assert r.transcribed == 9 and r.complete and r.shard is None and leftovers(out) == []


def test_a_shard_journal_without_its_sidecar_is_refused(tmp_path):
    files = make_audio(tmp_path / "audio", 3, broken=False)
    out = tmp_path / "asr.csv"
    shard_journal_path(out, Shard(2, 4)).write_text("FileName,text\nu000.wav,hello\n")
    with pytest.raises(TranscribeError, match="asr.csv.shard-2-of-4.partial exists without its settings file"):
        transcribe(config(files, out, Shard(0, 4)), transcriber=BatchTranscriber())


# --------------------------------------------------------------------------- the command


@pytest.fixture
def fake_whisper(monkeypatch):
    monkeypatch.setattr(WhisperTranscriber, "load", classmethod(lambda cls, *a, **k: BatchTranscriber()))


def test_cli_shard_and_slurm(tmp_path, fake_whisper):
    files = [str(f) for f in make_audio(tmp_path / "audio", 11)]
    out = tmp_path / "asr.csv"
    base = ["transcribe", *files, "--out", str(out), "--batch-seconds", "2", "--no-progress"]
    r = runner.invoke(app, [*base, "--shard", "0/2"])
    assert r.exit_code == 0, r.output
    assert "asr.csv, shard 0/2:" in r.output and "transcribed" in r.output
    assert "the table is not written yet: shard(s) 1/2 (" in r.output and not out.exists()
    slurm = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "2"}
    r = runner.invoke(app, [*base, "--shard", "slurm"], env=slurm)
    assert r.exit_code == 0, r.output
    assert "shard 1/2:" in r.output and "the table is complete: 11 rows" in r.output and "asr.errors.csv" in r.output
    r = runner.invoke(app, [*base, "--shard", "1/2"])
    assert r.exit_code == 0 and "0 transcribed" in r.output and "nothing to do" in r.output, r.output
    r = runner.invoke(app, [*base, "--shard", "2/2"])
    assert r.exit_code == 2 and "--shard 2/2: expected I from 0 to 1" in r.output
    r = runner.invoke(app, [*base, "--shard", "slurm"], env={"SLURM_ARRAY_TASK_ID": ""})
    assert r.exit_code == 2 and "SLURM_ARRAY_TASK_ID is not set" in r.output
