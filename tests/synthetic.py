"""Synthetic stage-two material shared by the tests: manifests whose labels can be learnt from
made-up features (pooled vectors and frames), stores as `extract` would leave them, stores whose
vectors follow speakers, a train-heads run on them, and a finished run's files made by hand."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ser_cache.features.store import FeatureStore
from ser_cache.features.store_ref import fingerprint
from ser_cache.infra import atomic
from ser_cache.runs import layout
from ser_cache.system.metrics import PRIMARY_EMOTIONS
from ser_cache.train.options import TrainHeadsConfig
from ser_cache.train.recipe import train_heads

EMOTIONS = list(PRIMARY_EMOTIONS) + ["O", "X"]


# --------------------------------------------------------------------------- pooled stores and train-heads


def make_corpus(root: Path, n: int = 300, *, seed: int = 0,
                splits=(("Train", 0.6), ("Development", 0.25), ("Test1", 0.15))):
    """A CSV manifest whose labels are learnable: arousal from 'audio' features, valence from 'text'.

    Returns (manifest path, ids, {"audio": (n, 24), "text": (n, 16)} float32 features).
    """
    rng = np.random.default_rng(seed)
    audio = rng.standard_normal((n, 24)).astype(np.float32)
    text = rng.standard_normal((n, 16)).astype(np.float32)
    w_a, w_t = rng.standard_normal(24), rng.standard_normal(16)
    arousal = 4 + 2.2 * np.tanh(audio @ w_a / 5) + 0.2 * rng.standard_normal(n)
    valence = 4 + 2.2 * np.tanh(text @ w_t / 4) + 0.2 * rng.standard_normal(n)
    dominance = 4 + 1.5 * np.tanh((audio[:, :8].sum(1) + text[:, :4].sum(1)) / 3) + 0.2 * rng.standard_normal(n)
    cuts = np.cumsum([int(round(f * n)) for _, f in splits])
    root.mkdir(parents=True, exist_ok=True)
    ids = [f"utt_{i:04d}.wav" for i in range(n)]
    path = root / "manifest.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "id", "split", "arousal", "valence", "dominance", "emotion", "gender", "speaker"])
        for i in range(n):
            split = splits[int(np.searchsorted(cuts, i, side="right"))][0] if i < cuts[-1] else splits[-1][0]
            emotion = EMOTIONS[i % len(EMOTIONS)] if i % 7 else "N"
            gender = "Female" if audio[i, 0] > 0 else "Male"
            speaker = f"spk{i % 12}" if i % 11 else ""
            w.writerow([f"audio/{ids[i]}", ids[i], split, f"{arousal[i]:.3f}", f"{valence[i]:.3f}",
                        f"{dominance[i]:.3f}", emotion, gender, speaker])
    return path, ids, {"audio": audio, "text": text}


def make_class_corpus(root: Path, n: int = 400, *, seed: int = 0, ox_share: float = 0.15,
                      splits=(("Train", 0.6), ("Development", 0.25), ("Test1", 0.15))):
    """A CSV manifest whose emotion classes are learnable: the class of a row is the argmax of eight
    linear scores of its 'audio' and 'text' vectors (the challenge's codes A S H U F D C N), and a
    share `ox_share` of the rows is O or X instead (no class target under 8 classes). Arousal,
    valence and dominance follow the features as in make_corpus.

    Returns (manifest path, ids, {"audio": (n, 24), "text": (n, 16)}, the codes of every row).
    """
    from ser_cache.system.tasks import CLASSES_8

    rng = np.random.default_rng(seed)
    audio = rng.standard_normal((n, 24)).astype(np.float32)
    text = rng.standard_normal((n, 16)).astype(np.float32)
    scores = audio @ rng.standard_normal((24, 8)) + text @ rng.standard_normal((16, 8))
    codes = np.array(CLASSES_8, dtype=object)[scores.argmax(1)]
    ox = rng.random(n) < ox_share
    codes[ox] = rng.choice(["O", "X"], int(ox.sum()))
    w_a, w_t = rng.standard_normal(24), rng.standard_normal(16)
    arousal = 4 + 2.2 * np.tanh(audio @ w_a / 5) + 0.2 * rng.standard_normal(n)
    valence = 4 + 2.2 * np.tanh(text @ w_t / 4) + 0.2 * rng.standard_normal(n)
    dominance = 4 + 1.5 * np.tanh((audio[:, :8].sum(1) + text[:, :4].sum(1)) / 3) + 0.2 * rng.standard_normal(n)
    cuts = np.cumsum([int(round(f * n)) for _, f in splits])
    root.mkdir(parents=True, exist_ok=True)
    ids = [f"utt_{i:04d}.wav" for i in range(n)]
    path = root / "manifest.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "id", "split", "arousal", "valence", "dominance", "emotion", "gender", "speaker"])
        for i in range(n):
            split = splits[int(np.searchsorted(cuts, i, side="right"))][0] if i < cuts[-1] else splits[-1][0]
            w.writerow([f"audio/{ids[i]}", ids[i], split, f"{arousal[i]:.3f}", f"{valence[i]:.3f}",
                        f"{dominance[i]:.3f}", codes[i], "Female" if audio[i, 0] > 0 else "Male", f"spk{i % 12}"])
    return path, ids, {"audio": audio, "text": text}, codes.tolist()


def make_store(path: Path, ids, feats: np.ndarray, *, kind: str = "whisper", modality: str = "audio",
               settings: dict | None = None, written: np.ndarray | None = None) -> Path:
    """A store as `extract` would leave it, with made-up encoder attributes."""
    settings = settings or {"kind": kind, "model_id": f"fake/{path.stem}", "revision": "r1", "pooling": "mean"}
    attrs = {"name": path.name.removesuffix(".zarr"), "model_id": settings.get("model_id"), "revision": "r1",
             "kind": kind, "modality": modality, "settings": settings, "fingerprint": fingerprint(settings)}
    written = np.ones(len(ids), dtype=bool) if written is None else written
    store = FeatureStore.create(path, list(ids), feats.shape[1:], attrs, chunk_rows=len(ids))
    store.write_chunk(0, feats.astype(np.float16), written, ~written)
    return path


def train(tmp_path, manifest, stores, name="run", **kw) -> tuple:
    # One thread: these heads are far too small to gain from two, and on a busy machine two
    # threads waiting for each other make every step many times slower.
    options = dict(epochs=25, lr=3e-3, batch_size=32, undersample=False, progress=False, device="cpu", threads=1)
    options.update(kw)
    cfg = TrainHeadsConfig(features=tuple(stores), data=manifest, out=tmp_path / name, **options)
    return train_heads(cfg), cfg


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- frame stores (arousal lives in the frames)


def make_frame_corpus(root: Path, n: int = 300, *, dim: int = 16, seed: int = 0):
    """A CSV manifest, per-row frames and pooled 'text' vectors.

    Arousal is |a| of a latent a that each frame carries with a random sign: x_t = ±a·v + noise.
    The mean of the raw frames averages the signs away (it sees ±a·mean(s), about a/4 for 20
    frames), while a ReLU stack sees relu(±a) at every frame and its mean is about |a|/2. Valence
    comes from the text vectors, dominance from both.
    Returns (manifest, ids, frames (list of (T_i, dim) float32), text (n, 16) float32).
    """
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(n)
    v = rng.standard_normal(dim)
    v /= np.linalg.norm(v)
    lengths = rng.integers(6, 40, n)
    frames = [(rng.choice([-1.0, 1.0], t)[:, None] * (2.0 * a[i] * v) + 0.5 * rng.standard_normal((t, dim)))
              .astype(np.float32) for i, t in enumerate(lengths)]
    text = rng.standard_normal((n, 16)).astype(np.float32)
    w_t = rng.standard_normal(16)
    arousal = np.clip(3.0 + 1.6 * np.abs(a) + 0.15 * rng.standard_normal(n), 1.0, 7.0)  # on the 1–7 scale
    valence = 4 + 2.2 * np.tanh(text @ w_t / 4) + 0.2 * rng.standard_normal(n)
    dominance = 3.5 + 0.8 * np.abs(a) + 0.6 * np.tanh(text[:, :4].sum(1) / 2) + 0.2 * rng.standard_normal(n)
    root.mkdir(parents=True, exist_ok=True)
    ids = [f"utt_{i:04d}.wav" for i in range(n)]
    split = np.where(np.arange(n) < 0.6 * n, "Train", np.where(np.arange(n) < 0.85 * n, "Development", "Test1"))
    path = root / "manifest.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "id", "split", "arousal", "valence", "dominance", "emotion", "gender", "speaker"])
        for i in range(n):
            w.writerow([f"audio/{ids[i]}", ids[i], split[i], f"{arousal[i]:.3f}", f"{valence[i]:.3f}",
                        f"{dominance[i]:.3f}", EMOTIONS[i % len(EMOTIONS)] if i % 7 else "N",
                        "Female" if text[i, 0] > 0 else "Male", f"spk{i % 12}"])
    return path, ids, frames, text


def make_frame_store(path: Path, ids, frames: list[np.ndarray], *, chunk_rows: int | None = None,
                     written: np.ndarray | None = None) -> Path:
    """A frame store as `extract --pooling frames` would leave it, with made-up encoder attributes."""
    settings = {"kind": "whisper", "model_id": f"fake/{path.stem}", "revision": "r1", "pooling": "frames"}
    attrs = {"name": path.name.removesuffix(".zarr"), "model_id": settings["model_id"], "revision": "r1",
             "kind": "whisper", "modality": "audio", "pooling": "frames", "settings": settings,
             "fingerprint": fingerprint(settings)}
    lengths = np.array([len(f) for f in frames])
    written = np.ones(len(ids), dtype=bool) if written is None else written
    t_max, dim = int(lengths.max()) + 3, frames[0].shape[1]  # room the clips do not use, as in a real store
    store = FeatureStore.create(path, list(ids), (t_max, dim), attrs, chunk_rows=chunk_rows or len(ids), frames=True)
    for c in range(store.n_chunks):
        start, end = store.chunk_bounds(c)
        block = np.zeros((end - start, t_max, dim), dtype=np.float32)
        for i in range(start, end):
            block[i - start, : lengths[i]] = frames[i]
        store.write_chunk(c, block.astype(np.float16), written[start:end], ~written[start:end],
                          frames=lengths[start:end])
    return path


# --------------------------------------------------------------------------- a finished run's files, made by hand


def history_rows(epochs: int, *, speaker: bool = True) -> list[dict]:
    rows = []
    for e in range(1, epochs + 1):
        dev = {"arousal": 0.3 + 0.05 * e, "valence": 0.2 + 0.04 * e, "dominance": 0.25 + 0.03 * e}
        dev["mean"] = float(np.mean(list(dev.values())))
        rows.append({"epoch": e, "seconds": 1.0, "eval_seconds": 0.1, "loss_total": 1.5 / e, "loss_ccc": 1.0 / e,
                     "loss_gender": 0.4 / e, "loss_speaker": 0.1 / e if speaker else 0.0,
                     **{f"dev_ccc_{k}": v for k, v in dev.items()},
                     **{f"dev_balanced_ccc_{k}": v - 0.02 for k, v in dev.items()},
                     "dev_gender_accuracy": 0.8, "dev_gender_macro_f1": 0.79})
    return rows


def make_run(path: Path, epochs: int = 6, best_epoch: int = 4, speaker: bool = False) -> Path:
    """A finished run's files as a finished train-heads run leaves them (no weights: plots need none)."""
    path.mkdir(parents=True)
    history = history_rows(epochs, speaker=speaker)
    atomic.write_csv_atomic(path / layout.HISTORY, list(history[0]), [list(r.values()) for r in history])
    atomic.write_json_atomic(path / layout.METRICS, {"split": "Development", "best_epoch": best_epoch})
    atomic.write_json_atomic(path / layout.CONFIG, {"format": layout.RUN_FORMAT, "format_version": 1,
                                                "best_epoch": best_epoch, "gender_labels": ["Female", "Male"]})
    return path


# --------------------------------------------------------------------------- speakers


def speaker_corpus(root: Path, speakers: int = 12, per_speaker: int = 12) -> tuple[Path, list[str], list[str]]:
    """A manifest whose utterances have speakers, plus some of unknown speaker."""
    root.mkdir(parents=True, exist_ok=True)
    ids, labels = [], []
    for s in range(speakers):
        for k in range(per_speaker - (s == 0) * (per_speaker - 3)):  # speaker 0 has only 3
            ids.append(f"s{s:02d}_{k:02d}.wav")
            labels.append(f"spk{s:02d}")
    for k in range(15):
        ids.append(f"unknown_{k:02d}.wav")
        labels.append("Unknown" if k % 2 else "")
    path = root / "manifest.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "id", "split", "arousal", "valence", "dominance", "emotion", "gender", "speaker"])
        for uid, spk in zip(ids, labels):
            w.writerow([f"audio/{uid}", uid, "Train", "4", "4", "4", "N", "Female", spk])
    return path, ids, labels


def speaker_store(path: Path, ids: list[str], labels: list[str], *, separated: bool, shape=(32,), seed=0,
                  frames: bool = False) -> Path:
    """Vectors near a per-speaker centre (separated) or pure noise."""
    rng = np.random.default_rng(seed)
    dim = shape[-1]
    centres = {s: rng.normal(0, 3, dim) for s in sorted(set(labels))}
    base = np.stack([centres[s] if separated else np.zeros(dim) for s in labels])
    feats = (base[:, None, :] if len(shape) == 2 else base) + rng.normal(0, 1, (len(ids), *shape))
    written = np.ones(len(ids), dtype=bool)
    attrs = {"name": path.stem, "kind": "whisper", "modality": "audio", "settings": {}}
    store = FeatureStore.create(path, ids, shape, attrs, chunk_rows=64, frames=frames)
    for chunk in range(store.n_chunks):
        start, end = store.chunk_bounds(chunk)
        if frames:
            counts = np.full(end - start, shape[0], dtype=np.int32)
            store.write_chunk(chunk, feats[start:end].astype(np.float16), written[start:end], ~written[start:end],
                              frames=counts)
        else:
            store.write_chunk(chunk, feats[start:end].astype(np.float16), written[start:end], ~written[start:end])
    return path


# --------------------------------------------------------------------------- on mini-podcast


def check_multimodal(scores: dict, audio: str, text: str, both: str, timing: str) -> None:
    """On mini-podcast: the multimodal run beats each modality, and each modality carries what the
    corpus puts in it (arousal in the audio, valence in the text)."""
    table = "\n".join(f"{k:>12}: " + " ".join(f"{a[:3]} {v:.3f}" for a, v in s.items()) for k, s in scores.items())
    print(f"\nmini-podcast Development CCC ({timing})\n{table}")
    mean = scores[both]["mean"]
    assert mean > scores[audio]["mean"] + 0.05 and mean > scores[text]["mean"] + 0.05, table
    assert scores[audio]["arousal"] > scores[text]["arousal"], table
    assert scores[text]["valence"] > scores[audio]["valence"], table
    assert mean > 0.4, table
