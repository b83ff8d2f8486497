"""The challenge's final system end to end on a Test3 without transcripts (docs/recipes.md, "The
winning submission"): transcribe → text features → WavLM and MMWhisper members → ensemble →
check-submission, with tiny local models, on a copy of ../shared/data/mini-podcast (every third
row of each split: the flow, not the corpus' size, is what these tests check) whose Test1
files are renamed to the Test3 pattern, unlisted in the labels and stripped of their transcripts;
and Task 1's flow on the same copy (docs/categorical.md): extract → train-heads --task categorical →
predict --with-probabilities → ensemble --task categorical → check-submission --task categorical."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ser_cache.cli.app import app

from factories import whisper_asr

# Every third row: 134 of mini-podcast's 400 (83 Train, 18 Development, 33 Test1 turned Test3; all
# eight classes among the Train rows): stage one, transcription and fine-tuning see a third of the audio.
EVERY = 3


def make_test3_copy(src: Path, dst: Path) -> tuple[Path, list[str]]:
    """Every EVERY-th row of the corpus, with Test1 turned into a challenge-like Test3: audio linked, not copied."""
    with open(src / "Labels" / "labels_consensus.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[::EVERY]
    (dst / "Audios").mkdir(parents=True)
    (dst / "Transcripts").mkdir()
    (dst / "Labels").mkdir()
    kept, test3 = [], []
    for row in rows:
        name = row["FileName"]
        if row["Split_Set"] == "Test1":
            new = f"MSP-PODCAST_test3_{len(test3) + 1:04d}.wav"
            os.symlink(src / "Audios" / name, dst / "Audios" / new)
            test3.append(new)  # no transcript, not in the labels
            continue
        os.symlink(src / "Audios" / name, dst / "Audios" / name)
        os.symlink(src / "Transcripts" / name.replace(".wav", ".txt"),
                   dst / "Transcripts" / name.replace(".wav", ".txt"))
        kept.append(row)
    with open(dst / "Labels" / "labels_consensus.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(kept)
    return dst, test3


def run(*args: str) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, f"ser-cache {' '.join(map(str, args))}\n{result.output}"
    return result.output


@pytest.mark.slow
def test_the_winning_submission_flow_ends_in_an_accepted_file(mini_podcast, models, tmp_path, one_torch_thread):
    data, test3 = make_test3_copy(mini_podcast, tmp_path / "corpus")
    asr = whisper_asr(tmp_path / "whisper-asr")
    feats = tmp_path / "features"
    common = ("--device", "cpu")

    run("transcribe", "--model", asr, "--data", data, "--split", "Test3", "--out", tmp_path / "asr.csv", *common,
        "--no-progress")
    with open(tmp_path / "asr.csv", newline="", encoding="utf-8") as f:
        assert sorted(r["FileName"] for r in csv.DictReader(f)) == sorted(test3)
    # Text features with the corpus' transcripts and the ASR table where there are none (Test3).
    run("extract", "--model", models["text"], "--data", data, "--out", feats, "--name", "text",
        "--transcripts", tmp_path / "asr.csv", *common, "--no-progress")
    run("extract", "--model", models["whisper"], "--pooling", "frames", "--window", "trimmed", "--data", data,
        "--out", feats, *common, "--workers", "0", "--no-progress")
    frames = next(feats.glob("*-frames.zarr"))

    train = ("--data", data, "--epochs", "3", "--lr", "1e-3", "--no-undersample", "--select", "ccc", *common,
             "--no-progress")
    run("train-heads", "--features", frames, "--features", feats / "text.zarr", "--out", tmp_path / "mmwhisper",
        "--gender-weight", "0", "--speaker-weight", "0", "--conv-dim", "32", *train)
    run("finetune", "wavlm", "--data", data, "--out", tmp_path / "wavlm", "--model", models["wavlm"], "--epochs", "1",
        "--gender-weight", "1", "--ox", "train+dev", "--select", "ccc", "--no-undersample", "--conv-dim", "32",
        "--hidden", "32", *common, "--workers", "0", "--threads", "1", "--no-progress")

    run("predict", tmp_path / "wavlm", "--data", data, "--split", "Test3", "--out", tmp_path / "wavlm.csv", *common)
    run("predict", tmp_path / "mmwhisper", "--data", data, "--split", "Test3", "--transcripts", tmp_path / "asr.csv",
        "--out", tmp_path / "mmwhisper.csv", *common)
    run("ensemble", tmp_path / "wavlm.csv", tmp_path / "mmwhisper.csv", "--out", tmp_path / "final.csv")

    checked = CliRunner().invoke(app, ["check-submission", str(tmp_path / "final.csv"), "--data", str(data),
                                       "--split", "Test3"])
    assert checked.exit_code == 0, checked.output
    assert "OK" in checked.output and f"{len(test3)}" in checked.output
    with open(tmp_path / "final.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["FileName", "EmoAct", "EmoVal", "EmoDom"] and len(rows) == len(test3) + 1

    # The same check rejects a broken file: a missing Test3 row.
    broken = tmp_path / "broken.csv"
    broken.write_text("\n".join(",".join(r) for r in rows[:-1]) + "\n")
    rejected = CliRunner().invoke(app, ["check-submission", str(broken), "--data", str(data), "--split", "Test3"])
    assert rejected.exit_code == 1 and rows[-1][0] in rejected.output


@pytest.mark.slow
def test_the_task_1_flow_ends_in_an_accepted_file(mini_podcast, models, tmp_path, one_torch_thread):
    from ser_cache.runs.prediction_file import read_class_predictions
    from ser_cache.system.tasks import CLASSES_8

    data, test3 = make_test3_copy(mini_podcast, tmp_path / "corpus")
    feats = tmp_path / "features"
    common = ("--device", "cpu")
    run("extract", "--model", models["whisper"], "--data", data, "--out", feats, "--name", "audio", *common,
        "--workers", "0", "--no-progress")
    members = []
    for seed, weights in (("0", "balanced"), ("1", "none")):
        out = tmp_path / f"cat-{seed}"
        run("train-heads", "--features", feats / "audio.zarr", "--data", data, "--out", out, "--task", "categorical",
            "--class-weights", weights, "--seed", seed, "--epochs", "3", "--lr", "1e-3", "--no-undersample",
            "--gender-weight", "0", "--speaker-weight", "0", *common, "--no-progress")
        members.append(tmp_path / f"cat-{seed}.csv")
        run("predict", out, "--data", data, "--split", "Test3", "--with-probabilities", "--out", members[-1], *common)
        ids, codes, probs, classes = read_class_predictions(members[-1])
        assert sorted(ids) == sorted(test3) and classes == CLASSES_8
    run("ensemble", *members, "--task", "categorical", "--out", tmp_path / "final.csv")
    with open(tmp_path / "final.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["FileName", "EmoClass"] and len(rows) == len(test3) + 1
    assert {r[1] for r in rows[1:]} <= set(CLASSES_8)
    checked = CliRunner().invoke(app, ["check-submission", str(tmp_path / "final.csv"), "--data", str(data),
                                       "--split", "Test3", "--task", "categorical"])
    assert checked.exit_code == 0, checked.output
    assert "OK" in checked.output and f"{len(test3)}" in checked.output
    # A member without probabilities cannot be averaged; a Task 2 file is no Task 1 submission.
    run("predict", tmp_path / "cat-0", "--data", data, "--split", "Test3", "--out", tmp_path / "bare.csv", *common)
    refused = CliRunner().invoke(app, ["ensemble", str(members[0]), str(tmp_path / "bare.csv"), "--task",
                                       "categorical", "--out", str(tmp_path / "x.csv")])
    assert refused.exit_code != 0 and "bare.csv" in refused.output
    wrong = CliRunner().invoke(app, ["check-submission", str(members[0]), "--data", str(data), "--split", "Test3",
                                     "--task", "categorical"])
    assert wrong.exit_code == 1


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
