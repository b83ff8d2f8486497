"""Training losses for multitask speech emotion recognition.

The objective follows the paper's Eq. 1::

    L = sum over A, V, D of (1 - CCC) + alpha * CE(gender) + beta * L_speaker

where the speaker term is an additive angular margin softmax (ArcFace). The categorical task adds
(or, alone, replaces the CCC term with) a class-weighted cross-entropy: ``+ w * CE(class)``.
Training on 1 - CCC directly optimises the evaluation metric, which MSE does
not: MSE is happy with predictions collapsed towards the mean, CCC is not.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _as_columns(values: Tensor) -> Tensor:
    """View a (B,) tensor as (B, 1) so one code path handles both layouts."""
    return values.unsqueeze(1) if values.dim() == 1 else values


def ccc_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Sum over columns of (1 - CCC), with population statistics.

    ``pred`` and ``target`` are (B,) or (B, K); for (B, 3) this is the
    arousal/valence/dominance term of Eq. 1, so it lies in [0, 2K].

    The only guard is a clamp of the denominator at the smallest positive
    normal number of the dtype. The denominator is zero only when, within a
    column, predictions and targets are the same constant; the clamp turns
    that 0/0 into 0/tiny = 0 (loss 1 for the column, no gradient) and leaves
    every other case bit-for-bit equal to the unguarded formula. Because
    |2 cov| <= var_p + var_t, clamping can never push |CCC| above 1.

    Raises:
        ValueError: on shape mismatch, more than two dimensions, or a batch of
            fewer than two rows (CCC is undefined there; use ``drop_last=True``
            in the data loader).
        TypeError: if ``pred`` is not a floating-point tensor.
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}"
        )
    if pred.dim() not in (1, 2):
        raise ValueError(f"expected (B,) or (B, K) tensors, got shape {tuple(pred.shape)}")
    if not pred.is_floating_point():
        raise TypeError(f"pred must be a floating-point tensor, got {pred.dtype}")
    if pred.shape[0] < 2:
        raise ValueError(
            f"CCC needs at least 2 rows per batch, got {pred.shape[0]}; "
            "use drop_last=True in the DataLoader"
        )

    p = _as_columns(pred)
    t = _as_columns(target).to(p.dtype)
    mean_p, mean_t = p.mean(dim=0), t.mean(dim=0)
    dev_p, dev_t = p - mean_p, t - mean_t
    var_p = (dev_p * dev_p).mean(dim=0)
    var_t = (dev_t * dev_t).mean(dim=0)
    cov = (dev_p * dev_t).mean(dim=0)
    denominator = var_p + var_t + (mean_p - mean_t) ** 2
    denominator = denominator.clamp_min(torch.finfo(p.dtype).tiny)
    return (1.0 - 2.0 * cov / denominator).sum()


# Cosines are kept this far from +-1 before taking sin(theta) = sqrt(1 - cos^2),
# whose derivative is infinite at +-1. 1e-7 is still representable next to 1
# in float32 (spacing 6e-8), so the clamp is effective in both float32/64. The
# price is that sin(theta) never drops below sqrt(2e-7) ~ 4.5e-4, i.e. the
# target logit is at most 4.5e-4 * sin(m) too low for theta < ~4.5e-4 rad.
_COS_LIMIT = 1.0 - 1e-7


def _add_angular_margin(cos_theta: Tensor, margin: float) -> Tensor:
    """Return cos(theta + margin) for cos_theta = cos(theta), kept monotone.

    We use cos(theta + m) = cos(theta) cos(m) - sin(theta) sin(m) instead of
    acos followed by cos: it avoids acos, whose gradient also blows up at +-1,
    and is cheaper. For theta > pi - m the angle theta + m passes pi, where
    cos starts rising again: a sample far from its class would then score
    better the further it moved away. There we switch to the CosFace-style
    cos(theta) - (1 - cos(m)), which is still decreasing in theta and meets
    cos(theta + m) exactly (value -1) at theta = pi - m, so the target logit is
    continuous and monotone over [0, pi].
    """
    cos_m, sin_m = math.cos(margin), math.sin(margin)
    cos_clamped = cos_theta.clamp(-_COS_LIMIT, _COS_LIMIT)
    sin_theta = torch.sqrt(1.0 - cos_clamped * cos_clamped)
    shifted = cos_theta * cos_m - sin_theta * sin_m
    fallback = cos_theta - (1.0 - cos_m)
    # theta <= pi - m  <=>  cos(theta) >= cos(pi - m) = -cos(m)
    return torch.where(cos_theta >= -cos_m, shifted, fallback)


class AAMSoftmax(nn.Module):
    """Additive angular margin softmax (ArcFace) for the speaker-ID head.

    Logits are s * cos(angle between the L2-normalised embedding and the
    L2-normalised class weight). During training the target class's angle is
    widened by ``margin`` so embeddings must sit well inside their speaker's
    cone, which makes the shared representation more speaker-discriminative
    than a plain softmax would.

    Rows with a negative label (unknown speaker) carry no speaker information
    and are left out of the loss.
    """

    def __init__(
        self,
        embedding_dim: int,
        n_classes: int,
        margin: float = 0.2,
        scale: float = 30.0,
    ) -> None:
        super().__init__()
        if embedding_dim < 1 or n_classes < 1:
            raise ValueError(
                f"embedding_dim and n_classes must be positive, got {embedding_dim}, {n_classes}"
            )
        if not 0.0 <= margin < math.pi / 2:
            raise ValueError(f"margin must be in [0, pi/2) radians, got {margin}")
        if scale <= 0.0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.embedding_dim = embedding_dim
        self.n_classes = n_classes
        self.margin = float(margin)
        self.scale = float(scale)
        self.weight = nn.Parameter(torch.empty(n_classes, embedding_dim))
        nn.init.xavier_uniform_(self.weight)

    def extra_repr(self) -> str:
        return (
            f"embedding_dim={self.embedding_dim}, n_classes={self.n_classes}, "
            f"margin={self.margin}, scale={self.scale}"
        )

    def _cosine(self, embeddings: Tensor) -> Tensor:
        """(B, n_classes) cosines between embeddings and class weights."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_dim:
            raise ValueError(
                f"embeddings must have shape (B, {self.embedding_dim}), "
                f"got {tuple(embeddings.shape)}"
            )
        return F.linear(F.normalize(embeddings, dim=1), F.normalize(self.weight, dim=1))

    def logits(self, embeddings: Tensor) -> Tensor:
        """Scaled cosines without margin, for prediction and scoring."""
        return self._cosine(embeddings) * self.scale

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Mean margin cross-entropy over rows with a known speaker (label >= 0).

        If no row has a known speaker the result is an exact zero that is still
        connected to ``embeddings`` and the weights, so ``backward()`` works and
        yields zero gradients instead of failing.
        """
        if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
            raise ValueError(
                f"labels must have shape ({embeddings.shape[0]},), got {tuple(labels.shape)}"
            )
        # Every row is computed and the unknown ones masked out of the mean: no branch on the data, so a
        # GPU never waits for the host. The label range is checked where it costs no wait (CPU tensors);
        # the training loop builds labels from the classes, so they cannot be out of range there.
        if not labels.is_cuda and labels.numel() and int(labels.max()) >= self.n_classes:
            raise ValueError(
                f"speaker label {int(labels.max())} out of range for {self.n_classes} classes"
            )
        known = labels >= 0
        safe = labels.clamp_min(0).long()
        cosine = self._cosine(embeddings)
        index = safe.unsqueeze(1)
        target_cos = cosine.gather(1, index)
        with_margin = cosine.scatter(1, index, _add_angular_margin(target_cos, self.margin))
        return _masked_mean(F.cross_entropy(with_margin * self.scale, safe, reduction="none"), known)


def _gender_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy over rows with a known gender (target >= 0).

    ``F.cross_entropy(..., ignore_index=-1)`` returns NaN (0/0) when every row
    is ignored, which would poison the total loss; this returns an exact zero
    that still has a grad_fn in that case. Any negative target counts as
    unknown, not only -1. Computed over every row and masked, with no branch
    on the data: a GPU never has to tell the host whether a row is known.
    """
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(
            f"gender logits must be (B, C) and target (B,), got "
            f"{tuple(logits.shape)} and {tuple(target.shape)}"
        )
    return _masked_mean(F.cross_entropy(logits, target.clamp_min(0).long(), reduction="none"), target >= 0)


def class_weights(counts) -> list[float]:
    """The challenge baseline's class weights from per-class row counts: N / (n_classes * n_c).

    N is the sum of the counts (the rows with a class target). The baseline
    (train_eval_files/train_cat_ser.py of MSP-Podcast_Challenge_IS2025) gives a class without rows
    the weight 0; so does this: such a weight never multiplies a training row, and 0 keeps the
    vector finite (where N / 0 would be infinite).
    """
    counts = [int(c) for c in counts]
    if not counts or min(counts) < 0:
        raise ValueError(f"class counts must be one non-negative count per class, got {counts}")
    total, n = sum(counts), len(counts)
    return [total / (n * c) if c else 0.0 for c in counts]


def class_cross_entropy(logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Cross-entropy over rows with a class target (target >= 0), weighted as torch's CrossEntropyLoss.

    With ``weight`` (one per class) it is the weighted mean sum_i w[y_i] CE_i / sum_i w[y_i], what
    torch.nn.CrossEntropyLoss(weight=...) computes and the baseline trains with. Rows whose target
    is negative (O/X under 8 classes, or no class) count for nothing: neither their logits nor their
    weight reach the loss. No row with a target (or only rows of weight 0): an exact zero, still
    connected to ``logits``. Computed over every row and masked, with no branch on the data.
    """
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(
            f"class logits must be (B, C) and target (B,), got {tuple(logits.shape)} and {tuple(target.shape)}"
        )
    known = target >= 0
    safe = target.clamp_min(0).long()
    ce = F.cross_entropy(logits.float(), safe, reduction="none")
    w = known.to(ce.dtype) if weight is None else torch.where(known, weight.to(ce.dtype)[safe],
                                                                 torch.zeros_like(ce))
    ce = torch.where(known, ce, torch.zeros_like(ce))
    return (w * ce).sum() / w.sum().clamp_min(torch.finfo(ce.dtype).tiny)


def _masked_mean(values: Tensor, keep: Tensor) -> Tensor:
    """Mean of `values` where `keep`; an exact zero, still connected to `values`, where none is kept."""
    return torch.where(keep, values, torch.zeros_like(values)).sum() / keep.sum().clamp_min(1)


def multitask_loss(
    pred_avd: Tensor,
    target_avd: Tensor,
    *,
    gender_logits: Tensor | None = None,
    gender_target: Tensor | None = None,
    gender_weight: float = 1.0,
    speaker_loss: Tensor | None = None,
    speaker_weight: float = 0.1,
) -> tuple[Tensor, dict[str, float]]:
    """Paper Eq. 1: ccc_loss(A, V, D) + alpha * CE(gender) + beta * speaker loss.

    Args:
        pred_avd, target_avd: (B, 3) arousal/valence/dominance.
        gender_logits, gender_target: (B, C) logits and (B,) labels, -1 for
            unknown; both or neither. Unknown rows are ignored; an all-unknown
            batch contributes 0.
        gender_weight: alpha.
        speaker_loss: a scalar already computed, e.g. by :class:`AAMSoftmax`.
        speaker_weight: beta.

    Returns:
        The total loss, and for logging a dict with "ccc", "gender", "speaker"
        (each unweighted, 0.0 when the head is absent) and "total", so that
        total = ccc + alpha * gender + beta * speaker.
    """
    total, parts = multitask_loss_terms(pred_avd, target_avd, gender_logits=gender_logits,
                                        gender_target=gender_target, gender_weight=gender_weight,
                                        speaker_loss=speaker_loss, speaker_weight=speaker_weight)
    return total, {key: float(value) for key, value in parts.items()}


def multitask_loss_terms(
    pred_avd: Tensor | None,
    target_avd: Tensor | None,
    *,
    gender_logits: Tensor | None = None,
    gender_target: Tensor | None = None,
    gender_weight: float = 1.0,
    speaker_loss: Tensor | None = None,
    speaker_weight: float = 0.1,
    class_logits: Tensor | None = None,
    class_target: Tensor | None = None,
    class_weight: Tensor | None = None,
    class_loss_weight: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """:func:`multitask_loss` with its parts as detached scalar tensors on the loss's device.

    For a loop that sums them over an epoch: reading a float off a GPU tensor waits for the GPU,
    so a loop should do it once per epoch, not at every step.

    The categorical task: ``class_logits`` (B, C) and ``class_target`` (B,) (-1: no class target)
    add ``class_loss_weight`` times :func:`class_cross_entropy` (weighted by ``class_weight``) as
    the part "class"; without attribute heads ``pred_avd`` and ``target_avd`` are None and the parts
    have no "ccc". Without class logits the parts are exactly what they always were.
    """
    if (class_logits is None) != (class_target is None):
        raise ValueError("class_logits and class_target must be given together")
    if pred_avd is None:
        if class_logits is None or class_target is None:
            raise ValueError("without attribute predictions the loss needs class logits")
        cls = class_cross_entropy(class_logits, class_target, class_weight)
        total = class_loss_weight * cls
        zero = torch.zeros((), dtype=total.dtype, device=total.device)
        parts = {"class": cls.detach(), "gender": zero, "speaker": zero}
        return _auxiliary_terms(total, parts, gender_logits, gender_target, gender_weight, speaker_loss,
                                speaker_weight)
    total, parts = _attribute_terms(pred_avd, target_avd, gender_logits=gender_logits, gender_target=gender_target,
                                    gender_weight=gender_weight, speaker_loss=speaker_loss,
                                    speaker_weight=speaker_weight)
    if class_logits is not None and class_target is not None:
        cls = class_cross_entropy(class_logits, class_target, class_weight)
        total = total + class_loss_weight * cls
        parts["class"] = cls.detach()
        parts["total"] = total.detach()
    return total, parts


def _auxiliary_terms(total, parts, gender_logits, gender_target, gender_weight, speaker_loss, speaker_weight):
    """The gender and speaker terms added to `total` (a class loss alone), as Eq. 1 adds them."""
    if (gender_logits is None) != (gender_target is None):
        raise ValueError("gender_logits and gender_target must be given together")
    if gender_logits is not None and gender_target is not None:
        gender = _gender_cross_entropy(gender_logits, gender_target)
        total = total + gender_weight * gender
        parts["gender"] = gender.detach()
    if speaker_loss is not None:
        if speaker_loss.dim() != 0:
            raise ValueError(f"speaker_loss must be a scalar tensor, got shape {tuple(speaker_loss.shape)}")
        total = total + speaker_weight * speaker_loss
        parts["speaker"] = speaker_loss.detach()
    parts["total"] = total.detach()
    return total, parts


def _attribute_terms(
    pred_avd: Tensor,
    target_avd: Tensor,
    *,
    gender_logits: Tensor | None,
    gender_target: Tensor | None,
    gender_weight: float,
    speaker_loss: Tensor | None,
    speaker_weight: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Eq. 1 on attribute predictions, its parts as detached tensors (the attribute task's loss, as it always was)."""
    if (gender_logits is None) != (gender_target is None):
        raise ValueError("gender_logits and gender_target must be given together")
    if speaker_loss is not None and speaker_loss.dim() != 0:
        raise ValueError(
            f"speaker_loss must be a scalar tensor, got shape {tuple(speaker_loss.shape)}"
        )

    emotion = ccc_loss(pred_avd, target_avd)
    total = emotion
    zero = torch.zeros((), dtype=emotion.dtype, device=emotion.device)
    parts = {"ccc": emotion.detach(), "gender": zero, "speaker": zero}
    if gender_logits is not None and gender_target is not None:
        gender = _gender_cross_entropy(gender_logits, gender_target)
        total = total + gender_weight * gender
        parts["gender"] = gender.detach()
    if speaker_loss is not None:
        total = total + speaker_weight * speaker_loss
        parts["speaker"] = speaker_loss.detach()
    parts["total"] = total.detach()
    return total, parts
