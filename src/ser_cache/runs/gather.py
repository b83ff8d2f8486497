"""A run's inputs for given utterances: per input the run was trained on, its features and where they came from.

Where the features come from:
1. the store recorded in the run (or the same-named store in --features-dir), for every utterance
   it holds — after checking that it was built with the settings the run was trained on; a text
   store only for the utterances whose text here is the text its record says it encoded;
2. otherwise the encoder recorded in the run, loaded again with the same settings (the hidden
   states the store keeps included: encode.encoder_for_store) and run here with the very batching,
   decoding and float16 rounding of `extract`, so a recomputed row equals what a store would hold.
   Text encoders need each utterance's transcript: the corpus's (or a `.txt` beside a bare file),
   or a --transcripts table's where there is none (data/transcripts.py); every row a text encoder
   will compute is checked for text before any encoder runs.

A fine-tuned run (`finetune wavlm`) has no store for its audio input: its own WavLM runs on the
audio in predict.run_model; its cached inputs (text, x-vectors) come from here as above.

A frame input (a run trained on a frame store, `extract --pooling frames`) comes the same two
ways, as frames: the store's rows of the requested utterances, read chunk by chunk
(`read_frames`), and the encoder's frames for the others, held packed (frames.Frames); the run's
ConvPool pools them batch by batch. A frame store with a layer axis gives frames of (L, D), as
the store holds them, from either source; or, for a run trained on one position along that axis
(train-heads --layer: the input's record has "layer_position"), the frames of that position.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ser_cache.data.transcripts import Texts, text_store_ids
from ser_cache.features.frames import Frames
from ser_cache.features.store_ref import StoreRef
from ser_cache.runs.errors import PredictError
from ser_cache.system.inputs import LAYER_POSITION

log = logging.getLogger(__name__)


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
    from ser_cache.features.errors import StoreError
    from ser_cache.features.store import FeatureStore

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
    from ser_cache.features.errors import StoreError
    from ser_cache.features.store import FeatureStore

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
        # One frame as the store holds it: (D,), or (L, D) with a layer axis; as the run takes it: the
        # same, or (D,) of one position along that axis.
        self.name, self.stored = record["name"], tuple(int(s) for s in record["feature_shape"][1:])
        self.position = record.get(LAYER_POSITION)
        self.frame_shape = self.stored if self.position is None else self.stored[1:]
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
            at = {} if self.position is None else {"layer": self.position}
            self.parts.append((hit, store.read_frames(rows[hit], **at)[1]))
            self.have[hit] = True
        return int(hit.size)

    def computed(self, where: np.ndarray, frames) -> None:
        if not isinstance(frames, Frames) or frames.frame_shape != self.stored:
            shape = f"{frames.frame_shape} per frame" if isinstance(frames, Frames) else f"{frames.shape[1:]} pooled"
            raise PredictError(f"input '{self.name}': the encoder gives features {shape}, the run was trained "
                               f"on frames of {self.stored}")
        self.parts.append((where, frames if self.position is None else frames.layer(self.position)))
        self.have[where] = True

    def result(self) -> Frames:
        if len(self.parts) == 1 and np.array_equal(self.parts[0][0], np.arange(self.n)):
            return self.parts[0][1]  # every row from one source, already in order: no copy
        lengths = np.zeros(self.n, dtype=np.int64)
        for where, frames in self.parts:
            lengths[where] = frames.lengths
        out = Frames.empty(lengths, self.frame_shape)
        for where, frames in self.parts:
            for j, i in enumerate(where.tolist()):
                out.set_row(i, frames.row(j))
        return out
