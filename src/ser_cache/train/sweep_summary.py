"""The summary of a sweep (sweep.json): per variant its members' Development scores and their mean ±
std over seeds, and every variant against the reference in a paired bootstrap (stats.py).

Read from the members' run directories (metrics.json, predictions_dev.csv), so members reused from an
earlier sweep count like members trained now. A member whose training diverged has no run: it is
listed under its variant's "diverged" and left out of the means and the comparisons, which say so.

A sweep of a class task (--task categorical|both) has "task" and "classes"; each member its
"categorical" scores (rows, macro_f1, accuracy, balanced_accuracy), each variant their mean ± std,
and "macro_f1_comparisons" the paired bootstrap of the macro-F1 difference
(stats.paired_bootstrap_macro_f1) from the members' predictions_dev_categorical.csv, on the
Development utterances with a class that every member of both variants was scored on. Under
categorical there are no CCC figures and no "comparisons"; an attribute sweep's file is what it
always was.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ser_cache.runs import layout, prediction_file

SWEEP_FORMAT = "ser-cache-sweep"


def summarize(cfg, members: Sequence, data, diverged: dict | None = None) -> dict:
    """sweep.json: per variant its members' Development scores, mean ± std over seeds, and the
    paired bootstrap against the reference variant. `diverged`: "variant/seed-s" → the record of a
    member whose training diverged (no run)."""
    from ser_cache.system.tasks import class_codes
    from ser_cache.train.stats import paired_bootstrap, paired_bootstrap_macro_f1

    task = cfg.base.task
    attributes, classes = task != "categorical", list(class_codes(cfg.base.classes)) if task != "attributes" else []
    diverged = diverged or {}
    truth_of = {uid: i for i, uid in enumerate(data.ids.tolist())}
    variants: dict[str, dict] = {}
    predictions: dict[str, list[tuple[list[str], np.ndarray]]] = {}
    class_predictions: dict[str, list[tuple[list[str], np.ndarray]]] = {}
    for m in members:
        v = variants.setdefault(m.variant, {"options": _options(cfg, m.variant), "members": [], "diverged": []})
        failed = diverged.get(f"{m.variant}/seed-{m.seed}")
        if failed is not None:
            v["diverged"].append({"seed": m.seed, **failed})
            continue
        run = Path(m.cfg.out)
        metrics = json.loads((run / layout.METRICS).read_text())
        record = {"seed": m.seed, "run": str(m.cfg.out), "best_epoch": metrics["best_epoch"], "rows": metrics["rows"]}
        if attributes:
            ids, avd = prediction_file.read_predictions(run / layout.DEV_PREDICTIONS)
            predictions.setdefault(m.variant, []).append((ids, avd))
            record.update(ccc=metrics["ccc"], balanced_ccc=metrics.get("balanced_ccc"))
        if classes:
            ids, codes, _, _ = prediction_file.read_class_predictions(run / layout.DEV_CLASS_PREDICTIONS, classes)
            class_predictions.setdefault(m.variant, []).append((ids, np.array([classes.index(c) for c in codes])))
            record["categorical"] = {key: metrics["categorical"][key]
                                     for key in ("rows", "macro_f1", "accuracy", "balanced_accuracy")}
        v["members"].append(record)
    for v in variants.values():
        if not v["members"]:  # every seed diverged: nothing to average
            v["mean"], v["std"], v["rows"] = {}, {}, None
            if classes:
                v["class_rows"] = None
            continue
        table = {}
        if attributes:
            table = {f"ccc_{a}": [x["ccc"][a] for x in v["members"]] for a in ("arousal", "valence", "dominance",
                                                                                 "mean")}
            balanced = [x["balanced_ccc"]["mean"] for x in v["members"] if x["balanced_ccc"]]
            if balanced:
                table["balanced_ccc_mean"] = balanced
        for key in ("macro_f1", "accuracy", "balanced_accuracy") if classes else ():
            table[key] = [x["categorical"][key] for x in v["members"]]
        v["mean"] = {key: float(np.mean(values)) for key, values in table.items()}
        # The sample std (ddof 1): the spread one would see between seeds; none from a single seed.
        v["std"] = {key: float(np.std(values, ddof=1)) if len(values) > 1 else None for key, values in table.items()}
        v["rows"] = v["members"][0]["rows"]
        if classes:  # the Development utterances with a class (under both, fewer than the rows scored for CCC)
            v["class_rows"] = v["members"][0]["categorical"]["rows"]
    summary = {"format": SWEEP_FORMAT, "split": data.dev_split,
               "seeds": list(range(cfg.base.seed, cfg.base.seed + cfg.seeds)),
               "reference": cfg.reference, "base_options": _jsonable_options(cfg.base), "variants": variants}
    if classes:
        summary = {"format": SWEEP_FORMAT, "task": task, "classes": classes, **{k: v for k, v in summary.items()
                                                                                if k != "format"}}
    if attributes:
        summary["comparisons"] = _compare(
            cfg, variants, predictions, lambda ids: data.avd[[truth_of[i] for i in ids]].astype(np.float64),
            lambda truth, v, r: paired_bootstrap(truth, v, r, resamples=cfg.resamples, seed=cfg.base.seed))
    if classes:  # the class index of every row (-1: none, e.g. O/X under 8 classes): only rows with one count
        target = {uid: classes.index(str(e)) if str(e) in classes else -1
                  for uid, e in zip(data.ids.tolist(), data.emotions)}
        summary["macro_f1_comparisons"] = _compare(
            cfg, variants, class_predictions, lambda ids: np.array([target[i] for i in ids], dtype=np.int64),
            lambda truth, v, r: paired_bootstrap_macro_f1(truth, v, r, len(classes), resamples=cfg.resamples,
                                                          seed=cfg.base.seed),
            keep=lambda uid: target.get(uid, -1) >= 0)
    return summary


def _compare(cfg, variants: dict, predictions: dict, truth_of_ids, bootstrap, keep=None) -> dict:
    """Every variant against the reference on the utterances (those `keep` keeps) that every member of
    both was scored on: bootstrap(truth_of_ids(ids), variant's, reference's predictions of ids). None
    where a side has no member (every seed diverged) or fewer than 2 utterances are common."""
    comparisons = {}
    for name in variants:
        if name == cfg.reference:
            continue
        if name not in predictions or cfg.reference not in predictions:  # every seed of one side diverged
            comparisons[name] = None
            continue
        common = set.intersection(*(set(ids) for ids, _ in predictions[name] + predictions[cfg.reference]))
        ids = sorted(i for i in common if keep is None or keep(i))
        if len(ids) < 2:
            comparisons[name] = None
            continue
        comparisons[name] = bootstrap(truth_of_ids(ids), _aligned(predictions[name], ids),
                                      _aligned(predictions[cfg.reference], ids))
    return comparisons


def _aligned(member_predictions: list[tuple[list[str], np.ndarray]], ids: list[str]) -> np.ndarray:
    """(S, len(ids), ...): each seed's predictions of `ids` (attributes (3,) each, or a class index), in that order."""
    out = []
    for member_ids, pred in member_predictions:
        where = {uid: i for i, uid in enumerate(member_ids)}
        out.append(pred[[where[i] for i in ids]])
    stacked = np.stack(out)
    return stacked if stacked.dtype.kind in "iu" else stacked.astype(np.float64)


def _options(cfg, name: str) -> dict:
    for v in cfg.all_variants():
        if v.name == name:
            return dict(v.options)
    return {}


def _jsonable_options(base) -> dict:
    d = base.to_dict()
    for key in ("out", "overwrite", "progress", "tensorboard", "seed"):
        d.pop(key, None)
    return d
