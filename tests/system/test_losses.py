"""Tests for ser_cache.system.losses, checked against metrics and hand-built formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ser_cache.system.losses import AAMSoftmax, _add_angular_margin, ccc_loss, multitask_loss
from ser_cache.system.metrics import ccc


def random_avd(seed: int, batch: int, columns: int, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    target = torch.rand(batch, columns, generator=gen, dtype=dtype) * 6 + 1
    pred = 0.5 * target + torch.randn(batch, columns, generator=gen, dtype=dtype) + 1
    return pred, target


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("batch", "columns"), [(2, 1), (16, 3), (128, 3), (33, 5)])
def test_ccc_loss_matches_metric(seed: int, batch: int, columns: int) -> None:
    pred, target = random_avd(seed, batch, columns)
    expected = sum(
        1 - ccc(pred[:, j].numpy(), target[:, j].numpy()) for j in range(columns)
    )
    assert ccc_loss(pred, target).item() == pytest.approx(expected, abs=1e-12)


def test_ccc_loss_one_dimensional_and_float32() -> None:
    pred, target = random_avd(7, 64, 1)
    expected = 1 - ccc(pred[:, 0].numpy(), target[:, 0].numpy())
    assert ccc_loss(pred[:, 0], target[:, 0]).item() == pytest.approx(expected, abs=1e-12)
    loss32 = ccc_loss(pred.float(), target.float())
    assert loss32.dtype == torch.float32
    assert loss32.item() == pytest.approx(expected, abs=1e-5)


def test_ccc_loss_bounds() -> None:
    pred, _ = random_avd(3, 20, 3)
    assert ccc_loss(pred, pred).item() == pytest.approx(0.0, abs=1e-12)
    centred = pred - pred.mean(dim=0)
    assert ccc_loss(-centred, centred).item() == pytest.approx(6.0, abs=1e-12)


def test_ccc_loss_gradcheck() -> None:
    pred, target = random_avd(11, 8, 3)
    pred.requires_grad_(True)
    target.requires_grad_(True)
    assert torch.autograd.gradcheck(ccc_loss, (pred, target))


def test_ccc_loss_degenerate_column_is_finite() -> None:
    pred = torch.full((4, 2), 3.0, requires_grad=True)
    target = torch.full((4, 2), 3.0)
    loss = ccc_loss(pred, target)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == pytest.approx(2.0)
    assert torch.all(torch.isfinite(pred.grad))


def test_ccc_loss_errors() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        ccc_loss(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="at least 2 rows"):
        ccc_loss(torch.zeros(1, 3), torch.zeros(1, 3))
    with pytest.raises(TypeError, match="floating"):
        ccc_loss(torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long))


def expected_aam_loss(
    embeddings: np.ndarray, weight: np.ndarray, labels: np.ndarray, margin: float, scale: float
) -> float:
    """ArcFace loss straight from the definition, in numpy float64."""
    e = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    w = weight / np.linalg.norm(weight, axis=1, keepdims=True)
    cosine = e @ w.T
    rows = np.arange(len(labels))
    theta = np.arccos(cosine[rows, labels])
    assert np.all(theta + margin < math.pi), "test data must avoid the fallback region"
    logits = cosine.copy()
    logits[rows, labels] = np.cos(theta + margin)
    logits *= scale
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_softmax[rows, labels].mean())


def make_aam(seed: int, embedding_dim: int = 16, n_classes: int = 7, **kwargs) -> AAMSoftmax:
    torch.manual_seed(seed)
    return AAMSoftmax(embedding_dim, n_classes, **kwargs).double()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("margin", [0.0, 0.2, 0.5])
def test_aam_softmax_matches_definition(seed: int, margin: float) -> None:
    layer = make_aam(seed, margin=margin, scale=30.0)
    gen = torch.Generator().manual_seed(seed + 100)
    embeddings = torch.randn(24, 16, generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, 7, (24,), generator=gen)
    expected = expected_aam_loss(
        embeddings.numpy(), layer.weight.detach().numpy(), labels.numpy(), margin, 30.0
    )
    assert layer(embeddings, labels).item() == pytest.approx(expected, rel=1e-9)


def test_aam_softmax_zero_margin_is_scaled_cosine_ce() -> None:
    layer = make_aam(4, margin=0.0, scale=10.0)
    embeddings = torch.randn(12, 16, dtype=torch.float64)
    labels = torch.randint(0, 7, (12,))
    cosine = F.normalize(embeddings, dim=1) @ F.normalize(layer.weight, dim=1).T
    assert torch.allclose(layer.logits(embeddings), 10.0 * cosine)
    expected = F.cross_entropy(10.0 * cosine, labels)
    assert torch.allclose(layer(embeddings, labels), expected)


def test_aam_softmax_margin_increases_loss() -> None:
    with_margin = make_aam(5, margin=0.3)
    without = make_aam(5, margin=0.0)
    without.load_state_dict(with_margin.state_dict())
    embeddings = torch.randn(32, 16, dtype=torch.float64)
    labels = torch.randint(0, 7, (32,))
    assert with_margin(embeddings, labels) > without(embeddings, labels)


def test_aam_softmax_ignores_unknown_speakers() -> None:
    layer = make_aam(6)
    embeddings = torch.randn(10, 16, dtype=torch.float64)
    labels = torch.tensor([0, -1, 3, 2, -1, 6, 1, -1, 4, 5])
    known = labels >= 0
    loss = layer(embeddings, labels)
    changed = embeddings.clone()
    changed[~known] = torch.randn(int((~known).sum()), 16, dtype=torch.float64) * 10
    assert layer(changed, labels).item() == pytest.approx(loss.item(), rel=1e-12)
    assert layer(embeddings[known], labels[known]).item() == pytest.approx(loss.item(), rel=1e-12)


def test_aam_softmax_all_unknown_gives_connected_zero() -> None:
    layer = make_aam(7)
    embeddings = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    loss = layer(embeddings, torch.full((5,), -1))
    assert loss.item() == 0.0
    assert loss.grad_fn is not None
    loss.backward()
    assert torch.equal(embeddings.grad, torch.zeros_like(embeddings))
    assert torch.equal(layer.weight.grad, torch.zeros_like(layer.weight))


def test_aam_softmax_extreme_angles_have_finite_gradients() -> None:
    layer = make_aam(8, margin=0.5)
    weight = layer.weight.detach()
    # Embeddings exactly on (cos = 1) and exactly opposite (cos = -1) their class.
    embeddings = torch.stack([weight[0], -weight[1]]).clone().requires_grad_(True)
    loss = layer(embeddings, torch.tensor([0, 1]))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.all(torch.isfinite(embeddings.grad))
    assert torch.all(torch.isfinite(layer.weight.grad))


def test_angular_margin_is_continuous_and_monotone() -> None:
    margin = 0.5
    theta = torch.linspace(0, math.pi, 2001, dtype=torch.float64)
    target_logit = _add_angular_margin(torch.cos(theta), margin)
    # Exactly cos(theta + m) where theta + m stays within [0, pi] and cos(theta)
    # is clear of the +-1 clamp; within 1e-3 rad of theta = 0 the clamp may
    # lower the value by up to sin(m) * sqrt(2e-7).
    inside = (theta >= 1e-3) & (theta <= math.pi - margin - 1e-6)
    assert torch.allclose(target_logit[inside], torch.cos(theta[inside] + margin), atol=1e-12)
    near_zero = theta < 1e-3
    gap = torch.cos(theta[near_zero] + margin) - target_logit[near_zero]
    assert torch.all(gap.abs() <= math.sin(margin) * math.sqrt(2e-7) + 1e-12)
    # Decreasing in theta everywhere, and no jump at the switch point.
    steps = target_logit[1:] - target_logit[:-1]
    assert torch.all(steps <= 1e-12)
    assert steps.abs().max() < 2e-3


def test_aam_softmax_validation() -> None:
    with pytest.raises(ValueError, match="margin"):
        AAMSoftmax(8, 3, margin=-0.1)
    with pytest.raises(ValueError, match="scale"):
        AAMSoftmax(8, 3, scale=0.0)
    layer = AAMSoftmax(8, 3)
    with pytest.raises(ValueError, match="out of range"):
        layer(torch.randn(2, 8), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"\(B, 8\)"):
        layer(torch.randn(2, 5), torch.tensor([0, 1]))


def test_multitask_loss_adds_weighted_parts() -> None:
    pred, target = random_avd(12, 16, 3)
    gender_logits = torch.randn(16, 2, dtype=torch.float64)
    gender_target = torch.randint(0, 2, (16,))
    speaker = torch.tensor(2.5, dtype=torch.float64)
    total, parts = multitask_loss(
        pred,
        target,
        gender_logits=gender_logits,
        gender_target=gender_target,
        gender_weight=0.7,
        speaker_loss=speaker,
        speaker_weight=0.1,
    )
    ccc_part = sum(1 - ccc(pred[:, j].numpy(), target[:, j].numpy()) for j in range(3))
    gender_part = F.cross_entropy(gender_logits, gender_target).item()
    assert parts["ccc"] == pytest.approx(ccc_part, abs=1e-12)
    assert parts["gender"] == pytest.approx(gender_part, abs=1e-12)
    assert parts["speaker"] == 2.5
    expected = ccc_part + 0.7 * gender_part + 0.1 * 2.5
    assert total.item() == pytest.approx(expected, abs=1e-12)
    assert parts["total"] == pytest.approx(expected, abs=1e-12)


def test_multitask_loss_without_auxiliary_heads() -> None:
    pred, target = random_avd(13, 8, 3)
    total, parts = multitask_loss(pred, target)
    assert parts["gender"] == parts["speaker"] == 0.0
    assert total.item() == pytest.approx(ccc_loss(pred, target).item(), abs=1e-15)


def test_multitask_loss_ignores_unknown_gender() -> None:
    pred, target = random_avd(14, 8, 3)
    gender_logits = torch.randn(8, 2, dtype=torch.float64, requires_grad=True)
    gender_target = torch.tensor([0, -1, 1, 1, -1, 0, -1, 1])
    known = gender_target >= 0
    _, parts = multitask_loss(
        pred, target, gender_logits=gender_logits, gender_target=gender_target
    )
    expected = F.cross_entropy(gender_logits[known], gender_target[known]).item()
    assert parts["gender"] == pytest.approx(expected, abs=1e-12)

    total, parts = multitask_loss(
        pred,
        target,
        gender_logits=gender_logits,
        gender_target=torch.full((8,), -1),
    )
    assert parts["gender"] == 0.0
    assert math.isfinite(parts["total"])
    total.backward()
    assert torch.equal(gender_logits.grad, torch.zeros_like(gender_logits))


def test_multitask_loss_requires_gender_pair() -> None:
    pred, target = random_avd(15, 8, 3)
    with pytest.raises(ValueError, match="together"):
        multitask_loss(pred, target, gender_logits=torch.randn(8, 2))


# --------------------------------------------------------------------------- the categorical task


def test_class_weights_follow_the_baseline_formula_on_a_hand_made_label_set():
    from ser_cache.system.losses import class_weights

    # 10 rows: A x4, S x3, H x2, U x1, and no F, D, C, N. N / (8 n_c): 10/32, 10/24, 10/16, 10/8; absent: 0
    # (the baseline's choice: train_eval_files/train_cat_ser.py gives a class without rows the weight 0).
    assert class_weights([4, 3, 2, 1, 0, 0, 0, 0]) == pytest.approx([10 / 32, 10 / 24, 10 / 16, 10 / 8, 0, 0, 0, 0])
    assert class_weights([5, 5]) == [1.0, 1.0]
    with pytest.raises(ValueError):
        class_weights([3, -1])


def test_class_cross_entropy_is_torchs_weighted_mean_and_ignores_rows_without_a_target():
    from ser_cache.system.losses import class_cross_entropy

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 8, generator=g, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, -1, 2, -1, 0])
    weight = torch.rand(8, generator=g) + 0.1
    got = class_cross_entropy(logits, target, weight)
    known = target >= 0
    want = torch.nn.CrossEntropyLoss(weight=weight)(logits[known], target[known])
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert class_cross_entropy(logits, target).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits[known], target[known]).item(), rel=1e-6)
    # O/X rows (-1) never reach the loss: changing their logits changes neither the loss nor any gradient.
    got.backward()
    assert torch.all(logits.grad[~known] == 0)
    moved = logits.detach().clone()
    moved[~known] += 100 * torch.randn(int((~known).sum()), 8, generator=g)
    assert class_cross_entropy(moved, target, weight).item() == got.item()


def test_class_cross_entropy_of_a_batch_without_targets_is_a_connected_zero():
    from ser_cache.system.losses import class_cross_entropy

    logits = torch.randn(4, 8, requires_grad=True)
    loss = class_cross_entropy(logits, torch.full((4,), -1), torch.ones(8))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(logits.grad == 0)


def test_the_loss_under_both_is_the_attribute_loss_plus_the_weighted_class_loss():
    from ser_cache.system.losses import class_cross_entropy, multitask_loss_terms

    g = torch.Generator().manual_seed(1)
    pred, target = torch.rand(6, 3, generator=g) * 6 + 1, torch.rand(6, 3, generator=g) * 6 + 1
    gl, gt = torch.randn(6, 2, generator=g), torch.tensor([0, 1, -1, 0, 1, 1])
    cl, ct = torch.randn(6, 8, generator=g), torch.tensor([0, 3, -1, 7, 2, -1])
    w = torch.rand(8, generator=g) + 0.5
    plain, parts0 = multitask_loss_terms(pred, target, gender_logits=gl, gender_target=gt,
                                         speaker_loss=torch.tensor(0.7), speaker_weight=0.1)
    total, parts = multitask_loss_terms(pred, target, gender_logits=gl, gender_target=gt,
                                        speaker_loss=torch.tensor(0.7), speaker_weight=0.1,
                                        class_logits=cl, class_target=ct, class_weight=w, class_loss_weight=0.5)
    ce = class_cross_entropy(cl, ct, w)
    assert total.item() == pytest.approx(plain.item() + 0.5 * ce.item(), rel=1e-6)
    assert parts["class"].item() == pytest.approx(ce.item()) and "class" not in parts0
    assert {k: v.item() for k, v in parts.items() if k not in ("class", "total")} == \
        {k: v.item() for k, v in parts0.items() if k != "total"}
    # The categorical task alone: no CCC part, the class loss and the auxiliary terms.
    alone, parts1 = multitask_loss_terms(None, None, gender_logits=gl, gender_target=gt, class_logits=cl,
                                         class_target=ct, class_weight=w, class_loss_weight=1.0)
    assert "ccc" not in parts1
    assert alone.item() == pytest.approx(ce.item() + parts0["gender"].item(), rel=1e-6)
    with pytest.raises(ValueError, match="class logits"):
        multitask_loss_terms(None, None)
