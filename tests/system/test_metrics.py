"""Tests for ser_cache.system.metrics, checked against independent formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ser_cache.system.metrics import (
    ATTRIBUTES,
    PRIMARY_EMOTIONS,
    balanced_ccc,
    ccc,
    ccc_table,
    gender_metrics,
)


def pearson_ccc(pred: np.ndarray, target: np.ndarray) -> float:
    """CCC via the Pearson identity 2 rho sd_p sd_t / (var_p + var_t + dmu^2)."""
    rho = np.corrcoef(pred, target)[0, 1]
    sd_p, sd_t = np.std(pred), np.std(target)
    return 2 * rho * sd_p * sd_t / (sd_p**2 + sd_t**2 + (pred.mean() - target.mean()) ** 2)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("n", [2, 7, 100, 1000])
def test_ccc_matches_pearson_identity(seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    target = rng.uniform(1, 7, size=n)
    pred = 0.6 * target + rng.normal(0.5, 0.8, size=n)
    assert ccc(pred, target) == pytest.approx(pearson_ccc(pred, target), abs=1e-12)


def test_ccc_accepts_lists_and_is_symmetric() -> None:
    pred, target = [1.0, 2.0, 4.0, 3.0], [2.0, 2.5, 3.0, 5.0]
    expected = pearson_ccc(np.array(pred), np.array(target))
    assert ccc(pred, target) == pytest.approx(expected, abs=1e-12)
    assert ccc(target, pred) == pytest.approx(expected, abs=1e-12)


def test_ccc_perfect_and_inverted() -> None:
    x = np.random.default_rng(0).normal(4, 1, size=50)
    assert ccc(x, x) == pytest.approx(1.0, abs=1e-12)
    assert ccc(-x, x) < 0
    # Centred data reversed: exactly -1.
    centred = x - x.mean()
    assert ccc(-centred, centred) == pytest.approx(-1.0, abs=1e-12)


def test_ccc_is_not_shift_or_scale_invariant() -> None:
    x = np.random.default_rng(1).normal(4, 1, size=200)
    shifted = x + 1.0
    # Pearson r is still 1, but CCC must drop: var_p = var_t = v, gap 1.
    assert np.corrcoef(shifted, x)[0, 1] == pytest.approx(1.0)
    v = np.var(x)
    assert ccc(shifted, x) == pytest.approx(2 * v / (2 * v + 1.0), abs=1e-12)
    assert ccc(shifted, x) < ccc(x + 0.1, x) < 1.0
    assert ccc(2 * x - x.mean(), x) < 1.0


def test_ccc_degenerate_cases() -> None:
    assert ccc([3.0, 3.0, 3.0], [3.0, 3.0, 3.0]) == 1.0
    # Constant prediction against a varying target: covariance 0.
    assert ccc([4.0, 4.0, 4.0], [1.0, 4.0, 7.0]) == 0.0
    # Different constants: denominator is the squared gap, covariance 0.
    assert ccc([2.0, 2.0], [5.0, 5.0]) == 0.0
    # Differences so small their square underflows to a zero denominator.
    assert ccc([0.0, 0.0], [1e-200, 1e-200]) == 0.0


@pytest.mark.parametrize(
    ("pred", "target", "message"),
    [
        ([1.0, 2.0, 3.0], [1.0, 2.0], "length"),
        ([1.0], [1.0], "at least 2"),
        ([], [], "at least 2"),
        ([1.0, float("nan")], [1.0, 2.0], "NaN"),
        ([1.0, 2.0], [1.0, float("inf")], "NaN or infinite"),
        ([[1.0, 2.0]], [[1.0, 2.0]], "1-D"),
    ],
)
def test_ccc_rejects_bad_input(pred, target, message) -> None:
    with pytest.raises(ValueError, match=message):
        ccc(pred, target)


def test_ccc_table_columns_and_mean() -> None:
    rng = np.random.default_rng(5)
    target = rng.uniform(1, 7, size=(64, 3))
    pred = target * np.array([0.9, 0.3, 0.5]) + rng.normal(0, 0.7, size=(64, 3))
    table = ccc_table(pred, target)
    assert list(table) == [*ATTRIBUTES, "mean"]
    expected = [pearson_ccc(pred[:, j], target[:, j]) for j in range(3)]
    for name, value in zip(ATTRIBUTES, expected):
        assert table[name] == pytest.approx(value, abs=1e-12)
    assert table["mean"] == pytest.approx(sum(expected) / 3, abs=1e-12)


def test_ccc_table_custom_attributes_and_shape_errors() -> None:
    rng = np.random.default_rng(6)
    data = rng.normal(size=(10, 2))
    assert list(ccc_table(data, data, attributes=("a", "v"))) == ["a", "v", "mean"]
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        ccc_table(data, data)
    with pytest.raises(ValueError, match="differ"):
        ccc_table(rng.normal(size=(10, 3)), rng.normal(size=(9, 3)))


def make_imbalanced(seed: int = 0):
    """Predictions that are good on N/H and poor on the rare classes.

    O and X rows are scattered through the data with wild predictions.
    """
    rng = np.random.default_rng(seed)
    counts = {"N": 120, "H": 60, "S": 15, "A": 12, "O": 25, "X": 10}
    emotions = np.array([code for code, k in counts.items() for _ in range(k)])
    rng.shuffle(emotions)
    n = emotions.size
    target = rng.uniform(1, 7, size=(n, 3))
    noise = np.where(np.isin(emotions, ["N", "H"]), 0.3, 2.0)[:, None]
    pred = target + rng.normal(0, 1, size=(n, 3)) * noise
    wild = np.isin(emotions, ["O", "X"])
    pred[wild] = rng.uniform(-50, 50, size=(int(wild.sum()), 3))
    return pred, target, emotions


def test_balanced_ccc_is_deterministic_per_seed() -> None:
    pred, target, emotions = make_imbalanced()
    first = balanced_ccc(pred, target, emotions, seed=3)
    second = balanced_ccc(pred, target, emotions, seed=3)
    assert first == second
    assert list(first) == [*ATTRIBUTES, "mean"]
    other = balanced_ccc(pred, target, emotions, seed=4)
    assert other["mean"] != first["mean"]


def test_balanced_ccc_equals_plain_ccc_on_balanced_data() -> None:
    rng = np.random.default_rng(2)
    emotions = np.repeat(["N", "H", "S", "A"], 25)
    rng.shuffle(emotions)
    target = rng.uniform(1, 7, size=(100, 3))
    pred = target + rng.normal(0, 1, size=(100, 3))
    result = balanced_ccc(pred, target, emotions, per_class=25, n_trials=1, seed=9)
    # Drawing all 25 rows of every class without replacement is a permutation.
    expected = ccc_table(pred, target)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-12)
    # The default per_class is the smallest class size, here also 25.
    default = balanced_ccc(pred, target, emotions, n_trials=1, seed=9)
    for key, value in expected.items():
        assert default[key] == pytest.approx(value, abs=1e-12)


def test_balanced_ccc_ignores_non_primary_rows() -> None:
    pred, target, emotions = make_imbalanced()
    primary = np.isin(emotions, PRIMARY_EMOTIONS)
    with_other = balanced_ccc(pred, target, emotions, seed=1)
    without = balanced_ccc(pred[primary], target[primary], emotions[primary], seed=1)
    assert with_other == without
    # The O/X predictions are garbage, so including them would wreck the score.
    assert with_other["mean"] > 0.3


def test_balanced_ccc_downweights_majority_classes() -> None:
    pred, target, emotions = make_imbalanced()
    primary = np.isin(emotions, PRIMARY_EMOTIONS)
    plain = ccc_table(pred[primary], target[primary])
    balanced = balanced_ccc(pred, target, emotions, n_trials=20)
    # Rare classes are predicted badly; balancing gives them more weight.
    assert balanced["mean"] < plain["mean"] - 0.05


def test_balanced_ccc_oversamples_small_classes_with_replacement() -> None:
    pred, target, emotions = make_imbalanced()
    # A has only 12 rows; asking for 40 per class must still work.
    result = balanced_ccc(pred, target, emotions, per_class=40, n_trials=3)
    assert all(-1.0 <= value <= 1.0 for value in result.values())


def test_balanced_ccc_errors() -> None:
    pred = np.zeros((4, 3))
    with pytest.raises(ValueError, match="no row has a primary emotion"):
        balanced_ccc(pred, pred, ["O", "X", "O", "X"])
    with pytest.raises(ValueError, match="differ in length"):
        balanced_ccc(pred, pred, ["N", "H", "S"])
    with pytest.raises(ValueError, match="n_trials"):
        balanced_ccc(pred, pred, ["N", "H", "N", "H"], n_trials=0)
    with pytest.raises(ValueError, match="per_class"):
        balanced_ccc(pred, pred, ["N", "H", "N", "H"], per_class=0)


def test_gender_metrics_hand_computed() -> None:
    true = [0, 0, 1, 1, 1, -1]
    pred = [0, 1, 1, 1, 0, 1]
    # Known rows: true 0 0 1 1 1, pred 0 1 1 1 0 -> 3 of 5 correct.
    # Class 0: TP 1, FP 1, FN 1 -> F1 1/2. Class 1: TP 2, FP 1, FN 1 -> F1 2/3.
    result = gender_metrics(pred, true)
    assert result["accuracy"] == pytest.approx(3 / 5)
    assert result["macro_f1"] == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_gender_metrics_ignores_unknown_rows() -> None:
    true = np.array([0, 1, -1, -1, 1, 0])
    base = gender_metrics(np.array([0, 1, 0, 0, 1, 0]), true)
    flipped = gender_metrics(np.array([0, 1, 1, 1, 1, 0]), true)
    assert base == flipped == {"accuracy": 1.0, "macro_f1": 1.0}


def test_gender_metrics_all_unknown_and_length_mismatch() -> None:
    result = gender_metrics([0, 1], [-1, -1])
    assert math.isnan(result["accuracy"]) and math.isnan(result["macro_f1"])
    with pytest.raises(ValueError, match="differ in length"):
        gender_metrics([0, 1, 1], [0, 1])


# --------------------------------------------------------------------------- the categorical task (class_metrics)


def _sklearn_class_scores(true, pred, n):
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
        f1_score,
        precision_recall_fscore_support,
    )

    labels = list(range(n))
    p, r, f, s = precision_recall_fscore_support(true, pred, labels=labels, zero_division=0)
    return {"macro_f1": f1_score(true, pred, average="macro", labels=labels, zero_division=0),
            "accuracy": accuracy_score(true, pred), "balanced_accuracy": balanced_accuracy_score(true, pred),
            "precision": p, "recall": r, "f1": f, "support": s,
            "confusion": confusion_matrix(true, pred, labels=labels)}


@pytest.mark.parametrize("seed", range(6))
def test_class_metrics_equal_sklearn_on_random_labels(seed):
    import warnings

    from ser_cache.system.metrics import class_metrics
    from ser_cache.system.tasks import class_codes

    rng = np.random.default_rng(seed)
    n_classes = 8 if seed % 2 else 9
    # Skewed true labels, some classes never true or never predicted (seed-dependent), noisy predictions.
    true = rng.choice(n_classes - seed % 3, size=int(rng.integers(20, 200)),
                      p=np.r_[[0.5], np.full(n_classes - seed % 3 - 1, 0.5 / (n_classes - seed % 3 - 1))])
    pred = np.where(rng.random(true.size) < 0.5, true, rng.integers(0, n_classes - 1, true.size))
    got = class_metrics(true, pred, class_codes(n_classes))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = _sklearn_class_scores(true, pred, n_classes)
    for key in ("macro_f1", "accuracy", "balanced_accuracy"):
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    for i, code in enumerate(class_codes(n_classes)):
        c = got["per_class"][code]
        assert (c["precision"], c["recall"], c["f1"], c["support"]) == pytest.approx(
            (want["precision"][i], want["recall"][i], want["f1"][i], want["support"][i]), abs=1e-12)
    assert got["confusion"] == want["confusion"].tolist()


def test_class_metrics_by_hand_absent_classes_count_zero_and_unlabelled_rows_are_left_out():
    from ser_cache.system.metrics import class_metrics

    # Classes a, b, c, d: d never true and never predicted, c predicted but never true; -1 rows left out.
    true = [0, 0, 0, 1, 1, -1, -1]
    pred = [0, 0, 1, 1, 2, 3, 0]
    m = class_metrics(true, pred, ["a", "b", "c", "d"])
    assert m["rows"] == 5
    assert m["accuracy"] == pytest.approx(3 / 5)
    # F1: a = 2*2/(3+2) = 0.8, b = 2*1/(2+2) = 0.5, c = 0, d = 0 (no row, no prediction: zero_division=0)
    assert m["per_class"]["a"]["f1"] == pytest.approx(0.8) and m["per_class"]["b"]["f1"] == pytest.approx(0.5)
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5) / 4)
    # Balanced accuracy: mean recall over the classes present among the true labels (a 2/3, b 1/2).
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert m["confusion"] == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert m["classes"] == ["a", "b", "c", "d"]


def test_class_metrics_without_rows_are_nan_and_bad_indices_are_refused():
    from ser_cache.system.metrics import class_metrics

    m = class_metrics([-1, -1], [0, 1], ["a", "b"])
    assert m["rows"] == 0 and np.isnan(m["macro_f1"]) and np.isnan(m["accuracy"])
    with pytest.raises(ValueError, match="outside 0..1"):
        class_metrics([0, 1], [0, 2], ["a", "b"])
    with pytest.raises(ValueError, match="differ in length"):
        class_metrics([0, 1], [0], ["a", "b"])
