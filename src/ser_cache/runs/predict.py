"""Use a trained run: predict corpus splits or bare audio files, and evaluate on a labelled split.

Where the features come from, per input the run was trained on:
1. the store recorded in the run (or the same-named store in --features-dir), for every utterance
   it holds — after checking that it was built with the settings the run was trained on; a text
   store only for the utterances whose text here is the text its record says it encoded;
2. otherwise the encoder recorded in the run, loaded again with the same settings and run here
   with the very batching, decoding and float16 rounding of `extract`, so a recomputed row equals
   what a store would hold. Text encoders need each utterance's transcript: the corpus's (or a
   `.txt` beside a bare file), or a --transcripts table's where there is none (transcripts.py);
   every row a text encoder will compute is checked for text before any encoder runs.

A fine-tuned run (`finetune wavlm`) has no store for its audio input: its own WavLM, saved whole in
the run, runs here on the audio, and its cached inputs (text, x-vectors) come as above.

A frame input (a run trained on a frame store, `extract --pooling frames`) comes the same two
ways, as frames: the store's rows of the requested utterances, read chunk by chunk
(`read_frames`), and the encoder's frames for the others, held packed (frames.Frames); the run's
ConvPool pools them batch by batch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ser_cache.infra import atomic
from ser_cache.runs import rundir
from ser_cache.features.frames import Frames
from ser_cache.features.store_ref import StoreRef
from ser_cache.data.transcripts import Texts, text_store_ids

log = logging.getLogger(__name__)

class PredictError(Exception):
    """Prediction or evaluation cannot go on as asked; the message names the run, store, file or setting."""


@dataclass
class PredictResult:
    out: Path
    rows: int
    sources: dict[str, str] = field(default_factory=dict)  # input name -> where its features came from
    text: dict | None = None  # Texts.summary(): the text the text inputs were given (None: no text input, no table)


# --------------------------------------------------------------------------- utterances


def has_text_input(config: dict) -> bool:
    return any(r.get("modality") == "text" for r in config.get("inputs", []))


def with_transcripts(utts: list, transcripts: Path | None, prefer: bool = False, *,
                     needed: bool = True) -> tuple[list, Texts | None]:
    """The utterances with the table's text where they have none of their own (or first, `prefer`); see
    transcripts.py. Also which text they carry (None when no text is `needed` and no table is given)."""
    from ser_cache.data.transcripts import TranscriptError, attach, counts, load_table

    if transcripts is None:
        if prefer:
            raise PredictError("--prefer-transcripts: give the table with --transcripts FILE")
        if not needed:
            return utts, None
    try:
        table = None if transcripts is None else load_table(transcripts)
        utts, sources = attach(utts, table, prefer=prefer)
    except TranscriptError as exc:
        raise PredictError(str(exc)) from None
    n = counts(sources)
    if table is not None:
        log.info("text: %d utterance(s) with their own transcript, %d from %s, %d with none",
                 n["corpus"], n["table"], transcripts, n["none"])
    return utts, Texts(table=table, prefer=prefer, sources={u.id: src for u, src in zip(utts, sources)})


def file_utterances(files: Sequence[str | Path], transcripts: Path | None = None, prefer: bool = False, *,
                    needed: bool = True) -> tuple[list, Texts | None]:
    """Bare audio files as utterances: id = file name; text from a `<stem>.txt` beside the file, else from
    the table by file name or stem (the table first with `prefer`)."""
    from ser_cache.data.corpus import Utterance

    utts, seen = [], {}
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise PredictError(f"{path}: no such audio file")
        uid = path.name
        if uid in seen:
            raise PredictError(f"{path} and {seen[uid]} share the file name {uid}, which is the prediction id; "
                               "rename one")
        seen[uid] = path
        utts.append(Utterance(id=uid, path=path, transcript=path.with_suffix(".txt")))
    return with_transcripts(utts, transcripts, prefer, needed=needed)


# --------------------------------------------------------------------------- features


def _load_encoder(record: dict, device: str, run_dir: Path):
    """The run's encoder for an input, refused if it no longer computes what the run was trained on."""
    from ser_cache.features.encode import encoder_for_store

    model = None
    if record.get("in_run"):
        # The run carries this encoder (an imported checkpoint's own Whisper, vox_profile.py): its
        # model_id is a folder inside the run, so the run works wherever it is moved.
        model = str(Path(run_dir) / record["model_id"])
        inside = Path(model).resolve().is_relative_to(Path(run_dir).resolve())
        if not inside or Path(record["model_id"]).is_absolute():  # an edited config.json may not send us elsewhere
            raise PredictError(f"run {run_dir}: its encoder folder {record['model_id']!r} is not a folder inside "
                               "the run; its config.json was edited")
        if not (Path(model) / "config.json").is_file():
            raise PredictError(f"run {run_dir}: its encoder folder {record['model_id']}/ is missing or damaged")
    encoder = encoder_for_store(record, device=device, model=model)
    found = encoder.settings()
    if model is not None:
        found = {**found, "model_id": record["model_id"]}
    diffs = StoreRef.from_record(record).differences(found, keys=sorted(found))
    if diffs:
        raise PredictError(f"the encoder of input '{record['name']}' ({record.get('model_id')}) no longer matches "
                           f"run {run_dir}: {'; '.join(diffs)}")
    return encoder


def _check_transcripts(utts: list, record: dict, texts: Texts | None = None) -> None:
    lacking = [u for u in utts if not (u.read_text() or "").strip()]
    if lacking:
        u = lacking[0]
        more = f" (and {len(lacking) - 1} more)" if len(lacking) > 1 else ""
        if u.transcript is None:
            own = "give it text in the manifest's text column"
        elif u.transcript == u.path.with_suffix(".txt"):
            own = f"put {u.transcript.name} beside the audio"
        else:
            own = f"write {u.transcript}"
        table = texts.table if texts is not None else None
        if table is not None:
            # A table was given: say why it did not serve, not to give one.
            raise PredictError(
                f"{u.path}: no transcript for the text input '{record['name']}'{more}; --transcripts {table.path} "
                f"has no text for it ({table.describe()}); add its row there or {own}"
            )
        raise PredictError(
            f"{u.path}: no transcript for the text input '{record['name']}'{more}; give --transcripts FILE "
            f"(columns FileName or id, and text; `ser-cache transcribe` makes one) or {own}"
        )


def _held_rows(record: dict, utts: list, features_dir: Path | None, use_stores: bool) -> np.ndarray:
    """Which utterances the input's store holds (written rows), from its ids and flags alone."""
    from ser_cache.features.store import FeatureStore, StoreError

    held = np.zeros(len(utts), dtype=bool)
    store_path = StoreRef.from_record(record).located(features_dir)
    if use_stores and record.get("path") and (store_path / "zarr.json").is_file():
        try:
            store = FeatureStore.open(store_path)
            store.check_readable()
            held = _store_rows(store.ids(), store.flags()[0], [u.id for u in utts]) >= 0
        except StoreError as exc:
            raise PredictError(str(exc)) from None
    return held


def _check_text_inputs(config: dict, utts: list, features_dir: Path | None, use_stores: bool,
                       texts: Texts | None = None) -> None:
    """Every row a text encoder will compute has text, checked before any encoder runs: a missing
    transcript must not cost the minutes of an audio encoder first."""
    for record in config["inputs"]:
        if record.get("modality") == "text":
            held = _held_rows(record, utts, features_dir, use_stores)
            _check_transcripts([u for u, h in zip(utts, held) if not h], record, texts)


def gather_features(config: dict, utts: list, *, run_dir: Path, device: str = "auto",
                    features_dir: Path | None = None, use_stores: bool = True,
                    encoders: dict | None = None,
                    texts: Texts | None = None) -> tuple[dict[str, np.ndarray | Frames], dict[str, str]]:
    """Inputs aligned with `utts`, and where each input's rows came from: an (N, *shape) float16
    array per pooled input, a frames.Frames (the N rows' valid frames, packed) per frame input.

    `use_stores=False` computes every row with the encoders: bare files are named by their file
    name only, which a corpus utterance in a store may share without being the same audio.
    `encoders`: a dict the caller keeps between calls (input name → loaded encoder), so that
    repeated calls (api.Predictor in a notebook) load each encoder once; None loads and drops them.
    A text store serves only the rows whose text here is the text they were encoded from
    (transcripts.text_store_ids); `texts` (with_transcripts) names the table in messages.
    """
    from ser_cache.features.store import FeatureStore, StoreError

    _check_text_inputs(config, utts, features_dir, use_stores, texts)
    frame_inputs = config.get("frame_inputs") or {}
    arrays: dict[str, np.ndarray | Frames] = {}
    sources: dict[str, str] = {}
    for record in config["inputs"]:
        name = record["name"]
        source = _FrameRows(record, len(utts)) if name in frame_inputs else _VectorRows(record, len(utts))
        ref = StoreRef.from_record(record)
        store_path = ref.located(features_dir)
        used, refused = [], 0
        if use_stores and record.get("path") and (store_path / "zarr.json").is_file():
            try:
                store = FeatureStore.open(store_path)
                store.check_readable()  # not being written; every written row's chunk on disk
            except StoreError as exc:
                raise PredictError(str(exc)) from None
            ref.check(store_path, store.attrs, run_dir, error=PredictError)
            ids = [u.id for u in utts]
            if record.get("modality") == "text":
                ids, why = text_store_ids(store_path, store.attrs, utts)
                held = _store_rows(store.ids(), store.flags()[0], [u.id for u in utts]) >= 0
                refused = int(sum(h and i is None for h, i in zip(held, ids)))
                if refused:
                    log.info("input '%s': %d row(s) that %s holds are computed from the text given here: %s",
                             name, refused, store_path, why)
            try:
                hits = source.from_store(store, ids)
            except StoreError as exc:  # a chunk that cannot be decoded
                raise PredictError(str(exc)) from None
            if hits:
                used.append(f"store {store_path} ({hits} rows)")
        missing = np.flatnonzero(~source.have)
        if missing.size:
            from ser_cache.features.encode import compute_features

            todo = [utts[i] for i in missing]
            encoder = encoders.get(name) if encoders is not None else None
            if encoder is None:
                encoder = _load_encoder(record, device, run_dir)
                if encoders is not None:
                    encoders[name] = encoder
            settings = record.get("settings", {})
            kwargs = {"max_seconds": float(settings["max_seconds"])} if settings.get("max_seconds") else {}
            computed, errors = compute_features(encoder, todo, device=device, **kwargs)
            if errors:
                shown = "; ".join(f"{uid}: {why}" for uid, why in list(errors.items())[:5])
                raise PredictError(f"input '{name}': {len(errors)} utterance(s) could not be encoded ({shown})")
            source.computed(missing, computed)
            other = f", {refused} of them held by the store with other text" if refused else ""
            used.append(f"encoder {record.get('model_id')} ({missing.size} rows{other})")
            del encoder
        arrays[name] = source.result()
        sources[name] = " + ".join(used)
        log.info("input '%s': %s", name, sources[name])
    return arrays, sources


def _store_rows(store_ids: np.ndarray, written: np.ndarray, ids: list[str]) -> np.ndarray:
    """Store row of each id whose features the store holds; -1 for the others."""
    row_of = {uid: i for i, uid in enumerate(store_ids.tolist())}
    rows = np.array([row_of.get(uid, -1) for uid in ids], dtype=np.int64)
    hit = rows >= 0
    rows[hit] = np.where(written[rows[hit]], rows[hit], -1)
    return rows


class _VectorRows:
    """A pooled input's (N, *shape) float16 rows, from a store or an encoder."""

    def __init__(self, record: dict, n: int):
        from ser_cache.features.store import STORE_DTYPE

        self.name, self.shape = record["name"], tuple(record["feature_shape"])
        self.feats = np.zeros((n, *self.shape), dtype=STORE_DTYPE)
        self.have = np.zeros(n, dtype=bool)

    def from_store(self, store, ids: list[str]) -> int:
        if store.is_frames:
            raise PredictError(f"store {store.path}: a frame store, but the run takes '{self.name}' pooled")
        store_ids, feats, written = store.read()
        rows = _store_rows(store_ids, written, ids)
        hit = rows >= 0
        self.feats[hit] = feats[rows[hit]]
        self.have |= hit
        return int(hit.sum())

    def computed(self, where: np.ndarray, feats) -> None:
        if not isinstance(feats, np.ndarray) or tuple(feats.shape[1:]) != self.shape:
            shape = feats.shape[1:] if isinstance(feats, np.ndarray) else "frames"
            raise PredictError(f"input '{self.name}': the encoder gives features of shape {shape}, "
                               f"the run was trained on {self.shape}")
        self.feats[where] = feats
        self.have[where] = True

    def result(self) -> np.ndarray:
        return self.feats


class _FrameRows:
    """A frame input's rows, packed (frames.Frames): read from a store for the rows it holds (whole
    chunks, `read_frames`), the others from an encoder; put together in the order of the utterances."""

    def __init__(self, record: dict, n: int):
        self.name, self.dim = record["name"], int(record["feature_shape"][-1])
        self.n = n
        self.have = np.zeros(n, dtype=bool)
        self.parts: list[tuple[np.ndarray, Frames]] = []  # (positions among the utterances, their frames)

    def from_store(self, store, ids: list[str]) -> int:
        if not store.is_frames:
            raise PredictError(f"store {store.path}: a pooled store, but the run takes '{self.name}' as frames "
                               "(extract it with --pooling frames)")
        rows = _store_rows(store.ids(), store.flags()[0], ids)
        hit = np.flatnonzero(rows >= 0)
        if hit.size:
            self.parts.append((hit, store.read_frames(rows[hit])[1]))
            self.have[hit] = True
        return int(hit.size)

    def computed(self, where: np.ndarray, frames) -> None:
        if not isinstance(frames, Frames) or frames.dim != self.dim:
            shape = f"({frames.dim},) per frame" if isinstance(frames, Frames) else f"{frames.shape[1:]} pooled"
            raise PredictError(f"input '{self.name}': the encoder gives features {shape}, the run was trained "
                               f"on frames of ({self.dim},)")
        self.parts.append((where, frames))
        self.have[where] = True

    def result(self) -> Frames:
        if len(self.parts) == 1 and np.array_equal(self.parts[0][0], np.arange(self.n)):
            return self.parts[0][1]  # every row from one source, already in order: no copy
        lengths = np.zeros(self.n, dtype=np.int64)
        for where, frames in self.parts:
            lengths[where] = frames.lengths
        out = Frames.empty(lengths, self.dim)
        for where, frames in self.parts:
            for j, i in enumerate(where.tolist()):
                out.set_row(i, frames.row(j))
        return out


def is_finetuned(config: dict) -> bool:
    from ser_cache.system.finetuned import SYSTEM

    return config.get("system") == SYSTEM


def run_model(model, config: dict, utts: list, arrays: dict[str, np.ndarray | Frames], sources: dict[str, str], *,
              device: str = "auto", run_dir: Path | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The run's predictions: its heads on the gathered features, or its fine-tuned model on the audio too;
    every one checked finite and within the run's label range (check_predictions)."""
    if not is_finetuned(config):
        avd, probs = run_heads(model, arrays, device=device)
    else:
        from ser_cache.system.finetuned import AUDIO_INPUT
        from ser_cache.runs.finetuned_run import predict_audio

        sources[AUDIO_INPUT] = f"the run's fine-tuned WavLM on the audio ({len(utts)} rows)"
        arch = config["wavlm"]
        avd, probs = predict_audio(model, utts, arrays, device=device, max_seconds=float(arch["max_seconds"]),
                                   batch_seconds=float(config["train"].get("batch_seconds") or 160.0))
    check_predictions(avd, probs, utts, model, config, run_dir)
    return avd, probs


def check_predictions(avd: np.ndarray, probs: np.ndarray | None, utts: list, model, config: dict,
                      run_dir: Path | None) -> None:
    """Refuse predictions that are not finite or leave the run's label range (and gender probabilities that
    are not finite), naming the run, row and value: the heads map onto that range (paper Eq. 2), so
    anything else is a damaged run, never a prediction."""
    from ser_cache.runs.rundir import AVD_COLUMNS, GENDER_PROB_PREFIX, bad_value, label_range

    bad = bad_value(avd, *label_range(config))
    column = None if bad is None else AVD_COLUMNS[bad[1]]
    if bad is None and probs is not None and not np.isfinite(probs).all():
        i, j = (int(x) for x in np.argwhere(~np.isfinite(probs))[0])
        labels = config.get("gender_labels") or []
        column = f"{GENDER_PROB_PREFIX}{labels[j] if j < len(labels) else j}"
        bad = (i, j, float(probs[i, j]), "not a finite number")
    if bad is None:
        return
    i, _, value, why = bad
    run = f"run {run_dir}" if run_dir is not None else "the run"
    cause = ""
    if why.startswith("not a finite"):
        damaged = [name for name, t in model.state_dict().items() if t.is_floating_point() and not t.isfinite().all()]
        if damaged:
            more = f" and {len(damaged) - 1} more" if len(damaged) > 1 else ""
            cause = f"; its weights hold non-finite values ({damaged[0]}{more}): the run is damaged, train it again"
    elif why.startswith("outside"):
        why += " of the run's config.json"
        cause = "; its config.json or weights were edited or damaged"
    raise PredictError(f"{run}: its {column} prediction for {utts[i].id} (row {i + 1}) is {value}, {why}"
                       f"{cause}; nothing written")


def run_heads(model, arrays: dict[str, np.ndarray | Frames], *,
              device: str = "auto") -> tuple[np.ndarray, np.ndarray | None]:
    """A heads run's predictions: `model` (rundir.load_run's FeatureModel) on the gathered inputs,
    frame inputs padded batch by batch (Frames.take)."""
    import torch

    from ser_cache.system.scoring import infer
    from ser_cache.infra.runtime import resolve_device

    dev = resolve_device(device)
    model.to(dev)
    n = len(next(iter(arrays.values())))

    def fetch(idx):
        return {k: a.take(idx) if isinstance(a, Frames) else torch.from_numpy(a[idx]) for k, a in arrays.items()}

    return infer(model, fetch, n, device=dev)


# --------------------------------------------------------------------------- commands


def predict(run_dir: str | Path, *, data: Path | None = None, splits: Sequence[str] = (),
            files: Sequence[str | Path] = (), transcripts: Path | None = None, out: str | Path,
            device: str = "auto", features_dir: Path | None = None, with_gender: bool = False,
            prefer_transcripts: bool = False) -> PredictResult:
    """Predict corpus splits (`data` + `splits`) or audio `files`; write the challenge CSV to `out`.

    The file has exactly the challenge's columns FileName,EmoAct,EmoVal,EmoDom; `with_gender` adds
    the gender head's label and probabilities (refused for a run without a gender head). Text
    inputs computed here read the corpus's transcripts, and `transcripts` (a table) where there
    are none, or first with `prefer_transcripts`.
    """
    from ser_cache.data.corpus import load_corpus

    run_dir = Path(run_dir)
    model, config = load_model(run_dir)
    if with_gender and not config.get("gender_labels"):
        raise PredictError(f"--with-gender: run {run_dir} has no gender head")
    if files and (data is not None or splits):
        raise PredictError("give either audio files or --data with --split, not both")
    _check_features_dir(features_dir)
    needed = has_text_input(config)
    if files:
        utts, texts = file_utterances(files, transcripts, prefer_transcripts, needed=needed)
    elif data is not None:
        if not splits:
            raise PredictError(f"--data {data}: name the split(s) to predict with --split")
        utts = load_corpus(data, splits)
        if not utts:
            raise PredictError(f"--data {data}: no utterance in split(s) {', '.join(splits)}")
        utts, texts = with_transcripts(utts, transcripts, prefer_transcripts, needed=needed)
    else:
        raise PredictError("nothing to predict: give audio files, or --data with --split")
    arrays, sources = gather_features(config, utts, run_dir=run_dir, device=device, features_dir=features_dir,
                                      use_stores=not files, texts=texts)
    avd, probs = run_model(model, config, utts, arrays, sources, device=device, run_dir=run_dir)
    gender_labels = config.get("gender_labels") or None
    path = rundir.write_predictions(out, [u.id for u in utts], avd, gender_labels=gender_labels if with_gender else None,
                                  gender_probs=probs if with_gender else None)
    return PredictResult(out=path, rows=len(utts), sources=sources, text=None if texts is None else texts.summary())


def evaluate(run_dir: str | Path, data: Path, split: str, *, out: str | Path | None = None, device: str = "auto",
             features_dir: Path | None = None, transcripts: Path | None = None,
             prefer_transcripts: bool = False, plots: Path | None = None) -> dict:
    """Score a run on a labelled split: CCC table, balanced CCC, gender; JSON to `out` or run_dir/eval_<split>.json.

    `transcripts` and `prefer_transcripts` give text inputs their text as in `predict`.
    """
    from ser_cache.data.corpus import load_corpus
    from ser_cache.system.sampling import is_ox
    from ser_cache.system.rows import label_index
    from ser_cache.system.scoring import score

    run_dir = Path(run_dir)
    model, config = load_model(run_dir)
    _check_features_dir(features_dir)
    utts, texts = with_transcripts(load_corpus(data, [split]), transcripts, prefer_transcripts,
                                   needed=has_text_input(config))
    train = config["train"]
    labelled = [u for u in utts if u.has_avd]
    result: dict = {"run": str(run_dir), "data": str(data), "split": split, "unlabelled": len(utts) - len(labelled)}
    if result["unlabelled"]:
        log.info("%d utterance(s) of %s have no arousal/valence/dominance label and are left out",
                 result["unlabelled"], split)
    # O/X Development rows that the run trained on (paper Table 5) must not be scored again.
    if split.lower() == str(train.get("dev_split", "")).lower() and train.get("ox") in ("train+dev", "train+dev-nonox"):
        ox = is_ox(np.array([u.emotion or "" for u in labelled], dtype=object))
        result["trained_on_left_out"] = int(ox.sum())
        labelled = [u for u, o in zip(labelled, ox) if not o]
    if len(labelled) < 2:
        raise PredictError(f"split {split} of {data} has {len(labelled)} labelled utterance(s) to score; "
                           "at least 2 are needed")
    arrays, sources = gather_features(config, labelled, run_dir=run_dir, device=device, features_dir=features_dir,
                                      texts=texts)
    avd, probs = run_model(model, config, labelled, arrays, sources, device=device, run_dir=run_dir)
    target = np.array([u.avd for u in labelled], dtype=np.float64)
    genders = label_index([u.gender for u in labelled], config.get("gender_labels") or [])
    result.update(score(avd, target, [u.emotion or "" for u in labelled],
                        gender_pred=None if probs is None else probs.argmax(1),
                        gender_true=None if probs is None else genders,
                        balanced_trials=int(train.get("balanced_trials", 10)),
                        balanced_per_class=train.get("balanced_per_class"), seed=int(train.get("seed", 0))))
    result["sources"] = sources
    if texts is not None:
        result["text"] = texts.summary([u.id for u in labelled])  # the scored utterances' text, as given here
    target_path = Path(out) if out is not None else run_dir / f"eval_{split}.json"
    atomic.write_json_atomic(target_path, result)
    if plots is not None:
        from ser_cache.runs.score_plots import evaluation_plots

        drawn = evaluation_plots(avd, target, [u.emotion for u in labelled], plots,
                                 gender_true=None if probs is None else genders,
                                 gender_pred=None if probs is None else probs.argmax(1),
                                 gender_labels=config.get("gender_labels") or None, title=f"{run_dir.name} — {split}")
        result["plots"] = [str(p) for p in drawn.paths]
    result["out"] = str(target_path)
    return result


def _check_features_dir(features_dir: Path | None) -> None:
    """A --features-dir that is not a folder would silently send every row to the encoders."""
    if features_dir is not None and not Path(features_dir).is_dir():
        what = "not a folder" if Path(features_dir).exists() else "no such folder"
        raise PredictError(f"--features-dir {features_dir}: {what}; it names the folder the run's stores were "
                           "moved to (leave it out to read them where the run recorded them)")


def load_model(run_dir: Path):
    """(model, config): the FeatureModel of a heads run, or the whole fine-tuned model of a fine-tuned run."""
    try:
        config = rundir.read_config(run_dir)
        if is_finetuned(config):
            from ser_cache.runs.finetuned_run import load_finetuned

            return load_finetuned(run_dir, config), config
        return rundir.load_run(run_dir)
    except rundir.RunError as exc:
        raise PredictError(str(exc)) from None
