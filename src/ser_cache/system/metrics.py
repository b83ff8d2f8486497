"""Evaluation metrics for dimensional speech emotion recognition.

The challenge scores arousal, valence and dominance (1-7 scales) with Lin's
concordance correlation coefficient (CCC). Unlike Pearson's r, CCC also
penalises a shift or a rescaling of the predictions, so a model has to get the
level and spread of the ratings right, not just their ranking.

The categorical task (Task 1) is scored by macro-F1 over its classes, with accuracy, balanced
accuracy, per-class precision/recall/F1 and the confusion matrix beside it (:func:`class_metrics`).

Everything here is plain numpy (scikit-learn is imported lazily for the gender F1) so the
module can be used for offline scoring without loading torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

ATTRIBUTES: tuple[str, ...] = ("arousal", "valence", "dominance")

# MSP-Podcast primary-emotion codes: Neutral, Happy, Sad, Angry, Disgust,
# Contempt, Fear, Surprise. "O" (Other) and "X" (no agreement) are not classes
# one can balance on, so they are deliberately absent.
PRIMARY_EMOTIONS: tuple[str, ...] = ("N", "H", "S", "A", "D", "C", "F", "U")


def _as_vector(values: ArrayLike, name: str) -> np.ndarray:
    """Return ``values`` as a finite float64 1-D array or raise a clear error.

    Non-finite values are rejected rather than propagated: a NaN CCC in a
    results table is easy to miss, while an exception points at the bad input.
    """
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def ccc(pred: ArrayLike, target: ArrayLike) -> float:
    """Lin's concordance correlation coefficient between two 1-D sequences.

    Uses population (ddof=0) variances and covariance, as the challenge does::

        CCC = 2 cov(p, t) / (var(p) + var(t) + (mean(p) - mean(t))**2)

    Degenerate case: the denominator is zero only when both inputs are the same
    constant (or differ by amounts whose square underflows). Agreement is then
    perfect but the formula is 0/0, so we return 1.0 if ``pred`` equals
    ``target`` exactly and 0.0 otherwise. A constant prediction against a
    varying target is not degenerate: its covariance is 0, so CCC is 0.

    Raises:
        ValueError: if the inputs are not 1-D, differ in length, hold fewer than
            two values, or contain NaN/inf.
    """
    p = _as_vector(pred, "pred")
    t = _as_vector(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred and target differ in length: {p.size} vs {t.size}")
    if p.size < 2:
        raise ValueError(f"CCC needs at least 2 values, got {p.size}")

    mean_p, mean_t = p.mean(), t.mean()
    dev_p, dev_t = p - mean_p, t - mean_t
    var_p = np.mean(dev_p * dev_p)
    var_t = np.mean(dev_t * dev_t)
    cov = np.mean(dev_p * dev_t)
    denominator = var_p + var_t + (mean_p - mean_t) ** 2
    if denominator == 0.0:
        return 1.0 if np.array_equal(p, t) else 0.0
    return float(2.0 * cov / denominator)


def _as_table(values: ArrayLike, name: str, n_columns: int) -> np.ndarray:
    """Return ``values`` as a float64 (N, n_columns) array or raise."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != n_columns:
        raise ValueError(f"{name} must have shape (N, {n_columns}), got {array.shape}")
    return array


def ccc_table(
    pred: ArrayLike,
    target: ArrayLike,
    attributes: Sequence[str] = ATTRIBUTES,
) -> dict[str, float]:
    """Per-attribute CCC plus their unweighted mean.

    ``pred`` and ``target`` are (N, len(attributes)) arrays whose columns follow
    ``attributes``. The "mean" key is what challenge leaderboards rank by.
    """
    names = tuple(attributes)
    p = _as_table(pred, "pred", len(names))
    t = _as_table(target, "target", len(names))
    if p.shape != t.shape:
        raise ValueError(f"pred and target shapes differ: {p.shape} vs {t.shape}")
    scores = {name: ccc(p[:, j], t[:, j]) for j, name in enumerate(names)}
    scores["mean"] = float(np.mean(list(scores.values())))
    return scores


def balanced_ccc(
    pred: ArrayLike,
    target: ArrayLike,
    emotions: Sequence[str],
    *,
    per_class: int | None = None,
    n_trials: int = 10,
    seed: int = 0,
    classes: Sequence[str] = PRIMARY_EMOTIONS,
    attributes: Sequence[str] = ATTRIBUTES,
) -> dict[str, float]:
    """Emotion-balanced CCC: CCC on class-balanced resamples, averaged.

    MSP-Podcast is dominated by neutral and happy speech, so plain CCC mostly
    rewards getting those right. For checkpoint selection, the IS25 SER
    Challenge winner instead scored each trial on ``per_class`` utterances drawn
    from every primary emotion class present, and averaged the per-attribute
    CCCs over ``n_trials`` such draws.

    Args:
        pred, target: (N, len(attributes)) arrays.
        emotions: N primary-emotion codes; rows whose code is not in
            ``classes`` (e.g. "O", "X") are ignored.
        per_class: rows drawn per class and trial. Defaults to the size of the
            smallest class present, so every draw is without replacement. A
            class with fewer rows than ``per_class`` is drawn with replacement.
        n_trials: number of resamples to average.
        seed: seed for ``numpy.random.default_rng``; the result is a
            deterministic function of the inputs and the seed.
        classes: the codes to balance over.
        attributes: column names, as for :func:`ccc_table`.

    Returns:
        The same keys as :func:`ccc_table`, each averaged over the trials.

    Raises:
        ValueError: on shape mismatches, when no class of ``classes`` is
            present, or when ``per_class``/``n_trials`` are below 1.
    """
    names = tuple(attributes)
    p = _as_table(pred, "pred", len(names))
    t = _as_table(target, "target", len(names))
    codes = np.asarray(list(emotions), dtype=object)
    if not (p.shape[0] == t.shape[0] == codes.shape[0]):
        raise ValueError(
            f"pred, target and emotions differ in length: "
            f"{p.shape[0]}, {t.shape[0]}, {codes.shape[0]}"
        )
    if n_trials < 1:
        raise ValueError(f"n_trials must be at least 1, got {n_trials}")

    members = [np.flatnonzero(codes == code) for code in classes]
    members = [rows for rows in members if rows.size > 0]
    if not members:
        raise ValueError(
            f"no row has a primary emotion in {tuple(classes)}; cannot balance"
        )
    if per_class is None:
        per_class = min(rows.size for rows in members)
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")

    rng = np.random.default_rng(seed)
    trials = []
    for _ in range(n_trials):
        drawn = np.concatenate(
            [
                rng.choice(rows, size=per_class, replace=rows.size < per_class)
                for rows in members
            ]
        )
        trials.append(ccc_table(p[drawn], t[drawn], names))
    return {key: float(np.mean([trial[key] for trial in trials])) for key in trials[0]}


def gender_metrics(pred_labels: ArrayLike, true_labels: ArrayLike) -> dict[str, float]:
    """Accuracy and macro-F1 of the auxiliary gender classifier.

    Rows whose true label is negative (unknown gender, encoded as -1) are
    dropped first. Macro-F1 is reported next to accuracy because the gender
    split of a corpus is rarely even, and accuracy alone hides a classifier
    that favours the majority. If no labelled row remains, both values are
    NaN: there is nothing to score, and NaN shows up in logs without stopping
    a run on a corpus that lacks gender labels.
    """
    pred = np.asarray(pred_labels).ravel()
    true = np.asarray(true_labels).ravel()
    if pred.shape != true.shape:
        raise ValueError(
            f"pred_labels and true_labels differ in length: {pred.size} vs {true.size}"
        )
    known = true >= 0
    if not np.any(known):
        return {"accuracy": float("nan"), "macro_f1": float("nan")}
    pred, true = pred[known], true[known]

    # Lazy import: scikit-learn takes noticeably long to import and only this
    # function needs it.
    from sklearn.metrics import f1_score

    return {
        "accuracy": float(np.mean(pred == true)),
        "macro_f1": float(f1_score(true, pred, average="macro", zero_division=0)),
    }


def confusion_matrix(true: ArrayLike, pred: ArrayLike, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) counts: rows the true class index, columns the predicted one."""
    t = np.asarray(true, dtype=np.int64).ravel()
    p = np.asarray(pred, dtype=np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"true and pred differ in length: {t.size} vs {p.size}")
    for name, values in (("true", t), ("pred", p)):
        if values.size and (values.min() < 0 or values.max() >= n_classes):
            raise ValueError(f"{name} holds a class index outside 0..{n_classes - 1}")
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def class_metrics(true: ArrayLike, pred: ArrayLike, classes: Sequence[str]) -> dict:
    """Scores of a classifier over the classes `classes` (their indices are the labels' values).

    Rows whose true label is negative (no class target: O/X under 8 classes) are left out first.
    - macro_f1: the mean of every class's F1, a class with no true and no predicted row counting 0
      (scikit-learn's f1_score(average="macro", labels=all classes, zero_division=0));
    - accuracy; balanced_accuracy: the mean recall over the classes present among the true labels
      (scikit-learn's balanced_accuracy_score);
    - per_class: {code: precision, recall, f1, support}, 0 where a ratio is 0/0;
    - confusion: rows true, columns predicted, in the order of `classes`.
    With no row left every score is NaN (the confusion matrix all zeros).
    """
    codes = [str(c) for c in classes]
    n = len(codes)
    t = np.asarray(true, dtype=np.int64).ravel()
    p = np.asarray(pred, dtype=np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"true and pred differ in length: {t.size} vs {p.size}")
    known = t >= 0
    t, p = t[known], p[known]
    cm = confusion_matrix(t, p, n)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        return np.divide(num, den, out=np.zeros_like(num), where=den > 0)

    precision, recall = ratio(tp, predicted), ratio(tp, support)
    f1 = ratio(2 * tp, support + predicted)
    rows = int(t.size)
    nan = float("nan")
    return {
        "rows": rows,
        "macro_f1": float(f1.mean()) if rows else nan,
        "accuracy": float(tp.sum() / rows) if rows else nan,
        "balanced_accuracy": float(recall[support > 0].mean()) if rows else nan,
        "classes": codes,
        "per_class": {code: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                             "support": int(support[i])} for i, code in enumerate(codes)},
        "confusion": cm.tolist(),
    }
