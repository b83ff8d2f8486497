"""A synthetic corpus in the exact MSP-Podcast layout, whose labels can be learnt from audio and text.

`make_corpus(root, n)` writes

    Audios/MSP-PODCAST_SSSS_UUUU.wav        16 kHz, mono, 16-bit PCM, 1.5-6 s
    Transcripts/MSP-PODCAST_SSSS_UUUU.txt   one short sentence
    Labels/labels_consensus.csv             FileName,EmoClass,EmoAct,EmoVal,EmoDom,SpkrID,Gender,Split_Set

SSSS is the speaker and the splits (Train, Development, Test1, about 60/20/20 of the utterances)
are speaker-disjoint, so a score on Development measures generalisation to new voices. What
carries each label, by design (the same recipe as ../shared/data/mini-podcast):

- arousal: loudness (4 dB per scale point), speaking rate (the syllable-like amplitude modulation,
  about 3 syllables/s at 4, more when aroused), pitch (1.6 semitones per point) and brightness;
- dominance: pitch and loudness, more weakly; it is also correlated with arousal, as in the corpus;
- valence: the wording of the transcript (five graded word lists, from "awful" to "wonderful");
- gender: the pitch range of the voice (male speakers lower, female higher).

The emotion class is drawn first, from an imbalanced distribution like MSP-Podcast's (Neutral and
No-agreement largest, Fear and Disgust rare), and the attributes around the class's centre, so H
is pleasant, S unpleasant and calm, A unpleasant and aroused. Everything is numpy and a function
of the seed: the same seed writes byte-identical files.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ser_cache.data.audio import SAMPLE_RATE

LABEL_COLUMNS = ("FileName", "EmoClass", "EmoAct", "EmoVal", "EmoDom", "SpkrID", "Gender", "Split_Set")
SPLITS = (("Train", 0.6), ("Development", 0.2), ("Test1", 0.2))
MIN_SECONDS, MAX_SECONDS = 1.5, 6.0
UNKNOWN_SPEAKER_RATE = 0.08  # share of rows whose SpkrID is "Unknown", as in the real label file

# Emotion codes with their share of the corpus and their (arousal, valence, dominance) centre.
EMOTIONS: dict[str, tuple[float, tuple[float, float, float]]] = {
    "N": (0.30, (4.0, 4.1, 4.0)),
    "H": (0.17, (4.9, 5.9, 4.6)),
    "X": (0.14, (4.2, 3.9, 4.1)),
    "A": (0.08, (5.8, 2.3, 5.4)),
    "S": (0.07, (2.8, 2.5, 3.1)),
    "C": (0.06, (4.0, 3.0, 4.9)),
    "O": (0.06, (4.2, 4.1, 4.0)),
    "U": (0.05, (5.3, 4.7, 4.2)),
    "D": (0.04, (4.3, 2.4, 4.5)),
    "F": (0.03, (5.0, 2.6, 3.0)),
}
LABEL_SPREAD = 0.85  # std of the attributes around their class centre

# Transcripts: a template, a noun, and an adjective from the word list of the valence level.
TEMPLATES = (
    "I think the {noun} was {adj}.",
    "Everyone says the {noun} is {adj}.",
    "You know, the {noun} felt {adj} to me.",
    "Honestly, that {noun} was {adj}.",
    "The {noun} this week seemed {adj}.",
    "Well, my {noun} turned out {adj}.",
)
NOUNS = ("meeting", "concert", "dinner", "trip", "interview", "game", "movie", "weekend", "class", "news",
         "show", "party")
VALENCE_WORDS = (  # from very negative (level 0) to very positive (level 4)
    ("awful", "terrible", "horrible", "miserable", "disgusting"),
    ("sad", "bad", "boring", "annoying", "disappointing"),
    ("plain", "ordinary", "usual", "normal", "typical"),
    ("nice", "good", "pleasant", "fun", "lovely"),
    ("wonderful", "amazing", "fantastic", "brilliant", "perfect"),
)

# Vowel formants (F1, F2) in Hz for a male voice; female voices are 15% higher.
VOWELS = ((730.0, 1090.0), (270.0, 2290.0), (300.0, 870.0), (530.0, 1840.0), (570.0, 840.0))
N_HARMONICS = 16  # below Nyquist for any f0 up to 500 Hz
MALE_F0, FEMALE_F0 = (85.0, 150.0), (165.0, 250.0)  # speakers' mean pitch ranges, Hz


@dataclass(frozen=True)
class Speaker:
    number: int  # the SSSS in the file name
    gender: str
    f0: float  # mean pitch at arousal 4, Hz
    gain_db: float  # recording level
    rate: float  # syllables per second at arousal 4


@dataclass(frozen=True)
class SynthUtterance:
    """One row of the synthetic label file, with the text it says."""

    file_name: str
    emotion: str
    arousal: float
    valence: float
    dominance: float
    speaker: Speaker
    speaker_label: str  # SpkrID as written: the number, or "Unknown"
    split: str
    text: str
    valence_level: int  # which VALENCE_WORDS list the adjective came from
    seconds: float


def vocabulary() -> list[str]:
    """Every word the transcripts can contain, lower case, sorted (a word-level tokenizer's vocabulary)."""
    words = set(NOUNS) | {w for level in VALENCE_WORDS for w in level}
    for template in TEMPLATES:
        words |= set(re.findall(r"[a-z]+", template.format(noun="", adj="").lower()))
    return sorted(words)


def make_corpus(root: Path, n: int = 240, *, seed: int = 0) -> Path:
    """Write a synthetic MSP-Podcast-layout corpus of `n` utterances under `root`; returns `root`."""
    import soundfile as sf

    if n < 3:
        raise ValueError(f"n={n}: at least 3 utterances are needed (one per split)")
    root = Path(root)
    rng = np.random.default_rng(seed)
    utts = plan_corpus(n, rng)
    (root / "Audios").mkdir(parents=True, exist_ok=True)
    (root / "Transcripts").mkdir(parents=True, exist_ok=True)
    (root / "Labels").mkdir(parents=True, exist_ok=True)
    for u in utts:
        wave = speech(u, rng)
        sf.write(str(root / "Audios" / u.file_name), wave, SAMPLE_RATE, subtype="PCM_16")
        (root / "Transcripts" / (u.file_name.removesuffix(".wav") + ".txt")).write_text(u.text + "\n", encoding="utf-8")
    with open(root / "Labels" / "labels_consensus.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(LABEL_COLUMNS)
        for u in sorted(utts, key=lambda u: u.file_name):
            w.writerow([u.file_name, u.emotion, f"{u.arousal:.1f}", f"{u.valence:.1f}", f"{u.dominance:.1f}",
                        u.speaker_label, u.speaker.gender, u.split])
    return root


# --------------------------------------------------------------------------- labels and text


def plan_corpus(n: int, rng: np.random.Generator) -> list[SynthUtterance]:
    """Speakers, splits, labels and transcripts for `n` utterances (no audio yet)."""
    n_speakers = max(3, round(n / 10))
    speakers = [_speaker(1000 + k, "Male" if k % 2 else "Female", rng) for k in range(n_speakers)]
    # Utterances per speaker vary, as in podcasts; every speaker has at least one.
    weights = rng.gamma(3.0, size=n_speakers)
    counts = 1 + rng.multinomial(n - n_speakers, weights / weights.sum())
    split_of = _assign_splits(counts, rng)

    codes = list(EMOTIONS)
    probs = np.array([EMOTIONS[c][0] for c in codes])
    utts = []
    for k, spk in enumerate(speakers):
        for j in range(int(counts[k])):
            emotion = codes[rng.choice(len(codes), p=probs / probs.sum())]
            a, v, d = _attributes(emotion, rng)
            level = int(np.clip(np.rint((v - 4.0) / 1.1 + 2.0 + rng.normal(0, 0.45)), 0, 4))
            template = TEMPLATES[rng.integers(len(TEMPLATES))]
            text = template.format(noun=NOUNS[rng.integers(len(NOUNS))],
                                   adj=VALENCE_WORDS[level][rng.integers(len(VALENCE_WORDS[level]))])
            unknown = rng.random() < UNKNOWN_SPEAKER_RATE
            utts.append(SynthUtterance(
                file_name=f"MSP-PODCAST_{spk.number:04d}_{j + 1:04d}.wav", emotion=emotion,
                arousal=a, valence=v, dominance=d, speaker=spk,
                speaker_label="Unknown" if unknown else str(spk.number), split=split_of[k], text=text,
                valence_level=level, seconds=float(rng.uniform(MIN_SECONDS, MAX_SECONDS)),
            ))
    return utts


def _speaker(number: int, gender: str, rng: np.random.Generator) -> Speaker:
    lo, hi = MALE_F0 if gender == "Male" else FEMALE_F0
    return Speaker(number=number, gender=gender, f0=float(rng.uniform(lo, hi)),
                   gain_db=float(rng.uniform(-3.0, 3.0)), rate=float(rng.uniform(2.7, 3.5)))


def _assign_splits(counts: np.ndarray, rng: np.random.Generator) -> list[str]:
    """Speakers, in random order, each to the split furthest below its share: speaker-disjoint, ~60/20/20."""
    names = [s for s, _ in SPLITS]
    shares = np.array([p for _, p in SPLITS])
    filled = np.zeros(len(SPLITS))
    split_of = [""] * len(counts)
    order = rng.permutation(len(counts))
    for i, k in enumerate(order):
        if i < len(SPLITS):  # every split gets a speaker first
            s = i
        else:
            s = int(np.argmax(shares * counts.sum() - filled))
        split_of[k] = names[s]
        filled[s] += counts[k]
    return split_of


def _attributes(emotion: str, rng: np.random.Generator) -> tuple[float, float, float]:
    """Arousal, valence, dominance around the class centre; dominance leans on arousal, as rated."""
    ca, cv, cd = EMOTIONS[emotion][1]
    a = ca + rng.normal(0, LABEL_SPREAD)
    v = cv + rng.normal(0, LABEL_SPREAD)
    d = cd + 0.5 * (a - ca) + rng.normal(0, LABEL_SPREAD * 0.8)
    return tuple(float(np.round(np.clip(x, 1.0, 7.0), 1)) for x in (a, v, d))


# --------------------------------------------------------------------------- audio


def speech(u: SynthUtterance, rng: np.random.Generator) -> np.ndarray:
    """A speech-like waveform (float32, 16 kHz): voiced syllables with vowel formants, pauses, consonant noise.

    A harmonic source (by a recurrence, not one `sin` per harmonic) shaped per syllable by a vowel's
    formants, under an envelope of syllable bumps at the speaking rate.
    """
    sr = SAMPLE_RATE
    n = int(u.seconds * sr)
    a, dom = u.arousal - 4.0, u.dominance - 4.0
    spk = u.speaker

    # Syllables: onsets at the speaking rate, each voiced for ~70% of its slot; now and then a pause.
    rate = float(np.clip(spk.rate + 0.7 * a + rng.normal(0, 0.15), 1.5, 8.0))
    starts, lengths = [], []
    t = rng.uniform(0.08, 0.25)
    while t < u.seconds - 0.2:
        slot = rng.uniform(0.75, 1.25) / rate
        starts.append(t)
        lengths.append(0.7 * slot)
        t += slot + (rng.uniform(0.15, 0.35) if rng.random() < 0.12 else 0.0)
    starts_i = (np.array(starts) * sr).astype(int)
    lengths_i = np.maximum((np.array(lengths) * sr).astype(int), 1)
    n_syl = len(starts)

    # Pitch: the speaker's mean, raised by arousal and dominance; declination plus per-syllable accents
    # whose size grows with arousal; a slight 5.5-Hz wobble.
    semitones = 1.6 * a + 0.6 * dom
    accent = max(0.5, 1.5 + 0.4 * a)
    centres = starts_i + lengths_i // 2
    syl_st = rng.normal(0, accent, n_syl)
    samples = np.arange(n, dtype=np.float32)
    contour = np.interp(samples, centres, syl_st) if n_syl > 1 else np.zeros(n, np.float32)
    contour += 1.5 - 3.0 * samples / n + 0.15 * np.sin(2 * np.pi * 5.5 * samples / sr)
    f0 = np.clip(spk.f0 * 2.0 ** ((semitones + contour) / 12.0), 60.0, 480.0).astype(np.float32)
    phase = (2 * np.pi * np.cumsum(f0) / sr).astype(np.float32)

    # Which syllable each sample belongs to (-1: silence), and each syllable's vowel weights.
    syl_of = np.full(n, -1, dtype=np.int64)
    envelope = np.zeros(n, dtype=np.float32)
    for i, (s, length) in enumerate(zip(starts_i, lengths_i, strict=True)):
        e = min(s + length, n)
        if e <= s:
            continue
        syl_of[s:e] = i
        envelope[s:e] = np.sin(np.pi * (np.arange(e - s) + 0.5) / length) ** 0.7
    tilt = 1.5 - 0.15 * a  # aroused voices are brighter (more energy in high harmonics)
    scale = 1.15 if spk.gender == "Female" else 1.0
    vowels = np.array(VOWELS)[rng.integers(len(VOWELS), size=max(n_syl, 1))] * scale
    syl_f0 = spk.f0 * 2.0 ** (semitones / 12.0)
    k = np.arange(1, N_HARMONICS + 1)
    fk = k[None, :] * syl_f0
    weights = k[None, :] ** -tilt * (0.3 + np.exp(-((fk - vowels[:, :1]) / 150.0) ** 2)
                                     + 0.7 * np.exp(-((fk - vowels[:, 1:]) / 200.0) ** 2))
    weights = np.vstack([weights, np.zeros((1, N_HARMONICS))]).astype(np.float32)  # row -1: silence

    # Harmonics by sin(kθ) = 2 cos θ sin((k-1)θ) - sin((k-2)θ).
    c2 = 2 * np.cos(phase)
    s_prev, s_cur = np.zeros(n, np.float32), np.sin(phase)
    voiced = np.zeros(n, dtype=np.float32)
    for h in range(N_HARMONICS):
        voiced += weights[syl_of, h] * s_cur
        s_prev, s_cur = s_cur, c2 * s_cur - s_prev
    voiced *= envelope

    # Consonants: a short burst of high-passed noise before each syllable.
    noise = rng.standard_normal(n).astype(np.float32)
    hiss = np.diff(noise, prepend=0.0).astype(np.float32)
    bursts = np.zeros(n, dtype=np.float32)
    for s in starts_i:
        b0 = max(0, s - int(0.04 * sr))
        bursts[b0:s] = np.hanning(s - b0 + 2)[1:-1] if s > b0 else 0.0
    x = voiced + 0.4 * float(np.sqrt(np.mean(voiced ** 2))) * hiss * bursts

    # Loudness: 4 dB per arousal point, 1.5 per dominance point, the speaker's level, a little noise.
    level_db = 4.0 * a + 1.5 * dom + spk.gain_db + rng.normal(0, 1.0)
    rms = float(np.sqrt(np.mean(x ** 2))) + 1e-9
    x *= 0.04 * 10.0 ** (level_db / 20.0) / rms
    x += 3e-4 * noise  # a quiet room
    peak = float(np.abs(x).max())
    if peak > 0.98:
        x *= 0.98 / peak
    return x.astype(np.float32)
