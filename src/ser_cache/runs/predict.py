"""Use a trained run: predict corpus splits or bare audio files, and evaluate on a labelled split.

The utterances to predict (a corpus's splits, or bare files named by their file name) and their text
(with_transcripts, file_utterances); their features per input, from the run's stores or its encoders
(gather.gather_features); then the run's model on them (run_model: its heads, or a fine-tuned run's own
WavLM on the audio too), every prediction checked finite and within the run's label range; written as
the submission CSV (predict) or scored against the labels (evaluate).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ser_cache.data.transcripts import Texts
from ser_cache.features.frames import Frames
from ser_cache.infra import atomic
from ser_cache.runs import layout, prediction_file, rundir
from ser_cache.runs.errors import PredictError
from ser_cache.runs.gather import gather_features

log = logging.getLogger(__name__)


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
    from ser_cache.data.records import Utterance

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


# --------------------------------------------------------------------------- the model


def is_finetuned(config: dict) -> bool:
    from ser_cache.system.online_kinds import kind_of

    return kind_of(config) is not None


def run_task(config: dict) -> str:
    """What a run learned (system.tasks.TASKS): config.json's "categorical" block names it for a class
    run; every other run learned the attributes."""
    block = config.get("categorical")
    return str(block.get("task") or "attributes") if isinstance(block, dict) else "attributes"


def run_classes(config: dict) -> tuple[str, ...]:
    """A class run's class codes in its heads' order (config.json "categorical"); () for an attribute run."""
    block = config.get("categorical")
    return tuple(str(c) for c in block.get("classes") or ()) if isinstance(block, dict) else ()


def run_model(model, config: dict, utts: list, arrays: dict[str, np.ndarray | Frames], sources: dict[str, str], *,
              device: str = "auto", run_dir: Path | None = None
              ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """The run's predictions: its heads on the gathered features, or its fine-tuned model on the audio too;
    every one checked finite and within the run's label range (check_predictions).

    Returns (avd (N, 3), or None for a categorical run; gender probabilities (N, G) or None; class
    probabilities (N, C) in the order of run_classes, or None for an attribute run)."""
    if not is_finetuned(config):
        avd, probs, class_probs = run_heads(model, arrays, device=device)
    else:
        from ser_cache.runs.finetuned_run import predict_audio
        from ser_cache.system.online_kinds import arch_of, kind_of

        kind = kind_of(config)
        sources[kind.input_name] = f"the run's fine-tuned {kind.label} on the audio ({len(utts)} rows)"
        arch = arch_of(config)
        avd, probs, class_probs = predict_audio(model, utts, arrays, device=device,
                                                max_seconds=float(arch["max_seconds"]),
                                                batch_seconds=float(config["train"].get("batch_seconds") or 160.0),
                                                with_classes=True)
    check_predictions(avd, probs, utts, model, config, run_dir, class_probs=class_probs)
    return avd, probs, class_probs


def check_predictions(avd: np.ndarray | None, probs: np.ndarray | None, utts: list, model, config: dict,
                      run_dir: Path | None, *, class_probs: np.ndarray | None = None) -> None:
    """Refuse predictions that are not finite or leave the run's label range (and gender or class
    probabilities that are not finite), naming the run, row and value: the heads map onto that range
    (paper Eq. 2), so anything else is a damaged run, never a prediction."""
    from ser_cache.runs.prediction_file import (
        AVD_COLUMNS,
        CLASS_PROB_PREFIX,
        GENDER_PROB_PREFIX,
        bad_value,
        label_range,
    )

    bad = None if avd is None else bad_value(avd, *label_range(config))
    column = None if bad is None else AVD_COLUMNS[bad[1]]
    for values, prefix, labels in ((probs, GENDER_PROB_PREFIX, config.get("gender_labels") or []),
                                   (class_probs, CLASS_PROB_PREFIX, run_classes(config))):
        if bad is None and values is not None and not np.isfinite(values).all():
            i, j = (int(x) for x in np.argwhere(~np.isfinite(values))[0])
            column = f"{prefix}{labels[j] if j < len(labels) else j}"
            bad = (i, j, float(values[i, j]), "not a finite number")
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
              device: str = "auto") -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """A heads run's predictions (as run_model's): `model` (rundir.load_run's FeatureModel) on the
    gathered inputs, frame inputs padded batch by batch (Frames.take)."""
    import torch

    from ser_cache.infra.runtime import resolve_device
    from ser_cache.system.scoring import infer

    dev = resolve_device(device)
    model.to(dev)
    n = len(next(iter(arrays.values())))

    def fetch(idx):
        return {k: a.take(idx) if isinstance(a, Frames) else torch.from_numpy(a[idx]) for k, a in arrays.items()}

    return infer(model, fetch, n, device=dev, with_classes=True)


# --------------------------------------------------------------------------- commands


PREDICT_TASKS = ("attributes", "categorical")  # the files a run predicts: Task 2's, Task 1's


def output_task(config: dict, run_dir: Path, task: str | None) -> str:
    """Which file `predict` writes: `task`, or by default the run's task; a `both` run writes the
    attribute file unless asked for `categorical` (docs/categorical.md). A run that did not learn the
    task is refused in one line."""
    learned = run_task(config)
    if task is None:
        return "attributes" if learned == "both" else learned
    if task not in PREDICT_TASKS:
        raise PredictError(f"--task {task}: expected {' or '.join(PREDICT_TASKS)}")
    if learned != "both" and task != learned:
        what = ("arousal/valence/dominance only (no class head)" if learned == "attributes"
                else "the emotion classes only (no attribute heads)")
        raise PredictError(f"--task {task}: run {run_dir} learned {what}; it predicts --task {learned}")
    return task


def predict(run_dir: str | Path, *, data: Path | None = None, splits: Sequence[str] = (),
            files: Sequence[str | Path] = (), transcripts: Path | None = None, out: str | Path,
            device: str = "auto", features_dir: Path | None = None, with_gender: bool = False,
            prefer_transcripts: bool = False, task: str | None = None,
            with_probabilities: bool = False) -> PredictResult:
    """Predict corpus splits (`data` + `splits`) or audio `files`; write the challenge CSV to `out`.

    An attribute run's file has exactly the challenge's columns FileName,EmoAct,EmoVal,EmoDom;
    `with_gender` adds the gender head's label and probabilities (refused for a run without a gender
    head). A categorical run's file is Task 1's FileName,EmoClass (one code per file);
    `with_probabilities` adds a prob_<code> column per class of the run. A `both` run writes either
    (`task`, default attributes: output_task). Text inputs computed here read the corpus's
    transcripts, and `transcripts` (a table) where there are none, or first with `prefer_transcripts`.
    """
    from ser_cache.data.corpus import load_corpus

    run_dir = Path(run_dir)
    model, config = load_model(run_dir)
    if with_gender and not config.get("gender_labels"):
        raise PredictError(f"--with-gender: run {run_dir} has no gender head")
    writes = output_task(config, run_dir, task)
    if writes == "categorical" and with_gender:
        raise PredictError("--with-gender: Task 1's file (FileName,EmoClass) has no gender columns; the gender "
                           "columns go with the attribute file" + (" (--task attributes)"
                                                                   if run_task(config) == "both" else ""))
    if writes == "attributes" and with_probabilities:
        if run_task(config) == "both":
            raise PredictError(f"--with-probabilities: the class probabilities go with Task 1's file; run {run_dir} "
                               "learned both tasks: give --task categorical")
        raise PredictError(f"--with-probabilities: run {run_dir} has no class head (it learned arousal/valence/"
                           "dominance); the prob_<code> columns are Task 1's")
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
    avd, probs, class_probs = run_model(model, config, utts, arrays, sources, device=device, run_dir=run_dir)
    if writes == "categorical":
        classes = run_classes(config)
        codes = [classes[k] for k in class_probs.argmax(1)]
        try:
            path = prediction_file.write_class_predictions(out, [u.id for u in utts], codes,
                                                           class_probs if with_probabilities else None,
                                                           classes=classes)
        except ValueError as exc:
            raise PredictError(f"run {run_dir}: {exc}") from None
        return PredictResult(out=path, rows=len(utts), sources=sources,
                             text=None if texts is None else texts.summary())
    gender_labels = config.get("gender_labels") or None
    path = prediction_file.write_predictions(out, [u.id for u in utts], avd,
                                             gender_labels=gender_labels if with_gender else None,
                                  gender_probs=probs if with_gender else None)
    return PredictResult(out=path, rows=len(utts), sources=sources, text=None if texts is None else texts.summary())


def evaluate(run_dir: str | Path, data: Path, split: str, *, out: str | Path | None = None, device: str = "auto",
             features_dir: Path | None = None, transcripts: Path | None = None,
             prefer_transcripts: bool = False, plots: Path | None = None) -> dict:
    """Score a run on a labelled split: CCC table, balanced CCC, gender; JSON to `out` or run_dir/eval_<split>.json.

    A class run also gets the class scores (system.metrics.class_metrics: macro-F1, accuracy,
    balanced accuracy, per-class precision/recall/F1/support, confusion) as "categorical"; rows
    without one of its classes (O/X under 8 classes) are left out of them and counted
    ("no_class_target"). A categorical run is scored on its classes alone. `transcripts` and
    `prefer_transcripts` give text inputs their text as in `predict`.
    """
    from ser_cache.data.corpus import load_corpus
    from ser_cache.system.rows import label_index
    from ser_cache.system.sampling import is_ox
    from ser_cache.system.scoring import score

    run_dir = Path(run_dir)
    model, config = load_model(run_dir)
    _check_features_dir(features_dir)
    utts, texts = with_transcripts(load_corpus(data, [split]), transcripts, prefer_transcripts,
                                   needed=has_text_input(config))
    if run_task(config) == "categorical":
        return _evaluate_classes(run_dir, model, config, utts, texts, data, split, out=out, device=device,
                                 features_dir=features_dir, plots=plots)
    classes = run_classes(config)
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
    avd, probs, class_probs = run_model(model, config, labelled, arrays, sources, device=device, run_dir=run_dir)
    target = np.array([u.avd for u in labelled], dtype=np.float64)
    genders = label_index([u.gender for u in labelled], config.get("gender_labels") or [])
    class_true = label_index([u.emotion for u in labelled], classes) if classes else None
    result.update(score(avd, target, [u.emotion or "" for u in labelled],
                        gender_pred=None if probs is None else probs.argmax(1),
                        gender_true=None if probs is None else genders,
                        balanced_trials=int(train.get("balanced_trials", 10)),
                        balanced_per_class=train.get("balanced_per_class"), seed=int(train.get("seed", 0)),
                        **({"class_pred": class_probs.argmax(1), "class_true": class_true, "classes": classes}
                           if classes else {})))
    if classes:
        result["no_class_target"] = int((class_true < 0).sum())
        _log_no_class_target(result["no_class_target"], split, classes)
    result["sources"] = sources
    if texts is not None:
        result["text"] = texts.summary([u.id for u in labelled])  # the scored utterances' text, as given here
    target_path = Path(out) if out is not None else run_dir / f"eval_{split}.json"
    atomic.write_json_atomic(target_path, result)
    if plots is not None:
        from ser_cache.runs.score_plots import class_plots, evaluation_plots

        title = f"{run_dir.name} — {split}"
        drawn = evaluation_plots(avd, target, [u.emotion for u in labelled], plots,
                                 gender_true=None if probs is None else genders,
                                 gender_pred=None if probs is None else probs.argmax(1),
                                 gender_labels=config.get("gender_labels") or None, title=title)
        result["plots"] = [str(p) for p in drawn.paths]
        if classes:
            result["plots"] += [str(p) for p in class_plots(result["categorical"], plots, title=title).paths]
    result["out"] = str(target_path)
    return result


def _log_no_class_target(n: int, split: str, classes: Sequence[str]) -> None:
    if n:
        log.info("%d utterance(s) of %s have none of the classes %s (O/X or no code) and are left out of the "
                 "class scores", n, split, ",".join(classes))


def _evaluate_classes(run_dir: Path, model, config: dict, utts: list, texts, data: Path, split: str, *,
                      out, device: str, features_dir: Path | None, plots: Path | None) -> dict:
    """evaluate for a categorical run: the class scores over the rows with one of its classes."""
    from ser_cache.system import metrics
    from ser_cache.system.rows import label_index

    classes = run_classes(config)
    class_true = label_index([u.emotion for u in utts], classes)
    scored = [u for u, k in zip(utts, class_true) if k >= 0]
    result: dict = {"run": str(run_dir), "data": str(data), "split": split,
                    "no_class_target": len(utts) - len(scored)}
    _log_no_class_target(result["no_class_target"], split, classes)
    if not scored:
        raise PredictError(f"split {split} of {data} has no utterance with one of the run's classes "
                           f"{','.join(classes)} to score")
    arrays, sources = gather_features(config, scored, run_dir=run_dir, device=device, features_dir=features_dir,
                                      texts=texts)
    _, probs, class_probs = run_model(model, config, scored, arrays, sources, device=device, run_dir=run_dir)
    result["rows"] = len(scored)
    if probs is not None:
        genders = label_index([u.gender for u in scored], config.get("gender_labels") or [])
        result["gender"] = metrics.gender_metrics(probs.argmax(1), genders)
    result["categorical"] = metrics.class_metrics(class_true[class_true >= 0], class_probs.argmax(1), classes)
    result["sources"] = sources
    if texts is not None:
        result["text"] = texts.summary([u.id for u in scored])
    target_path = Path(out) if out is not None else run_dir / f"eval_{split}.json"
    atomic.write_json_atomic(target_path, result)
    if plots is not None:
        from ser_cache.runs.score_plots import class_plots

        drawn = class_plots(result["categorical"], plots, title=f"{run_dir.name} — {split}")
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
    except layout.RunError as exc:
        raise PredictError(str(exc)) from None
