"""`ser-cache transcribe`: which rows, the table and its sidecar, resume after kill -9, refusals, errors.

The model is a tiny random Whisper with a real (tiny) byte-level BPE tokenizer and, in one
variant, Whisper's language and task tokens; generation is limited to lower-case letters so that
its text differs from clip to clip.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ser_cache.cli.app import app
from ser_cache.features import transcriber
from ser_cache.features.transcribe import TranscribeConfig, TranscribeError, transcribe
from ser_cache.features.transcribe_plan import MAX_BATCH, pack
from ser_cache.features.transcriber import WhisperTranscriber
from ser_cache.features.transcript_table import Journal

from factories import msp_corpus, tone, whisper_asr, write_wav

runner = CliRunner()
SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture(scope="module")
def asr(tmp_path_factory) -> Path:
    return whisper_asr(tmp_path_factory.mktemp("asr") / "whisper-asr")


@pytest.fixture
def data(tmp_path) -> Path:
    """6 labelled turns (one without its transcript) and 3 Test3 turns (no transcripts)."""
    d = msp_corpus(tmp_path / "c", n=6, unlabeled=3)
    for name in ("MSP-PODCAST_test3_0001", "MSP-PODCAST_test3_0002", "MSP-PODCAST_test3_0003",
                 "MSP-PODCAST_1000_0002"):
        (d / "Transcripts" / f"{name}.txt").unlink()
    return d


UNTRANSCRIBED = ["MSP-PODCAST_1000_0002.wav", "MSP-PODCAST_test3_0001.wav", "MSP-PODCAST_test3_0002.wav",
                 "MSP-PODCAST_test3_0003.wav"]


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def table(path: Path) -> dict[str, str]:
    rows = read_csv(path)
    assert rows[0] == ["FileName", "text"]
    return {r[0]: r[1] for r in rows[1:]}


def cfg(asr, data, out, **kw) -> TranscribeConfig:
    return TranscribeConfig(out=out, model=str(asr), data=data, device="cpu", progress=False, **kw)


class LengthTranscriber:
    """Stands in for Whisper: each clip's 'text' is its number of samples, so a row that got
    another row's audio shows."""

    def __init__(self):
        self.calls: list[int] = []

    def settings(self, max_seconds: float) -> dict:
        return {"model_id": "lengths", "revision": "0", "language": None, "beams": 1, "max_new_tokens": 1,
                "max_seconds": max_seconds, "precision": "fp32", "timestamps": False}

    def transcribe(self, waves):
        self.calls.append(len(waves))
        return [f"{len(w)} samples" for w in waves]


# --------------------------------------------------------------------------- which rows, the files written


def test_transcribes_exactly_the_rows_without_a_transcript(asr, data, tmp_path, one_torch_thread):
    r = transcribe(cfg(asr, data, tmp_path / "asr.csv"))
    rows = table(tmp_path / "asr.csv")
    assert sorted(rows) == UNTRANSCRIBED  # sorted by FileName, the id with its extension
    assert all(rows[i].strip() for i in rows) and len(set(rows.values())) > 1
    assert (r.transcribed, r.skipped, r.failed, r.have_transcript, r.rows) == (4, 0, 0, 5, 4)
    assert r.audio_seconds > 0 and r.utterances_per_second > 0 and r.real_time_factor > 0
    side = json.loads((tmp_path / "asr.csv.json").read_text())
    s = side["settings"]
    assert s["model_id"] == str(asr.resolve()) and s["revision"].startswith("sha256:")
    assert (s["beams"], s["language"], s["precision"], s["timestamps"]) == (1, "en", "fp32", False)
    assert side["complete"] and side["rows"] == 4 and side["created"]
    assert not (tmp_path / "asr.csv.partial").exists() and not (tmp_path / "asr.errors.csv").exists()

    every = transcribe(cfg(asr, data, tmp_path / "all.csv", all=True))
    assert every.transcribed == 9 and every.have_transcript == 0
    assert len(table(tmp_path / "all.csv")) == 9
    # Batches do not change a row's text: the 4 rows come out the same among 9.
    assert {i: t for i, t in table(tmp_path / "all.csv").items() if i in rows} == rows


def test_cli_split_summary_and_a_rerun_that_has_nothing_left(asr, data, tmp_path, one_torch_thread):
    args = ["transcribe", "--model", str(asr), "--data", str(data), "--split", "Test3", "--out",
            str(tmp_path / "asr.csv"), "--device", "cpu", "--no-progress"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "3 transcribed, 0 skipped as already done, 0 failed" in r.output
    assert "utt/s" in r.output and "real-time factor" in r.output
    assert sorted(table(tmp_path / "asr.csv")) == UNTRANSCRIBED[1:]
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "0 transcribed, 3 skipped as already done" in again.output
    assert "nothing to do" in again.output and "utt/s" not in again.output  # not "0.00 utt/s"
    no_input = runner.invoke(app, ["transcribe", "--out", str(tmp_path / "x.csv")])
    assert no_input.exit_code == 2 and "give --data" in no_input.output


def test_each_row_gets_its_own_audio_cropped_to_30_s(data, tmp_path):
    write_wav(data / "Audios" / "MSP-PODCAST_test3_0004.wav", tone(31.0))  # longer than Whisper's window
    fake = LengthTranscriber()
    r = transcribe(cfg("unused", data, tmp_path / "asr.csv", all=True, batch_seconds=5.0), transcriber=fake)
    assert len(fake.calls) > 2 and max(fake.calls) < 10  # several batches
    rows = table(tmp_path / "asr.csv")
    import soundfile as sf

    for uid, text in rows.items():
        frames = sf.info(str(data / "Audios" / uid)).frames
        assert text == f"{min(frames, 30 * 16_000)} samples", uid
    assert r.transcribed == 10


def test_bare_files(asr, tmp_path, one_torch_thread):
    a = write_wav(tmp_path / "x" / "one.wav", tone(1.5))
    b = write_wav(tmp_path / "y" / "two.flac", tone(2.0, seed=1))
    (tmp_path / "x" / "one.txt").write_text("a transcript beside the file does not count for bare files\n")
    r = runner.invoke(app, ["transcribe", str(a), str(b), "--model", str(asr), "--out", str(tmp_path / "t.csv"),
                            "--device", "cpu", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert sorted(table(tmp_path / "t.csv")) == ["one.wav", "two.flac"]
    c = write_wav(tmp_path / "z" / "one.wav", tone(1.0))
    with pytest.raises(TranscribeError, match="share the file name one.wav"):
        transcribe(TranscribeConfig(out=tmp_path / "u.csv", model=str(asr), files=(a, c), device="cpu"))


# --------------------------------------------------------------------------- resume and refusals


@pytest.mark.slow
def test_resume_after_kill_9_redoes_no_finished_row(asr, data, tmp_path, monkeypatch, one_torch_thread):
    out = tmp_path / "asr.csv"
    args = ["transcribe", "--model", str(asr), "--data", str(data), "--all", "--out", str(out),
            "--batch-seconds", "4", "--device", "cpu", "--no-progress"]
    killer = tmp_path / "killer.py"
    killer.write_text(textwrap.dedent(f"""
        import os, signal, sys
        from ser_cache.features import transcript_table
        original = transcript_table.Journal.append
        def append(self, rows):
            original(self, rows)
            with open(self.path, "a") as f:
                f.write("MSP-PODCAST_1000_0003.wav,half a li")  # a record cut short by the kill
            os.kill(os.getpid(), signal.SIGKILL)  # right after the first batch reached the disk
        transcript_table.Journal.append = append
        from ser_cache.cli.app import main
        sys.argv = ["ser-cache", *{args!r}]
        main()
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    p = subprocess.run([sys.executable, str(killer)], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr
    journal = tmp_path / "asr.csv.partial"
    assert not out.exists() and journal.is_file()
    first = {r[0] for r in read_csv(journal)[1:-1]}  # the last line is the cut record
    assert 0 < len(first) < 9

    # Other settings are refused, naming the difference, and the journal is kept.
    r = runner.invoke(app, [*args, "--beams", "2"])
    assert r.exit_code == 2 and "beams 1 → 2" in r.output and "--overwrite" in r.output
    assert journal.is_file()

    appended: list[str] = []
    original = Journal.append
    monkeypatch.setattr(Journal, "append",
                        lambda self, rows: (appended.extend(i for i, _ in rows), original(self, rows)))
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert f"{9 - len(first)} transcribed, {len(first)} skipped as already done" in r.output
    assert not set(appended) & first and len(appended) == 9 - len(first)
    assert not journal.exists()
    monkeypatch.undo()

    transcribe(cfg(asr, data, tmp_path / "ref.csv", all=True, batch_seconds=4.0))
    assert out.read_bytes() == (tmp_path / "ref.csv").read_bytes()


def test_other_settings_are_refused_unless_overwrite(asr, data, tmp_path, one_torch_thread):
    out = tmp_path / "asr.csv"
    transcribe(cfg(asr, data, out, splits=("Test3",)))
    with pytest.raises(TranscribeError, match=r"asr.csv was made with other settings \(beams 1 → 3\)"):
        transcribe(cfg(asr, data, out, splits=("Test3",), beams=3))
    other = whisper_asr(tmp_path / "other-whisper", seed=1)
    with pytest.raises(TranscribeError, match="model_id .*; revision"):
        transcribe(cfg(other, data, out, splits=("Test3",)))
    r = transcribe(cfg(asr, data, out, splits=("Test3",), beams=3, overwrite=True))
    assert r.transcribed == 3 and r.skipped == 0
    assert json.loads((tmp_path / "asr.csv.json").read_text())["settings"]["beams"] == 3
    (tmp_path / "asr.csv.json").unlink()
    with pytest.raises(TranscribeError, match="exists without its settings file asr.csv.json"):
        transcribe(cfg(asr, data, out, splits=("Test3",), beams=3))


def test_journal_drops_a_cut_last_record(tmp_path):
    j = tmp_path / "t.csv.partial"
    j.write_text('FileName,text\na.wav,hello there\nb.wav,"quoted, text"\nc.wav,cut sho')
    assert Journal(j).read() == {"a.wav": "hello there", "b.wav": "quoted, text"}
    assert j.read_text().endswith('"quoted, text"\n')  # truncated, so appended lines start clean
    Journal(j).append([("c.wav", "again")])
    assert Journal(j).read()["c.wav"] == "again"


def test_packing_restarted_at_a_batch_boundary_gives_the_same_batches():
    rng = np.random.default_rng(0)
    seconds = {f"u{i:03d}": float(x) for i, x in enumerate(rng.uniform(0.5, 30, 300))}
    batches = pack(seconds, 120.0)
    assert sorted(i for b in batches for i in b) == sorted(seconds)
    assert all(sum(seconds[i] for i in b) <= 120.0 or len(b) == 1 for b in batches)
    assert all(len(b) <= MAX_BATCH for b in pack({f"s{i}": 0.1 for i in range(200)}, 1000.0))
    done = {i for b in batches[:7] for i in b}
    assert pack({k: v for k, v in seconds.items() if k not in done}, 120.0) == batches[7:]


# --------------------------------------------------------------------------- errors and models


def test_unreadable_audio_is_reported_and_skipped(asr, data, tmp_path, one_torch_thread):
    audios = data / "Audios"
    (audios / "MSP-PODCAST_test3_0001.wav").write_bytes(b"RIFF....WAVEnot really audio")
    import soundfile as sf

    sf.write(str(audios / "MSP-PODCAST_test3_0002.wav"), np.zeros(0, dtype=np.float32), 16_000)
    (audios / "MSP-PODCAST_1000_0002.wav").unlink()  # listed in the labels, file missing
    r = runner.invoke(app, ["transcribe", "--model", str(asr), "--data", str(data), "--out", str(tmp_path / "asr.csv"),
                            "--device", "cpu", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "1 transcribed, 0 skipped as already done, 3 failed" in r.output and "asr.errors.csv" in r.output
    assert sorted(table(tmp_path / "asr.csv")) == ["MSP-PODCAST_test3_0003.wav"]
    report = read_csv(tmp_path / "asr.errors.csv")
    assert report[0] == ["id", "path", "reason"]
    reasons = {row[0]: row[2] for row in report[1:]}
    assert reasons == {"MSP-PODCAST_1000_0002.wav": "file not found",
                       "MSP-PODCAST_test3_0001.wav": reasons["MSP-PODCAST_test3_0001.wav"],
                       "MSP-PODCAST_test3_0002.wav": "empty audio (0 samples)"}
    assert reasons["MSP-PODCAST_test3_0001.wav"].startswith("unreadable audio")

    # Fixed files are transcribed by the next run; the others stay done.
    shutil.copy(audios / "MSP-PODCAST_test3_0003.wav", audios / "MSP-PODCAST_test3_0001.wav")
    again = transcribe(cfg(asr, data, tmp_path / "asr.csv"))
    assert (again.transcribed, again.skipped, again.failed, again.rows) == (1, 1, 2, 2)


def test_english_is_forced_only_when_the_model_has_the_token(asr, tmp_path, one_torch_thread):
    plain = WhisperTranscriber.load(str(whisper_asr(tmp_path / "plain", languages=False)), device="cpu")
    tagged = WhisperTranscriber.load(str(asr), device="cpu", beams=2, max_new_tokens=500)
    assert plain.language is None and tagged.language == "en"
    assert tagged.max_new_tokens == 24 - transcriber.PROMPT_TOKENS  # within the decoder's positions
    waves = [tone(1.0), tone(2.5, freq=300, seed=1)]
    for t in (plain, tagged):
        texts = t.transcribe(waves)
        assert len(texts) == 2 and all(isinstance(x, str) and x for x in texts)


def test_models_that_cannot_transcribe_give_one_clear_line(data, tmp_path):
    from factories import tiny_whisper

    base = ["transcribe", "--data", str(data), "--out", str(tmp_path / "a.csv"), "--device", "cpu"]
    r = runner.invoke(app, [*base, "--model", "whisper-large-v3"])
    assert r.exit_code == 2 and "openai/whisper-large-v3" in r.output and "--model DIR" in r.output
    r = runner.invoke(app, [*base, "--model", str(tiny_whisper(tmp_path / "no-tokenizer"))])
    assert r.exit_code == 2 and "tokenizer" in r.output, r.output
    r = runner.invoke(app, [*base, "--model", str(tmp_path / "no-tokenizer"), "--beams", "0", "--max-new-tokens", "0"])
    assert r.exit_code == 2 and "--beams 0" in r.output and "--max-new-tokens 0" in r.output
    # --precision has fixed choices: click refuses another before any work.
    r = runner.invoke(app, [*base, "--model", str(tmp_path / "no-tokenizer"), "--precision", "fp16"])
    assert r.exit_code == 2 and "'fp16' is not one of 'auto', 'fp32', 'bf16'" in r.output
