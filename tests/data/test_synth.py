"""The synthetic corpus: MSP-Podcast layout, determinism, and labels that the signals carry."""

from __future__ import annotations

import csv
import hashlib
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from ser_cache.data import synth
from ser_cache.data.corpus import load_corpus
from ser_cache.data.msp_podcast import MSP_COLUMNS
from ser_cache.data.records import EMOTION_NAMES


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return synth.make_corpus(tmp_path_factory.mktemp("synth") / "corpus", 120, seed=3)


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_layout_and_columns_match_msp_podcast(corpus):
    with open(corpus / "Labels" / "labels_consensus.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0].keys()) == MSP_COLUMNS
    assert len(rows) == 120
    for row in rows:
        assert re.fullmatch(r"MSP-PODCAST_\d{4}_\d{4}\.wav", row["FileName"])
        assert (corpus / "Audios" / row["FileName"]).is_file()
        assert (corpus / "Transcripts" / row["FileName"].replace(".wav", ".txt")).is_file()
        for col in ("EmoAct", "EmoVal", "EmoDom"):
            assert re.fullmatch(r"\d\.\d", row[col]) and 1.0 <= float(row[col]) <= 7.0
        assert row["EmoClass"] in EMOTION_NAMES
        assert row["Gender"] in ("Male", "Female")
    assert any(row["SpkrID"] == "Unknown" for row in rows)

    utts = load_corpus(corpus)
    assert len(utts) == 120 and all(u.has_avd for u in utts)
    assert {u.split for u in utts} == {"Train", "Development", "Test1"}
    assert all(u.read_text() for u in utts)
    info = sf.info(str(utts[0].path))
    assert (info.samplerate, info.channels, info.subtype) == (16_000, 1, "PCM_16")
    seconds = [sf.info(str(u.path)).duration for u in utts]
    assert 1.4 <= min(seconds) and max(seconds) <= 6.1


def test_splits_are_speaker_disjoint_and_about_60_20_20(corpus):
    utts = load_corpus(corpus)
    speaker_split: dict[str, set[str]] = {}
    for u in utts:  # the speaker is in the file name even when SpkrID says Unknown
        speaker_split.setdefault(u.id.split("_")[1], set()).add(u.split)
    assert all(len(s) == 1 for s in speaker_split.values())
    share = Counter(u.split for u in utts)
    assert 0.45 <= share["Train"] / 120 <= 0.75
    assert 0.1 <= share["Development"] / 120 <= 0.3


def test_emotions_are_imbalanced_and_agree_with_the_attributes():
    utts = synth.plan_corpus(2000, np.random.default_rng(0))
    counts = Counter(u.emotion for u in utts)
    assert counts.most_common(1)[0][0] == "N" and counts["N"] > 5 * counts["F"]
    mean = {e: np.mean([(u.arousal, u.valence) for u in utts if u.emotion == e], axis=0) for e in "NHSA"}
    assert mean["H"][1] > mean["N"][1] > mean["S"][1]  # valence
    assert mean["A"][0] > mean["N"][0] > mean["S"][0]  # arousal
    assert mean["A"][1] < mean["N"][1]


def test_same_seed_same_bytes_other_seed_other_corpus(tmp_path):
    a = synth.make_corpus(tmp_path / "a", 12, seed=7)
    b = synth.make_corpus(tmp_path / "b", 12, seed=7)
    c = synth.make_corpus(tmp_path / "c", 12, seed=8)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_audio_follows_arousal_and_gender(corpus):
    utts = load_corpus(corpus)
    arousal = np.array([u.arousal for u in utts])
    loudness, pitch = [], []
    for u in utts:
        x, sr = sf.read(str(u.path), dtype="float32")
        loudness.append(20 * np.log10(np.sqrt(np.mean(x ** 2))))
        pitch.append(_pitch(x, sr))
    loudness, pitch = np.array(loudness), np.array(pitch)
    assert np.corrcoef(loudness, arousal)[0, 1] > 0.7
    male = np.array([u.gender == "Male" for u in utts])
    assert np.median(pitch[male]) < np.median(pitch[~male])


def test_speaking_rate_follows_arousal():
    calm, aroused = _planned(arousal=2.0), _planned(arousal=6.0)
    rng = np.random.default_rng(0)
    assert _syllable_rate(synth.speech(aroused, rng)) > 1.5 * _syllable_rate(synth.speech(calm, rng))


def test_transcripts_follow_valence(corpus):
    utts = load_corpus(corpus)
    level_of = {w: i for i, words in enumerate(synth.VALENCE_WORDS) for w in words}
    levels, valence = [], []
    for u in utts:
        words = re.findall(r"[a-z]+", u.read_text().lower())
        found = [level_of[w] for w in words if w in level_of]
        assert len(found) == 1, u.read_text()
        levels.append(found[0])
        valence.append(u.valence)
    levels, valence = np.array(levels), np.array(valence)
    assert np.corrcoef(levels, valence)[0, 1] > 0.7
    assert valence[levels <= 1].mean() < valence[levels == 2].mean() < valence[levels >= 3].mean()
    assert set(synth.vocabulary()) >= {w for u in utts for w in re.findall(r"[a-z]+", u.read_text().lower())}


def _planned(arousal: float) -> synth.SynthUtterance:
    spk = synth.Speaker(number=1000, gender="Male", f0=120.0, gain_db=0.0, rate=3.0)
    return synth.SynthUtterance(file_name="MSP-PODCAST_1000_0001.wav", emotion="N", arousal=arousal, valence=4.0,
                                dominance=4.0, speaker=spk, speaker_label="1000", split="Train", text="",
                                valence_level=2, seconds=5.0)


def _syllable_rate(x: np.ndarray, sr: int = 16_000) -> float:
    """Peaks per second of the 10-ms energy envelope, smoothed: the syllable rate."""
    frames = x[: len(x) // 160 * 160].reshape(-1, 160)
    env = np.sqrt((frames ** 2).mean(1))
    env = np.convolve(env, np.hanning(5) / np.hanning(5).sum(), mode="same")
    above = env > 0.3 * env.max()
    onsets = np.count_nonzero(above[1:] & ~above[:-1])
    return onsets / (len(x) / sr)


def _pitch(x: np.ndarray, sr: int) -> float:
    """Median autocorrelation pitch over the loudest frames (Hz)."""
    n = 1024
    frames = x[: len(x) // n * n].reshape(-1, n)
    loud = frames[np.argsort((frames ** 2).sum(1))[-8:]]
    lo, hi = sr // 500, sr // 60
    f0 = []
    for f in loud:
        ac = np.correlate(f, f, mode="full")[n - 1:]
        f0.append(sr / (lo + np.argmax(ac[lo:hi])))
    return float(np.median(f0))
