"""The Python API for notebooks: read a store, join stores with a corpus's labels, predict with a run.

Three names cover what the commands do to files, in memory instead (docs/python.md):

    open_store(path)                   a read-only view of one feature store (ids, features or frames)
    load_features(stores, data, ...)   stores joined with a corpus's labels: the rows train-heads uses
    Predictor.from_run(run_dir)        a trained run on audio files or waveforms, as `ser-cache predict`

Nothing here computes differently from the commands: `load_features` keeps the rows `load_rows`
keeps (labelled, features written in every store), and `Predictor.predict` goes through the very
functions `ser-cache predict` uses on bare files (`gather_features(..., use_stores=False)`,
`run_model`), so its numbers are the command's. Waveforms become WAV files in a temporary folder
first: the encoders' decoding, batching and cropping read files, a float32 WAV gives back exactly
the samples written, and integer PCM (int16 from `scipy.io.wavfile.read`) is written as the PCM
WAV it came from, so it is scaled exactly as that file would be.
"""

from __future__ import annotations

import csv
import json
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

__all__ = ["Dataset", "Predictor", "Store", "load_features", "open_store"]

SAMPLE_RATE = 16_000  # what the encoders take; other rates are resampled as files are
AVD_COLUMNS = ("arousal", "valence", "dominance")  # the run's outputs, in order
GENDER_COLUMN = "gender"
GENDER_PROB_PREFIX = "gender_prob_"
CLASS_COLUMN = "emotion"  # a class run's most probable code (Task 1)
CLASS_PROB_PREFIX = "emotion_prob_"


# --------------------------------------------------------------------------- one store


class Store:
    """A read-only view of a feature store (`ser-cache extract`); each array is read on first use.

    `features` (pooled stores) is (N, *shape) float16 in store order, rows not written are zeros;
    `frames` (frame stores) is a frames.Frames whose row i holds the valid frames of store row i
    (none for a row not written). `written` says which rows hold features.
    """

    def __init__(self, path: str | Path):
        from ser_cache.features.store import FeatureStore

        self.path = Path(path)
        self._store = FeatureStore.open(self.path)
        self._checked = False

    def __repr__(self) -> str:
        kind = "frames" if self.is_frames else "pooled"
        return f"Store({str(self.path)!r}, {len(self)} rows, {kind} {self.shape})"

    def __len__(self) -> int:
        return self._store.n_rows

    def _readable(self):
        """The store, once it is known to be readable: not being written, no written row's chunk lost."""
        if not self._checked:
            self._store.check_readable()
            self._checked = True
        return self._store

    @cached_property
    def attrs(self) -> dict:
        return self._store.attrs

    @property
    def name(self) -> str:
        from ser_cache.features.store_ref import store_name

        return store_name(self.path, self.attrs)

    @property
    def is_frames(self) -> bool:
        return self._store.is_frames

    @property
    def shape(self) -> tuple[int, ...]:
        """One row's shape: (D,), (L, D) per layer, or (T, D) for a frame store (T the most frames a row can have)."""
        return self._store.feature_shape

    @cached_property
    def ids(self) -> np.ndarray:
        return self._store.ids()

    @cached_property
    def written(self) -> np.ndarray:
        return self._readable().flags()[0]

    @cached_property
    def features(self) -> np.ndarray:
        if self.is_frames:
            raise AttributeError(f"{self.path}: a frame store; its rows are in .frames (a Frames), not .features")
        ids, feats, written = self._readable().read()
        self.__dict__.setdefault("ids", ids)  # read in the same pass: fill the other caches too
        self.__dict__.setdefault("written", written)
        return feats

    @cached_property
    def frames(self):
        if not self.is_frames:
            raise AttributeError(f"{self.path}: a pooled store; its rows are in .features, not .frames")
        return self._readable().read_frames()[1]


def open_store(path: str | Path) -> Store:
    """A read-only view of the feature store at `path` (see Store)."""
    return Store(path)


# --------------------------------------------------------------------------- stores joined with labels


@dataclass
class Dataset:
    """The kept rows of a corpus joined with feature stores, in the corpus's order (sorted by id).

    Per-row arrays all have one entry per kept row; `features` maps each store's name to an
    (n, *shape) float16 array (pooled store) or a frames.Frames (frame store). `counts` says how
    many corpus rows there were and why the others were dropped.
    """

    ids: np.ndarray  # (n,) str
    splits: np.ndarray  # (n,) str
    avd: np.ndarray  # (n, 3) float32: arousal, valence, dominance (NaN where unlabelled, labelled=False)
    emotions: np.ndarray  # (n,) object: the corpus's emotion code, None where it has none
    genders: np.ndarray  # (n,) object, None where unknown
    speakers: np.ndarray  # (n,) object, None where unknown
    features: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.ids.size)

    def subset(self, rows) -> Dataset:
        """The rows `rows` (a boolean mask or indices), e.g. `ds.subset(ds.splits == "Train")`."""
        rows = np.asarray(rows)
        idx = np.flatnonzero(rows) if rows.dtype == bool else rows.astype(np.int64)
        feats = {k: v.subset(idx) if hasattr(v, "subset") else v[idx] for k, v in self.features.items()}
        return Dataset(ids=self.ids[idx], splits=self.splits[idx], avd=self.avd[idx], emotions=self.emotions[idx],
                       genders=self.genders[idx], speakers=self.speakers[idx], features=feats,
                       counts={**self.counts, "kept_rows": int(idx.size)})


def load_features(stores: str | Path | Sequence[str | Path], data: str | Path,
                  splits: Sequence[str] = ("Train", "Development"), *, labelled: bool = True) -> Dataset:
    """The rows of `splits` of corpus `data` that have features in every store, with their labels.

    The join train-heads makes (rows.load_rows), over any splits: rows are matched by utterance
    id; a row without features in some store (extraction failed; a frame row with no frame) or,
    with `labelled` (the default), without an arousal, valence or dominance label is dropped and
    counted in `counts` (`not_written[<store>]`, `unlabelled`). `labelled=False` keeps unlabelled
    rows (Test3) with NaN labels. A store that lacks a row of the splits is an error, as in training.
    """
    from ser_cache.data.corpus import load_corpus
    from ser_cache.features.errors import StoreError
    from ser_cache.features.store import FeatureStore
    from ser_cache.features.store_ref import StoreRef

    paths = [Path(stores)] if isinstance(stores, (str, Path)) else [Path(s) for s in stores]
    if not paths:
        raise ValueError("load_features: give at least one store")
    splits = [splits] if isinstance(splits, str) else list(splits)
    utts = load_corpus(data, splits)
    ids = [u.id for u in utts]
    counts: dict = {"corpus_rows": len(utts)}
    usable = np.ones(len(utts), dtype=bool)
    joined = []  # (name, store, store row of each utterance)
    names: dict[str, Path] = {}
    for path in paths:
        store = FeatureStore.open(path)
        ref = StoreRef.of(path, store.attrs, store.feature_shape)
        name = ref.name
        if name in names:
            raise StoreError(f"stores {names[name]} and {path} are both named '{name}'; extract one with --name")
        names[name] = path
        store.check_readable()  # not being written; no written row's chunk lost (read as zeros otherwise)
        written = store.flags()[0]
        if store.is_frames:
            written = written & (store.frame_counts() > 0)  # a row with no frame has nothing to pool
        rows, ok = ref.join(store.ids(), written, ids, error=StoreError, splits_hint=f"split(s) {', '.join(splits)}")
        counts[f"not_written[{name}]"] = int((~ok).sum())
        usable &= ok
        joined.append((name, store, rows))

    avd = np.array([[math.nan if v is None else v for v in u.avd] for u in utts], dtype=np.float64).reshape(-1, 3)
    has_labels = np.isfinite(avd).all(axis=1)
    counts["unlabelled"] = int((~has_labels).sum())
    keep = np.flatnonzero(usable & has_labels if labelled else usable)
    counts["kept_rows"] = int(keep.size)

    features: dict = {}
    for name, store, rows in joined:
        if store.is_frames:
            features[name] = store.read_frames(rows[keep])[1]  # whole chunks, kept rows only
        else:
            features[name] = store.read()[1][rows[keep]]
    kept = [utts[i] for i in keep]
    return Dataset(
        ids=np.array([u.id for u in kept], dtype=str),
        splits=np.array([u.split for u in kept], dtype=str),
        avd=avd[keep].astype(np.float32),
        emotions=np.array([u.emotion for u in kept], dtype=object),
        genders=np.array([u.gender for u in kept], dtype=object),
        speakers=np.array([u.speaker for u in kept], dtype=object),
        features=features,
        counts=counts,
    )


# --------------------------------------------------------------------------- a trained run


class Predictor:
    """A trained run (`train-heads`, `finetune wavlm`, or an imported one) ready to predict.

    Build it with `Predictor.from_run(run_dir)`. `predict` computes every input with the encoders
    recorded in the run, as `ser-cache predict` does for bare audio files, and gives the same numbers.
    """

    def __init__(self, run_dir: Path, model, config: dict, device: str):
        self.run_dir = Path(run_dir)
        self.model = model
        self._encoders: dict = {}  # the run's input encoders, loaded on the first predict and kept
        self.config = config
        self.device = device

    def __repr__(self) -> str:
        return f"Predictor({str(self.run_dir)!r}, inputs={self.input_names}, device={self.device!r})"

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "cpu") -> Predictor:
        """Load the run's model (heads, or the whole fine-tuned model) on `device` ("cpu", "cuda", "auto")."""
        from ser_cache.runs.predict import load_model

        model, config = load_model(Path(run_dir))
        return cls(Path(run_dir), model, config, device)

    @property
    def input_names(self) -> list[str]:
        return [r["name"] for r in self.config.get("inputs", [])]

    @property
    def text_inputs(self) -> list[str]:
        """The run's inputs computed from text: `predict` needs `texts` when there are any."""
        return [r["name"] for r in self.config.get("inputs", []) if r.get("modality") == "text"]

    @property
    def gender_labels(self) -> list[str]:
        return list(self.config.get("gender_labels") or [])

    @property
    def classes(self) -> list[str]:
        """A class run's emotion codes in its heads' order (Task 1; docs/categorical.md); [] otherwise."""
        from ser_cache.runs.predict import run_classes

        return list(run_classes(self.config))

    @cached_property
    def scores(self) -> dict:
        """The run's metrics.json (Development scores of the kept epoch); {} for a run without one."""
        from ser_cache.runs.layout import METRICS

        path = self.run_dir / METRICS
        return json.loads(path.read_text()) if path.is_file() else {}

    @cached_property
    def history(self) -> list[dict]:
        """history.csv, one dict per epoch, numbers as numbers (None where empty); [] without one."""
        from ser_cache.runs.layout import HISTORY

        path = self.run_dir / HISTORY
        if not path.is_file():
            return []
        with open(path, newline="", encoding="utf-8") as f:
            return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]

    def predict(self, inputs, texts: Sequence[str] | None = None, *, sample_rate: int = SAMPLE_RATE) -> dict:
        """Predict audio files (paths) or mono waveforms (1-D numpy arrays at `sample_rate`), or a mix.

        A waveform is float samples in [-1, 1], or integer PCM as `scipy.io.wavfile.read` gives it
        (int16, int32, 8-bit), scaled as a WAV file of that format is (int16 / 32768, ...).

        `texts`: one transcript per input, required when the run has a text input (`text_inputs`)
        and refused otherwise. Returns numpy columns, one row per input, in order: "arousal",
        "valence", "dominance" (float64, the labels' scale), and where the run has a gender head
        "gender" (the most probable label) and "gender_prob_<label>" for each of `gender_labels`.
        A class run (`classes`) also gives "emotion" (the most probable code) and "emotion_prob_<code>"
        for each of `classes`; a categorical run gives no arousal/valence/dominance.
        """
        from ser_cache.data.records import Utterance
        from ser_cache.runs.gather import gather_features
        from ser_cache.runs.predict import run_model

        _check_sample_rate(sample_rate)
        if isinstance(inputs, np.ndarray) and inputs.ndim != 1:
            raise ValueError(f"predict: an array of shape {inputs.shape}; pass one mono waveform (1-D) or a list of "
                             "them")
        items = [inputs] if isinstance(inputs, (str, Path, np.ndarray)) else list(inputs)
        if not items:
            raise ValueError("predict: no inputs given")
        texts = self._check_texts(texts, len(items))
        with tempfile.TemporaryDirectory(prefix="ser-cache-waves-") as tmp:
            paths = [_audio_path(x, i, Path(tmp), sample_rate) for i, x in enumerate(items)]
            # Ids only name rows in messages here (no store is consulted), so the position keeps them
            # unique even when two files share a name.
            utts = [Utterance(id=f"{i}:{p.name}", path=p, text=None if texts is None else texts[i])
                    for i, p in enumerate(paths)]
            arrays, sources = gather_features(self.config, utts, run_dir=self.run_dir, device=self.device,
                                              use_stores=False, encoders=self._encoders)
            avd, probs, class_probs = run_model(self.model, self.config, utts, arrays, sources, device=self.device,
                                                run_dir=self.run_dir)
        out = {} if avd is None else {name: avd[:, j].copy() for j, name in enumerate(AVD_COLUMNS)}
        if probs is not None and self.gender_labels:
            out[GENDER_COLUMN] = np.array(self.gender_labels, dtype=object)[probs.argmax(1)]
            for j, label in enumerate(self.gender_labels):
                out[f"{GENDER_PROB_PREFIX}{label}"] = probs[:, j].copy()
        classes = self.classes
        if class_probs is not None and classes:
            out[CLASS_COLUMN] = np.array(classes, dtype=object)[class_probs.argmax(1)]
            for j, code in enumerate(classes):
                out[f"{CLASS_PROB_PREFIX}{code}"] = class_probs[:, j].copy()
        return out

    def _check_texts(self, texts, n: int) -> list[str] | None:
        wanted = self.text_inputs
        if texts is None:
            if wanted:
                raise ValueError(f"run {self.run_dir} has the text input(s) {', '.join(wanted)}: "
                                 f"pass texts=[...], one transcript per input ({n})")
            return None
        if isinstance(texts, str):
            texts = [texts]
        if not wanted:
            raise ValueError(f"run {self.run_dir} has no text input (its inputs: "
                             f"{', '.join(self.input_names) or 'audio'}); "
                             "leave texts out")
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                # str() would turn a missing value into the words "None" or "nan" and encode them.
                raise ValueError(f"predict: texts[{i}] is {t!r}, not a str; every input needs its transcript "
                                 "(a missing value such as None or NaN cannot be encoded)")
        texts = [t.strip() for t in texts]
        if len(texts) != n:
            raise ValueError(f"predict: {n} input(s) but {len(texts)} text(s); give one transcript per input")
        empty = [i for i, t in enumerate(texts) if not t]
        if empty:
            raise ValueError(f"predict: texts[{empty[0]}] is empty"
                             + (f" (and {len(empty) - 1} more)" if len(empty) > 1 else "")
                             + "; every input needs its transcript")
        return texts


def _audio_path(item, i: int, tmp: Path, sample_rate: int) -> Path:
    """An audio file for one input: a path as it is, a waveform written as a float32 WAV (exact samples)."""
    if isinstance(item, (str, Path)):
        path = Path(item)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such audio file")
        return path
    import soundfile as sf

    x = np.asarray(item)
    if x.ndim != 1 or not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise ValueError(f"input {i}: expected an audio file path or a mono waveform (1-D array of float or "
                         f"integer PCM samples), got {'an array of shape ' + str(x.shape) if x.ndim != 1 else x.dtype}")
    if x.size == 0:
        raise ValueError(f"input {i}: an empty waveform")
    path = tmp / f"{i:06d}.wav"
    if np.issubdtype(x.dtype, np.integer):
        # Written as the PCM WAV it came from, so that decoding scales it exactly as that file's samples.
        samples, subtype = _pcm(x, i)
        sf.write(str(path), samples, int(sample_rate), subtype=subtype)
    else:
        sf.write(str(path), x.astype(np.float32), int(sample_rate), subtype="FLOAT")
    return path


def _pcm(x: np.ndarray, i: int) -> tuple[np.ndarray, str]:
    """(samples, soundfile subtype) of integer PCM: int16 and int32 as they are; 8-bit widened to 16 bits
    (signed int8 by 256; uint8 is a WAV's unsigned 8-bit, centred on 128), which decodes to the same values."""
    if x.dtype == np.int16:
        return x, "PCM_16"
    if x.dtype == np.int32:
        return x, "PCM_32"
    if x.dtype == np.int8:
        return x.astype(np.int16) * 256, "PCM_16"
    if x.dtype == np.uint8:
        return (x.astype(np.int16) - 128) * 256, "PCM_16"
    raise ValueError(f"input {i}: integer samples of type {x.dtype}, which is no PCM format; pass int16, int32 or "
                     "8-bit PCM (as scipy.io.wavfile.read gives them) or float samples in [-1, 1]")


def _check_sample_rate(sample_rate) -> None:
    ok = (isinstance(sample_rate, (int, float, np.integer, np.floating)) and not isinstance(sample_rate, bool)
          and math.isfinite(sample_rate) and sample_rate > 0 and float(sample_rate).is_integer())
    if not ok:
        raise ValueError(f"predict: sample_rate={sample_rate!r}: expected the waveforms' rate in samples per second, "
                         f"a positive whole number (e.g. {SAMPLE_RATE})")


def _number(value: str | None):
    if value is None or value == "":
        return None
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value
