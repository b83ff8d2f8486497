"""The paired bootstraps against numbers worked out by hand, and against metrics.ccc and metrics.class_metrics."""

from __future__ import annotations

import numpy as np
import pytest

from ser_cache.system import metrics
from ser_cache.train.stats import (
    bootstrap_differences,
    macro_f1_differences,
    paired_bootstrap,
    paired_bootstrap_macro_f1,
    weighted_ccc,
    weighted_macro_f1,
)

# Three utterances, one attribute. By hand (population moments):
#   truth t = 1 2 3, perfect p = 1 2 3: CCC 1.
#   swapped q = 1 3 2: means 2 and 2, var 2/3 and 2/3, cov (1 + 0 + 0)/3 = 1/3, CCC = (2/3)/(4/3) = 1/2.
#   constant c = 2 2 2: cov 0, CCC 0.
# Resample drawing utterances 0, 0, 1 (counts 2 1 0): t = 1 1 2, q = 1 1 3:
#   means 4/3 and 5/3; var_t = 2/9, var_q = 8/9, cov = 4/9; CCC = (8/9) / (2/9 + 8/9 + 1/9) = 8/11.
T = np.array([[1.0], [2.0], [3.0]])
P = np.array([[1.0], [2.0], [3.0]])
Q = np.array([[1.0], [3.0], [2.0]])
C = np.array([[2.0], [2.0], [2.0]])


def test_weighted_ccc_by_hand():
    counts = np.array([[1, 1, 1], [2, 1, 0]])
    got = weighted_ccc(T, np.stack([P, Q, C]), counts)
    assert got.shape == (2, 3, 1)
    assert got[0, :, 0] == pytest.approx([1.0, 0.5, 0.0], abs=1e-12)
    assert got[1, :, 0] == pytest.approx([1.0, 8 / 11, 0.0], abs=1e-12)


def test_weighted_ccc_equals_metrics_ccc_on_every_resample():
    rng = np.random.default_rng(3)
    truth = rng.uniform(1, 7, size=(40, 3))
    preds = truth[None] * 0.5 + rng.normal(2, 1, size=(4, 40, 3))
    counts = rng.multinomial(40, np.full(40, 1 / 40), size=5)
    got = weighted_ccc(truth, preds, counts)
    for b in range(5):
        rows = np.repeat(np.arange(40), counts[b])
        for s in range(4):
            for a in range(3):
                assert got[b, s, a] == pytest.approx(metrics.ccc(preds[s, rows, a], truth[rows, a]), abs=1e-12)


def test_bootstrap_differences_by_hand():
    # Variant seeds (P, Q), reference seeds (C, C). Resample 0: every utterance once, seeds 0 and 1:
    # (1 + 1/2)/2 - 0 = 3/4. Resample 1: utterances 0 0 1, seed 1 twice: 8/11 - 0.
    counts = np.array([[1, 1, 1], [2, 1, 0]])
    seeds = np.array([[0, 1], [1, 1]])
    d = bootstrap_differences(T, np.stack([P, Q]), np.stack([C, C]), counts, seeds, seeds)
    assert d == pytest.approx([0.75, 8 / 11], abs=1e-12)


def test_paired_bootstrap_of_a_perfect_against_a_constant_predictor():
    """Every resample with two distinct labels gives 1 - 0; the share positive is then 1."""
    truth = np.arange(1.0, 31.0).reshape(-1, 1).repeat(3, axis=1)
    result = paired_bootstrap(truth, truth.copy(), np.full_like(truth, 4.0), resamples=200, seed=1)
    assert result["difference"] == pytest.approx(1.0)
    assert result["ci_low"] == pytest.approx(1.0) and result["ci_high"] == pytest.approx(1.0)
    assert result["share_positive"] == 1.0 and result["rows"] == 30 and result["resamples"] == 200


def test_paired_bootstrap_of_a_variant_against_itself_is_zero_everywhere():
    rng = np.random.default_rng(0)
    truth = rng.uniform(1, 7, size=(50, 3))
    pred = truth + rng.normal(0, 1, size=(3, 50, 3))
    result = paired_bootstrap(truth, pred, pred.copy(), resamples=100)
    assert result["difference"] == 0.0 and result["ci_low"] == 0.0 and result["ci_high"] == 0.0
    assert result["share_positive"] == 0.0


def test_paired_bootstrap_interval_covers_the_difference_and_pairs_the_utterances():
    """A variant a little better than the reference on every utterance: pairing makes the interval
    narrow and positive although each variant's own CCC varies much more between resamples."""
    rng = np.random.default_rng(5)
    truth = rng.uniform(1, 7, size=(300, 3))
    noise = rng.normal(0, 1.5, size=(300, 3))
    reference = truth + noise
    variant = truth + 0.9 * noise
    result = paired_bootstrap(truth, variant, reference, resamples=300, seed=2)
    assert 0 < result["ci_low"] < result["difference"] < result["ci_high"]
    assert result["share_positive"] == 1.0
    own = weighted_ccc(truth, variant[None], rng.multinomial(300, np.full(300, 1 / 300), size=300)).mean(axis=2)
    assert result["ci_high"] - result["ci_low"] < (np.percentile(own, 97.5) - np.percentile(own, 2.5)) / 2


def test_paired_bootstrap_is_seeded_and_checks_its_input():
    rng = np.random.default_rng(0)
    truth = rng.uniform(1, 7, size=(20, 3))
    a, b = truth + rng.normal(0, 1, (2, 20, 3))
    assert paired_bootstrap(truth, a, b, seed=4) == paired_bootstrap(truth, a, b, seed=4)
    with pytest.raises(ValueError, match="at least 2"):
        paired_bootstrap(truth[:1], a[:1], b[:1])
    with pytest.raises(ValueError, match="expected truth"):
        weighted_ccc(truth, a, np.ones((1, 20)))


# --------------------------------------------------------------------------- macro-F1 (the categorical task)
# Four utterances, two classes: truth 0 0 1 1, prediction R = 0 1 1 1. By hand:
#   class 0: tp 1, true 2, predicted 1: F1 = 2/3; class 1: tp 2, true 2, predicted 3: F1 = 4/5;
#   macro-F1 = 11/15 (over 3 classes, the third never true nor predicted counts 0: 22/45).
# Resample counts 2 0 1 1 (utterances 0 0 2 3): truth 0 0 1 1, R 0 0 1 1: macro-F1 1.
# Resample counts 0 1 2 0 (utterances 1 2 2): truth 0 1 1, R 1 1 1: class 0 F1 0, class 1 4/5: 2/5.
T1 = np.array([0, 0, 1, 1])
R = np.array([0, 1, 1, 1])
WRONG = np.array([1, 1, 0, 0])  # every utterance wrong: macro-F1 0 on any resample


def test_weighted_macro_f1_by_hand():
    counts = np.array([[1, 1, 1, 1], [2, 0, 1, 1], [0, 1, 2, 0]])
    got = weighted_macro_f1(T1, np.stack([R, T1, WRONG]), counts, 2)
    assert got.shape == (3, 3)
    assert got[:, 0] == pytest.approx([11 / 15, 1.0, 2 / 5], abs=1e-12)
    assert got[:, 1] == pytest.approx([1.0, 1.0, 1.0]) and got[:, 2] == pytest.approx([0.0, 0.0, 0.0])
    assert weighted_macro_f1(T1, R[None], np.ones((1, 4)), 3)[0, 0] == pytest.approx(22 / 45, abs=1e-12)


def test_weighted_macro_f1_equals_class_metrics_on_every_resample():
    rng = np.random.default_rng(7)
    classes = list("ASHUFDCN")
    truth = rng.integers(0, 8, 60)
    preds = np.where(rng.random((4, 60)) < 0.5, truth, rng.integers(0, 8, (4, 60)))
    preds[0, preds[0] == 7] = 3  # seed 0 never predicts N: its F1 is 0 there
    counts = rng.multinomial(60, np.full(60, 1 / 60), size=6)
    got = weighted_macro_f1(truth, preds, counts, 8)
    for b in range(6):
        rows = np.repeat(np.arange(60), counts[b])
        for s in range(4):
            want = metrics.class_metrics(truth[rows], preds[s, rows], classes)["macro_f1"]
            assert got[b, s] == pytest.approx(want, abs=1e-12)


def test_macro_f1_differences_by_hand():
    # Variant seeds (R, T1), reference seeds (WRONG, WRONG). Resample 0: all once, seeds 0 and 1:
    # (11/15 + 1)/2 - 0 = 13/15. Resample 1 (counts 0 1 2 0), seed 0 twice: 2/5 - 0.
    counts = np.array([[1, 1, 1, 1], [0, 1, 2, 0]])
    seeds = np.array([[0, 1], [0, 0]])
    d = macro_f1_differences(T1, np.stack([R, T1]), np.stack([WRONG, WRONG]), 2, counts, seeds, seeds)
    assert d == pytest.approx([13 / 15, 2 / 5], abs=1e-12)


def test_paired_bootstrap_macro_f1_of_a_perfect_against_an_always_wrong_predictor():
    truth = np.arange(40) % 4
    result = paired_bootstrap_macro_f1(truth, truth.copy(), (truth + 1) % 4, 4, resamples=150, seed=1)
    assert result["difference"] == 1.0 and result["ci_low"] == 1.0 and result["ci_high"] == 1.0
    assert result["share_positive"] == 1.0 and result["rows"] == 40 and result["resamples"] == 150


def test_paired_bootstrap_macro_f1_against_itself_is_zero_and_a_better_variant_is_ahead():
    rng = np.random.default_rng(2)
    truth = rng.integers(0, 8, 80)
    pred = np.where(rng.random((3, 80)) < 0.6, truth, rng.integers(0, 8, (3, 80)))
    same = paired_bootstrap_macro_f1(truth, pred, pred.copy(), 8, resamples=100)
    assert (same["difference"], same["ci_low"], same["ci_high"], same["share_positive"]) == (0.0, 0.0, 0.0, 0.0)
    # A variant right on 10 more utterances than the reference: positive, and its interval covers
    # the observed difference, which is the mean over seeds of the two macro-F1s on every utterance.
    better = pred.copy()
    better[:, :10] = truth[:10]
    r = paired_bootstrap_macro_f1(truth, better, pred, 8, resamples=300, seed=3)
    want = np.mean([metrics.class_metrics(truth, better[s], list("ASHUFDCN"))["macro_f1"]
                    - metrics.class_metrics(truth, pred[s], list("ASHUFDCN"))["macro_f1"] for s in range(3)])
    assert r["difference"] == pytest.approx(want, abs=1e-12)
    assert 0 < r["ci_low"] <= r["difference"] <= r["ci_high"] and r["share_positive"] > 0.95
    assert paired_bootstrap_macro_f1(truth, better, pred, 8, resamples=50, seed=9) == \
        paired_bootstrap_macro_f1(truth, better, pred, 8, resamples=50, seed=9)


def test_paired_bootstrap_macro_f1_checks_its_input():
    with pytest.raises(ValueError, match="at least 2"):
        paired_bootstrap_macro_f1(T1[:1], R[:1], R[:1], 2)
    with pytest.raises(ValueError, match=r"class indices must lie in \[0, 2\)"):
        weighted_macro_f1(T1, (R + 1)[None], np.ones((1, 4)), 2)
    with pytest.raises(ValueError, match="expected truth"):
        weighted_macro_f1(T1, R, np.ones((1, 4)), 2)
