"""Average the arousal/valence/dominance predictions of several systems (paper Table 6).

The files must cover exactly the same utterances: an ensemble that silently averaged two
systems on some rows and one on others would not be the system it claims to be. Every value of
every member must be a finite number on the label scale (1-7, the challenge's, unless another is
given): a member's 99 averaged in would give an ensemble value that no system predicted.

Task 1 (`task="categorical"`): the members are class prediction files written with their
probabilities (FileName,EmoClass,prob_<code>...), all for the same classes; the ensemble is the
weighted mean of their probabilities, and its class the one of highest mean probability (a tie
goes to the first of the tied classes in the run's class order, A,S,H,U,F,D,C,N[,O]). Scored, it
reports macro-F1, accuracy and balanced accuracy over the utterances whose label is one of the
classes (O and X have no class under 8 classes), computed with scikit-learn's functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ser_cache.infra.outputs import Input, OutputError, refuse_inputs
from ser_cache.runs import prediction_file
from ser_cache.system.tasks import class_codes

ENSEMBLE_TASKS = ("attributes", "categorical")  # what an ensemble averages: A/V/D values, or class probabilities
DEFAULT_SCALE = (1.0, 7.0)  # the challenge's (and MSP-Podcast's) scale: what a submission is checked against


class EnsembleError(Exception):
    """The prediction files cannot be combined as asked; the message names the file and ids."""


@dataclass
class EnsembleResult:
    out: Path
    rows: int
    weights: list[float]
    scores: dict | None = None  # when --data/--split are given
    members: list[dict] | None = None  # each member's scores, likewise
    plots: list = field(default_factory=list)


def _normalised_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None or len(weights) == 0:
        return [1.0 / n] * n
    if len(weights) != n:
        raise EnsembleError(f"--weights: {len(weights)} weight(s) for {n} prediction file(s); give one per file")
    if any(not np.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise EnsembleError(f"--weights {','.join(map(str, weights))}: expected non-negative numbers with a positive "
                            "sum")
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def _describe(ids: Sequence[str], limit: int = 5) -> str:
    ids = sorted(ids)
    return ", ".join(ids[:limit]) + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def scale_option(text: str) -> tuple[float, float] | None:
    """`--label-scale` ("1 7", "0,1", "none") → (low, high), or None for no range check; as a manifest declares it."""
    from ser_cache.data.records import parse_scale

    return parse_scale(text, "--label-scale")


def _scale_note(scale) -> str:
    if scale is None or tuple(scale) != DEFAULT_SCALE:
        return ""
    return " (a corpus on another scale: --label-scale LOW HIGH)"


def read_member(path: str | Path, scale: tuple[float, float] | None = DEFAULT_SCALE) -> tuple[list[str], np.ndarray]:
    """A member's (ids, (N, 3) values), each value checked finite and on `scale` (None: finite only)."""
    try:
        return prediction_file.read_predictions(path, scale)
    except ValueError as exc:
        note = _scale_note(scale) if "outside the label range" in str(exc) else ""
        if "missing column(s)" in str(exc) and _first_line(path).startswith(
                f"{prediction_file.ID_COLUMN},{prediction_file.CLASS_COLUMN}"):
            note = " (a Task 1 class prediction file: ensemble it with --task categorical)"
        raise EnsembleError(f"{exc}{note}") from None


def _first_line(path: str | Path) -> str:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.readline().strip()
    except (OSError, UnicodeDecodeError):
        return ""


def _check_coverage(path, ids: Sequence[str], ref_path, ref_ids: Sequence[str]) -> None:
    """EnsembleError unless the member `path` has exactly the ids of the first member `ref_path`."""
    ref, theirs = set(ref_ids), set(ids)
    missing, extra = ref - theirs, theirs - ref
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"lacks {len(missing)} id(s) of {ref_path}: {_describe(missing)}")
        if extra:
            parts.append(f"has {len(extra)} id(s) that {ref_path} lacks: {_describe(extra)}")
        raise EnsembleError(f"{path} does not cover the same utterances: {'; '.join(parts)}")


def combine(files: Sequence[str | Path], weights: Sequence[float] | None = None,
            scale: tuple[float, float] | None = DEFAULT_SCALE) -> tuple[list[str], np.ndarray, list[float]]:
    """(ids in the first file's order, weighted mean (N, 3), normalised weights); ids must match exactly,
    and every value be finite and on `scale` (None: finite only)."""
    if len(files) < 2:
        raise EnsembleError(f"an ensemble needs at least 2 prediction files, got {len(files)}")
    w = _normalised_weights(weights, len(files))
    tables = [read_member(f, scale) for f in files]
    ref_path, (ref_ids, _) = files[0], tables[0]
    total = np.zeros((len(ref_ids), 3), dtype=np.float64)
    for path, (ids, values), weight in zip(files, tables, w):
        _check_coverage(path, ids, ref_path, ref_ids)
        position = {uid: i for i, uid in enumerate(ids)}
        total += weight * values[[position[uid] for uid in ref_ids]]
    # Averages of checked values stay on the scale; checked again, as every prediction written is.
    bad = prediction_file.bad_value(total, *(scale or (-np.inf, np.inf)))
    if bad is not None:
        i, j, value, why = bad
        raise EnsembleError(f"the ensemble's {prediction_file.AVD_COLUMNS[j]} of {ref_ids[i]} (row {i + 1}) is "
                            f"{value}, {why}; "
                            "nothing written")
    return list(ref_ids), total, w


def score_predictions(ids: Sequence[str], avd: np.ndarray, data: Path, split: str, *, seed: int = 0) -> dict:
    """CCC table (and balanced CCC where primary emotions exist) of predictions on a labelled split."""
    from ser_cache.data.corpus import load_corpus
    from ser_cache.system.scoring import score

    utts = [u for u in load_corpus(data, [split]) if u.has_avd]
    if len(utts) < 2:
        raise EnsembleError(f"split {split} of {data} has {len(utts)} labelled utterance(s); at least 2 are needed to "
                            "score")
    position = {uid: i for i, uid in enumerate(ids)}
    missing = [u.id for u in utts if u.id not in position]
    if missing:
        raise EnsembleError(f"the predictions lack {len(missing)} labelled utterance(s) of {split}: "
                            f"{_describe(missing)}")
    rows = [position[u.id] for u in utts]
    target = np.array([u.avd for u in utts], dtype=np.float64)
    result = score(avd[rows], target, [u.emotion or "" for u in utts], seed=seed)
    result["split"] = split
    return result


def combine_gender(files: Sequence[str | Path], weights: Sequence[float],
                   ids: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """(labels, (N, G) weighted mean probabilities) over the members that have gender columns.

    Members without them are left out and the others' weights renormalised; the members that have
    them must name the same labels.
    """
    labels, total, mass = None, np.zeros(0), 0.0
    for path, weight in zip(files, weights):
        try:
            found = prediction_file.read_gender_probabilities(path)
        except ValueError as exc:
            raise EnsembleError(str(exc)) from None
        if found is None:
            continue
        their_ids, their_labels, probs = found
        if labels is None:
            labels, total = their_labels, np.zeros((len(ids), len(their_labels)))
        elif their_labels != labels:
            raise EnsembleError(f"--with-gender: {path} has gender labels {their_labels}, another member {labels}")
        position = {uid: i for i, uid in enumerate(their_ids)}
        total += weight * probs[[position[uid] for uid in ids]]
        mass += weight
    if labels is None:
        raise EnsembleError("--with-gender: no member file has gender columns; predict the members with --with-gender")
    return labels, total / mass


def read_class_member(path: str | Path) -> tuple[list[str], np.ndarray, tuple[str, ...]]:
    """A Task 1 member's (ids, (N, C) probabilities, classes); EnsembleError naming it when it is not a
    class prediction file with probabilities."""
    codes_alone = _first_line(path) == f"{prediction_file.ID_COLUMN},{prediction_file.CLASS_COLUMN}"
    try:  # codes alone, of 8 or 9 classes, are read to be refused for having no probabilities
        ids, _, probs, classes = prediction_file.read_class_predictions(path, class_codes(9) if codes_alone else None)
    except ValueError as exc:
        note = ""
        if _first_line(path).startswith(f"{prediction_file.ID_COLUMN},{prediction_file.AVD_COLUMNS[0]}"):
            note = " (an arousal/valence/dominance file: ensemble it without --task categorical)"
        raise EnsembleError(f"{exc}{note}") from None
    if probs is None:
        raise EnsembleError(f"{path} has no probability columns ({prediction_file.CLASS_PROB_PREFIX}<code>): a Task 1 "
                            "ensemble averages the members' class probabilities; predict this member with "
                            "--with-probabilities")
    return ids, probs, classes


def combine_classes(files: Sequence[str | Path], weights: Sequence[float] | None = None
                    ) -> tuple[list[str], list[str], np.ndarray, tuple[str, ...], list[float]]:
    """(ids in the first file's order, winning codes, weighted mean (N, C) probabilities, classes,
    normalised weights) of Task 1 members; each must have probabilities for the same classes and
    cover exactly the same ids. The winning code is the class of highest mean probability, the
    first in the class order on a tie."""
    if len(files) < 2:
        raise EnsembleError(f"an ensemble needs at least 2 prediction files, got {len(files)}")
    w = _normalised_weights(weights, len(files))
    tables = [read_class_member(f) for f in files]
    ref_path, (ref_ids, _, classes) = files[0], tables[0]
    total = np.zeros((len(ref_ids), len(classes)), dtype=np.float64)
    for path, (ids, probs, their_classes), weight in zip(files, tables, w):
        if their_classes != classes:
            raise EnsembleError(f"{path} has probabilities for the classes {','.join(their_classes)}, {ref_path} for "
                                f"{','.join(classes)}; the members must be runs of the same classes")
        _check_coverage(path, ids, ref_path, ref_ids)
        position = {uid: i for i, uid in enumerate(ids)}
        total += weight * probs[[position[uid] for uid in ref_ids]]
    codes = [classes[int(k)] for k in np.argmax(total, axis=1)]  # argmax: the first of tied maxima
    return list(ref_ids), codes, total, classes, w


def score_classes(ids: Sequence[str], codes: Sequence[str], classes: Sequence[str], data: Path, split: str) -> dict:
    """Macro-F1 (over `classes`, a class never predicted nor present scoring 0), accuracy and balanced
    accuracy (mean recall over the classes present) of class predictions on the utterances of
    `split` whose label is one of `classes` (system.metrics.class_metrics, equal to scikit-learn's)."""
    from ser_cache.data.corpus import load_corpus
    from ser_cache.system.metrics import class_metrics

    utts = [u for u in load_corpus(data, [split]) if u.emotion in classes]
    if not utts:
        raise EnsembleError(f"split {split} of {data} has no utterance labelled with one of the classes "
                            f"{','.join(classes)}; nothing to score")
    position = {uid: i for i, uid in enumerate(ids)}
    missing = [u.id for u in utts if u.id not in position]
    if missing:
        raise EnsembleError(f"the predictions lack {len(missing)} labelled utterance(s) of {split}: "
                            f"{_describe(missing)}")
    index = {c: i for i, c in enumerate(classes)}
    scores = class_metrics([index[u.emotion] for u in utts], [index[codes[position[u.id]]] for u in utts], classes)
    return {"macro_f1": scores["macro_f1"], "accuracy": scores["accuracy"],
            "balanced_accuracy": scores["balanced_accuracy"], "n": len(utts), "classes": list(classes),
            "split": split}


def ensemble_classes(files: Sequence[str | Path], *, out: str | Path, weights: Sequence[float] | None = None,
                     data: Path | None = None, split: str | None = None,
                     with_probabilities: bool = False) -> EnsembleResult:
    """Average Task 1 members' class probabilities into `out` (FileName,EmoClass, and the mean
    probabilities with `with_probabilities`); score it, and each member, when `data` and `split` are given."""
    ids, codes, probs, classes, w = combine_classes(files, weights)
    scores = members = None
    if data is not None:
        scores = score_classes(ids, codes, classes, Path(data), split)
        members = []
        for f in files:
            their_ids, their_probs, _ = read_class_member(f)
            their_codes = [classes[int(k)] for k in np.argmax(their_probs, axis=1)]
            members.append(score_classes(their_ids, their_codes, classes, Path(data), split))
    path = prediction_file.write_class_predictions(out, ids, codes, probs if with_probabilities else None,
                                                   classes=classes)
    return EnsembleResult(out=path, rows=len(ids), weights=w, scores=scores, members=members)


def member_inputs(files: Sequence[str | Path]) -> list[Input]:
    """The members as inputs, for the rule that no output replaces one (outputs.py)."""
    return [Input(Path(f), f"the member {f}") for f in files]


def ensemble(files: Sequence[str | Path], *, out: str | Path, weights: Sequence[float] | None = None,
             data: Path | None = None, split: str | None = None, with_gender: bool = False,
             plots: Path | None = None, scale: tuple[float, float] | None = DEFAULT_SCALE,
             task: str = "attributes", with_probabilities: bool = False) -> EnsembleResult:
    """Average prediction files into `out` (the challenge's 4 columns); score it, and each member, when
    `data` and `split` are given. `with_gender`: also average the members' gender probabilities (those
    that have them). `plots`: a folder for the members' and the ensemble's CCC side by side. `scale`:
    the (low, high) every member's value must lie in (default 1-7; None: any finite value).
    `task="categorical"`: Task 1 members instead (ensemble_classes; `scale` does not apply), the
    mean class probabilities written too with `with_probabilities`."""
    if task not in ENSEMBLE_TASKS:
        raise EnsembleError(f"--task {task}: expected attributes (arousal/valence/dominance files) or categorical "
                            "(class files with probabilities)")
    if (data is None) != (split is None):
        raise EnsembleError("--data and --split go together: give both to score the ensemble, or neither")
    if task == "categorical" and with_gender:
        raise EnsembleError("--with-gender averages gender probabilities of attribute files; not with --task "
                            "categorical")
    if task == "categorical" and plots is not None:
        raise EnsembleError("--plots draws the members' CCC; not with --task categorical (the scores are printed)")
    if task != "categorical" and with_probabilities:
        raise EnsembleError("--with-probabilities writes the mean class probabilities of a Task 1 ensemble: give "
                            "--task categorical")
    if plots is not None and data is None:
        raise EnsembleError("--plots draws the members' and the ensemble's scores: give --data and --split too")
    try:
        refuse_inputs(out, "--out", member_inputs(files))
    except OutputError as exc:
        raise EnsembleError(str(exc)) from None
    if task == "categorical":
        return ensemble_classes(files, out=out, weights=weights, data=data, split=split,
                                with_probabilities=with_probabilities)
    ids, avd, w = combine(files, weights, scale)
    scores = score_predictions(ids, avd, Path(data), split) if data is not None else None
    members = [score_predictions(*read_member(f, scale), Path(data), split) for f in files] if data else None
    labels, probs = combine_gender(files, w, ids) if with_gender else (None, None)
    path = prediction_file.write_predictions(out, ids, avd, gender_labels=labels, gender_probs=probs)
    drawn = []
    if plots is not None:
        from ser_cache.runs.score_plots import ensemble_plots

        drawn = ensemble_plots([Path(f).stem for f in files], members, scores, plots).paths
    return EnsembleResult(out=path, rows=len(ids), weights=w, scores=scores, members=members, plots=drawn)
