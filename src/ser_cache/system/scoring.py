"""Scoring a model on rows: batched inference, the CCC table of an epoch or a split, label ranges and head classes."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ser_cache.infra.runtime import to_device
from ser_cache.system.errors import TrainError
from ser_cache.system.metrics import ATTRIBUTES as AVD  # the heads' "avd" column order, too

if TYPE_CHECKING:
    pass
log = logging.getLogger(__name__)


EVAL_BATCH = 4096  # rows per forward pass when scoring; memory, not accuracy, decides it


# With frame inputs: 64 rows × up to 750 Whisper frames × 1280 is 245 MB of float32 per pass.
EVAL_FRAME_BATCH = 64


def eval_batch_size(model) -> int:
    """Rows per forward pass when scoring: memory decides it, and frames take far more than vectors."""
    return EVAL_FRAME_BATCH if getattr(model, "frame_names", ()) else EVAL_BATCH


def infer(model, fetch, n: int, *, device, batch_size: int | None = None,
          with_classes: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Run a trained model (FeatureModel or bare heads) over rows 0..n-1; `fetch(idx)` gives the
    inputs of rows `idx` (a contiguous ascending range, as a numpy array: tensors, and (frames,
    lengths) for frame inputs).

    The predictions stay on `device` until the last batch and come back in one copy: no batch waits
    for the one before it to reach the host.
    Returns (avd (n, 3) float64, gender probabilities (n, G) or None); `with_classes`: and (n, C)
    class probabilities or None (then avd is None for heads without attribute heads).
    """
    import torch

    batch_size = batch_size or eval_batch_size(model)
    was_training = model.training
    model.eval()
    genders = model.n_genders
    heads = getattr(model, "heads", model)
    attributes = bool(getattr(heads, "attributes", True))
    classes = int(getattr(heads, "n_classes", 0)) if with_classes else 0
    width = (3 if attributes else 0) + genders + classes
    parts = []
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            idx = np.arange(start, min(start + batch_size, n))
            out = model(to_device(fetch(idx), device))
            cols = [out["avd"].double()] if attributes else []
            if genders:
                cols.append(torch.softmax(out["gender_logits"].double(), dim=-1))
            if classes:
                cols.append(torch.softmax(out["class_logits"].double(), dim=-1))
            parts.append(torch.cat(cols, dim=1))
        table = torch.cat(parts).cpu().numpy() if parts else np.empty((0, width), dtype=np.float64)
    model.train(was_training)
    a = 3 if attributes else 0
    avd = np.ascontiguousarray(table[:, :3]) if attributes else None
    probs = np.ascontiguousarray(table[:, a:a + genders]) if genders else None
    if not with_classes:
        return avd, probs
    return avd, probs, (np.ascontiguousarray(table[:, a + genders:]) if classes else None)


def score(avd_pred: np.ndarray | None, avd_true: np.ndarray, emotions: Sequence[str], *,
          gender_pred: np.ndarray | None = None, gender_true: np.ndarray | None = None,
          balanced_trials: int = 10, balanced_per_class: int | None = None, seed: int = 0,
          class_pred: np.ndarray | None = None, class_true: np.ndarray | None = None,
          classes: Sequence[str] = ()) -> dict:
    """CCC table, balanced CCC (None when no primary emotion is present) and gender accuracy/macro-F1;
    with `classes`, the class task's scores (metrics.class_metrics of `class_pred` against
    `class_true`, whose -1 rows are left out) as "categorical". `avd_pred` None: no attribute heads,
    no CCC."""
    from ser_cache.system import metrics

    result: dict = {"rows": len(avd_true)}
    if avd_pred is None:
        if gender_pred is not None and gender_true is not None:
            result["gender"] = metrics.gender_metrics(gender_pred, gender_true)
        result["categorical"] = metrics.class_metrics(class_true, class_pred, classes)
        return result
    result["ccc"] = metrics.ccc_table(avd_pred, avd_true)
    if np.isin(np.asarray(emotions, dtype=object), metrics.PRIMARY_EMOTIONS).any():
        result["balanced_ccc"] = metrics.balanced_ccc(avd_pred, avd_true, emotions, per_class=balanced_per_class,
                                                      n_trials=balanced_trials, seed=seed)
    else:
        result["balanced_ccc"] = None
    if gender_pred is not None and gender_true is not None:
        result["gender"] = metrics.gender_metrics(gender_pred, gender_true)
    if classes:
        result["categorical"] = metrics.class_metrics(class_true, class_pred, classes)
    return result


def selection_score(task: str, select: str, dev: dict) -> float:
    """The figure an epoch is kept by (higher is better).

    attributes: the mean balanced CCC (select "balanced") or the mean CCC ("ccc"), as always;
    categorical: the macro-F1 (the only choice, "balanced"); both: the mean of the macro-F1 and the
    mean balanced CCC ("balanced") or the mean CCC ("ccc"). A NaN macro-F1 (no row with a class)
    never wins."""
    ccc = None
    if task != "categorical":
        ccc = dev["balanced_ccc"]["mean"] if select == "balanced" else dev["ccc"]["mean"]
    if task == "attributes":
        return ccc
    f1 = dev["categorical"]["macro_f1"]
    f1 = -np.inf if np.isnan(f1) else f1
    return f1 if ccc is None else (ccc + f1) / 2


def selection_text(task: str, select: str) -> str:
    """What `selection_score` is, in words: for the log line after training."""
    ccc = "balanced" if select == "balanced" else "mean"
    return {"attributes": f"{ccc} CCC", "categorical": "macro-F1"}.get(task, f"mean of {ccc} CCC and macro-F1")


def label_range(avd: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-attribute min and max of the training labels: the heads' output range (paper Eq. 2)."""
    lo, hi = avd.min(axis=0).astype(float), avd.max(axis=0).astype(float)
    flat = [f"{a} ({low})" for a, low, high in zip(AVD, lo, hi) if not high > low]
    if flat:
        raise TrainError(f"every training label of {', '.join(flat)} is the same; the heads need a label range "
                         "(paper Eq. 2)")
    return lo.tolist(), hi.tolist()


def head_classes(head: str, weight: float, values: Sequence[str | None]) -> list[str]:
    """Sorted known classes of an auxiliary head; none when it is off or has fewer than two classes."""
    if weight == 0:
        return []
    classes = sorted({v for v in values if v is not None})
    if len(classes) < 2:
        log.warning("%s head off: the training rows have %d known %s value(s)", head, len(classes), head)
        return []
    return classes
