"""Is variant B better than variant A, or did it draw a luckier seed and test set? A paired bootstrap.

The paper's Tables 3-5 compare single runs whose mean CCCs differ by 0.001-0.03. Two things make
such a difference uncertain: which utterances happen to be in Development, and which seed the run
drew. `paired_bootstrap` resamples both:

- utterances: each resample draws n of the n common Development utterances with replacement, the
  same draw for both variants (paired: an utterance that is hard for one is usually hard for the
  other, and pairing removes that shared difficulty from the comparison);
- seeds: with several seeds per variant, each resample also draws that many seeds with replacement,
  the same seed positions for both variants when they have as many seeds (a sweep gives every
  variant the same seeds, so seed s of both starts from the same initial weights).

The statistic of a resample is the variant's mean CCC (over arousal, valence, dominance, averaged
over the drawn seeds) minus the reference's. Reported: the observed difference (all utterances,
all seeds), the 2.5 and 97.5 percentiles of the resampled differences (a 95 % percentile interval)
and the share of resamples in which the difference is positive.

CCCs of weighted rows are computed from weighted moments: a resample is a vector of counts (how
often each utterance was drawn), so all of a chunk of resamples is a few matrix products instead of
a Python loop over resamples. CCC uses population moments, as metrics.ccc does.

The categorical task's macro-F1 is no moment statistic; `paired_bootstrap_macro_f1` resamples it the
same way (the same kind of draws of utterances and seeds, the same for both variants): a resample's
confusion matrices, every seed's at once, are one np.bincount of the cells (true class, predicted
class) weighted by the resample's counts, and the macro-F1 follows from their diagonals and sums
as metrics.class_metrics computes it (the mean F1 over all the run's classes, 0 for a class never
true and never predicted).
"""

from __future__ import annotations

import numpy as np

__all__ = ["bootstrap_differences", "level_interval", "macro_f1_differences", "macro_f1_interval",
           "paired_bootstrap", "paired_bootstrap_macro_f1", "weighted_ccc", "weighted_macro_f1"]

RESAMPLES = 1000
CHUNK = 100  # resamples whose counts are held at once: 100 × 32k Development rows is 26 MB


def weighted_ccc(truth: np.ndarray, preds: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """CCC of every prediction set under every row weighting.

    truth (n, A), preds (S, n, A), weights (B, n) non-negative (a resample's counts) → (B, S, A).
    With weights of ones it is metrics.ccc of each column. A drawn set on which prediction and
    truth are the same constant has CCC 1 (as metrics.ccc); any other zero denominator cannot occur.
    """
    t = np.asarray(truth, dtype=np.float64)
    p = np.asarray(preds, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if t.ndim != 2 or p.ndim != 3 or p.shape[1:] != t.shape or w.ndim != 2 or w.shape[1] != t.shape[0]:
        raise ValueError(f"expected truth (n, A), preds (S, n, A), weights (B, n); got {t.shape}, {p.shape}, {w.shape}")
    total = w.sum(axis=1)[:, None, None]  # (B, 1, 1)
    # Centre on the unweighted means first: the moments are then small numbers, with no cancellation.
    t = t - t.mean(axis=0)
    p = p - p.mean(axis=1, keepdims=True)
    mean_t = (w @ t)[:, None, :] / total  # (B, 1, A)
    mean_p = np.einsum("bn,sna->bsa", w, p) / total  # (B, S, A)
    var_t = (w @ (t * t))[:, None, :] / total - mean_t**2
    var_p = np.einsum("bn,sna->bsa", w, p * p) / total - mean_p**2
    cov = np.einsum("bn,sna->bsa", w, p * t[None]) / total - mean_p * mean_t
    # The means were moved by different amounts; the squared difference of the true means needs them back.
    shift = (np.asarray(truth, dtype=np.float64).mean(axis=0)[None, None, :]
             - np.asarray(preds, dtype=np.float64).mean(axis=1)[None, :, :])
    denominator = var_p + var_t + (mean_p - mean_t - shift) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        ccc = 2.0 * cov / denominator
    return np.where(denominator > 0, ccc, 1.0)


def bootstrap_differences(truth: np.ndarray, variant: np.ndarray, reference: np.ndarray, counts: np.ndarray,
                          variant_seeds: np.ndarray, reference_seeds: np.ndarray) -> np.ndarray:
    """Resampled differences of mean CCC, for given draws: what `paired_bootstrap` reports on.

    truth (n, A); variant (S_v, n, A) and reference (S_r, n, A) predictions of each seed; counts
    (B, n): how often resample b drew each utterance; variant_seeds (B, k_v) and reference_seeds
    (B, k_r): the seed positions resample b drew. Returns (B,) differences, variant − reference,
    of the mean over attributes and drawn seeds.
    """
    v = weighted_ccc(truth, variant, counts).mean(axis=2)  # (B, S_v): mean CCC of each seed
    r = weighted_ccc(truth, reference, counts).mean(axis=2)
    rows = np.arange(counts.shape[0])[:, None]
    return v[rows, variant_seeds].mean(axis=1) - r[rows, reference_seeds].mean(axis=1)


def paired_bootstrap(truth: np.ndarray, variant: np.ndarray, reference: np.ndarray, *,
                     resamples: int = RESAMPLES, seed: int = 0, confidence: float = 0.95) -> dict:
    """Paired bootstrap of the difference in mean CCC, variant − reference, over utterances and seeds.

    truth (n, A) labels of the n utterances both variants were scored on; variant (S_v, n, A) and
    reference (S_r, n, A) predictions, one set per seed (a 2-D array is one seed). Returns
    {"difference", "ci_low", "ci_high", "share_positive", "resamples", "rows", "confidence"}.
    """
    truth = np.asarray(truth, dtype=np.float64)
    variant, reference = (np.asarray(x, dtype=np.float64) for x in (variant, reference))
    variant, reference = (x[None] if x.ndim == 2 else x for x in (variant, reference))
    n = truth.shape[0]
    _check_draws("CCC", n, resamples, confidence)
    ones = np.ones((1, n))
    observed = float(weighted_ccc(truth, variant, ones).mean() - weighted_ccc(truth, reference, ones).mean())
    return _paired(lambda counts, v_seeds, r_seeds: bootstrap_differences(truth, variant, reference, counts, v_seeds,
                                                                           r_seeds),
                   observed, n, variant.shape[0], reference.shape[0], resamples=resamples, seed=seed,
                   confidence=confidence, chunk=CHUNK)


def _check_draws(statistic: str, n: int, resamples: int, confidence: float) -> None:
    """The checks every paired bootstrap makes of its utterances and draws."""
    if n < 2:
        raise ValueError(f"a bootstrap of {statistic} needs at least 2 common utterances, got {n}")
    if resamples < 1 or not 0 < confidence < 1:
        raise ValueError(f"expected resamples >= 1 and confidence in (0, 1), got {resamples}, {confidence}")


def _paired(differences, observed: float, n: int, s_v: int, s_r: int, *, resamples: int, seed: int,
            confidence: float, chunk: int) -> dict:
    """The resampling both bootstraps share: chunks of draws of utterances (counts) and seed positions,
    the same for both variants; `differences(counts, v_seeds, r_seeds)` gives each resample's Δ."""
    rng = np.random.default_rng(seed)
    diffs = []
    for start in range(0, resamples, chunk):
        b = min(chunk, resamples - start)
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=b)
        v_seeds = rng.integers(0, s_v, size=(b, s_v))
        r_seeds = v_seeds if s_v == s_r else rng.integers(0, s_r, size=(b, s_r))
        diffs.append(differences(counts, v_seeds, r_seeds))
    d = np.concatenate(diffs)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(d, [tail, 100 - tail])
    return {"difference": observed, "ci_low": float(low), "ci_high": float(high),
            "share_positive": float((d > 0).mean()), "resamples": int(resamples), "rows": int(n),
            "confidence": confidence}


# --------------------------------------------------------------------------- macro-F1 (the categorical task)


def weighted_macro_f1(truth: np.ndarray, preds: np.ndarray, weights: np.ndarray, n_classes: int) -> np.ndarray:
    """Macro-F1 of every prediction set under every row weighting.

    truth (n,) class indices in [0, n_classes); preds (S, n) predicted indices; weights (B, n)
    non-negative integers (a resample's counts) → (B, S). With weights of ones it is
    metrics.class_metrics(truth, preds[s], classes)["macro_f1"]: per class F1 = 2·tp / (true +
    predicted), 0 where both are 0, averaged over all n_classes classes.
    """
    t = np.asarray(truth, dtype=np.int64)
    p = np.asarray(preds, dtype=np.int64)
    w = np.asarray(weights, dtype=np.float64)
    if t.ndim != 1 or p.ndim != 2 or p.shape[1] != t.shape[0] or w.ndim != 2 or w.shape[1] != t.shape[0]:
        raise ValueError(f"expected truth (n,), preds (S, n), weights (B, n); got {t.shape}, {p.shape}, {w.shape}")
    c = int(n_classes)
    if t.size and (t.min() < 0 or t.max() >= c or p.min() < 0 or p.max() >= c):
        raise ValueError(f"class indices must lie in [0, {c})")
    b, s = w.shape[0], p.shape[0]
    cells = (np.arange(s)[:, None] * c * c + t[None, :] * c + p)  # (S, n): seed s's cell of each utterance
    keys = (np.arange(b)[:, None, None] * (s * c * c) + cells[None]).ravel()  # (B, S, n)
    confusion = np.bincount(keys, weights=np.broadcast_to(w[:, None, :], (b, s, t.size)).ravel(),
                            minlength=b * s * c * c).reshape(b, s, c, c)  # rows true, columns predicted
    tp = np.diagonal(confusion, axis1=2, axis2=3)
    denominator = confusion.sum(axis=3) + confusion.sum(axis=2)  # true + predicted of each class
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    return f1.mean(axis=2)


def macro_f1_differences(truth: np.ndarray, variant: np.ndarray, reference: np.ndarray, n_classes: int,
                         counts: np.ndarray, variant_seeds: np.ndarray, reference_seeds: np.ndarray) -> np.ndarray:
    """Resampled differences of macro-F1 for given draws (as bootstrap_differences for CCC): (B,),
    variant − reference, each the mean macro-F1 over the drawn seeds."""
    v = weighted_macro_f1(truth, variant, counts, n_classes)
    r = weighted_macro_f1(truth, reference, counts, n_classes)
    rows = np.arange(counts.shape[0])[:, None]
    return v[rows, variant_seeds].mean(axis=1) - r[rows, reference_seeds].mean(axis=1)


def paired_bootstrap_macro_f1(truth: np.ndarray, variant: np.ndarray, reference: np.ndarray, n_classes: int, *,
                              resamples: int = RESAMPLES, seed: int = 0, confidence: float = 0.95) -> dict:
    """Paired bootstrap of the difference in macro-F1, variant − reference, over utterances and seeds.

    truth (n,) the class indices of the n utterances both variants were scored on (every one with a
    class); variant (S_v, n) and reference (S_r, n) predicted indices, one row per seed (a 1-D array
    is one seed). The same draws as paired_bootstrap; returns the same keys."""
    truth = np.asarray(truth, dtype=np.int64)
    variant, reference = (np.asarray(x, dtype=np.int64) for x in (variant, reference))
    variant, reference = (x[None] if x.ndim == 1 else x for x in (variant, reference))
    n = truth.shape[0]
    _check_draws("macro-F1", n, resamples, confidence)
    ones = np.ones((1, n))
    observed = float(weighted_macro_f1(truth, variant, ones, n_classes).mean()
                     - weighted_macro_f1(truth, reference, ones, n_classes).mean())
    s_v, s_r = variant.shape[0], reference.shape[0]
    # A chunk's bincount holds chunk × seeds × n keys: about 4 million at most (32 MB).
    chunk = max(1, min(CHUNK, 4_000_000 // (max(s_v, s_r) * n)))
    return _paired(lambda counts, v_seeds, r_seeds: macro_f1_differences(truth, variant, reference, n_classes,
                                                                          counts, v_seeds, r_seeds),
                   observed, n, s_v, s_r, resamples=resamples, seed=seed, confidence=confidence, chunk=chunk)


# --------------------------------------------------------------------------- the interval of one variant's level


def level_interval(truth: np.ndarray, preds: np.ndarray, *, resamples: int = RESAMPLES, seed: int = 0,
                   confidence: float = 0.95) -> dict:
    """Bootstrap interval of one variant's CCC per attribute (and their mean), over utterances and seeds.

    truth (n, A), preds (S, n, A) (a 2-D array is one seed). Each resample draws n utterances and S
    seeds with replacement (as paired_bootstrap draws them) and takes the CCC of each attribute
    averaged over the drawn seeds. Returns {"level": (A + 1,) observed, "low", "high": (A + 1,),
    "resamples", "rows", "confidence"}, the last column the mean over attributes."""
    truth = np.asarray(truth, dtype=np.float64)
    preds = np.asarray(preds, dtype=np.float64)
    preds = preds[None] if preds.ndim == 2 else preds
    n, s = truth.shape[0], preds.shape[0]
    _check_draws("CCC", n, resamples, confidence)

    def with_mean(x):  # (..., A) -> (..., A + 1)
        return np.concatenate([x, x.mean(axis=-1, keepdims=True)], axis=-1)

    observed = with_mean(weighted_ccc(truth, preds, np.ones((1, n))).mean(axis=1)[0])
    return _interval(lambda counts, drawn: with_mean(
        weighted_ccc(truth, preds, counts)[np.arange(counts.shape[0])[:, None], drawn].mean(axis=1)),
        observed, n, s, resamples=resamples, seed=seed, confidence=confidence)


def macro_f1_interval(truth: np.ndarray, preds: np.ndarray, n_classes: int, *, resamples: int = RESAMPLES,
                      seed: int = 0, confidence: float = 0.95) -> dict:
    """level_interval for macro-F1: truth (n,) and preds (S, n) class indices; "level", "low", "high" floats."""
    truth = np.asarray(truth, dtype=np.int64)
    preds = np.asarray(preds, dtype=np.int64)
    preds = preds[None] if preds.ndim == 1 else preds
    n, s = truth.shape[0], preds.shape[0]
    _check_draws("macro-F1", n, resamples, confidence)
    observed = weighted_macro_f1(truth, preds, np.ones((1, n)), n_classes).mean()
    out = _interval(lambda counts, drawn: weighted_macro_f1(truth, preds, counts, n_classes)[
        np.arange(counts.shape[0])[:, None], drawn].mean(axis=1), np.asarray(observed), n, s, resamples=resamples,
        seed=seed, confidence=confidence)
    return {**out, **{k: float(out[k]) for k in ("level", "low", "high")}}


def _interval(levels, observed: np.ndarray, n: int, s: int, *, resamples: int, seed: int, confidence: float) -> dict:
    """Percentile interval of `levels(counts, drawn seeds)` over resamples drawn in chunks."""
    rng = np.random.default_rng(seed)
    parts = []
    for start in range(0, resamples, CHUNK):
        b = min(CHUNK, resamples - start)
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=b)
        parts.append(levels(counts, rng.integers(0, s, size=(b, s))))
    d = np.concatenate(parts)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(d, [tail, 100 - tail], axis=0)
    return {"level": np.asarray(observed, dtype=np.float64), "low": low, "high": high, "resamples": int(resamples),
            "rows": int(n), "confidence": confidence}
