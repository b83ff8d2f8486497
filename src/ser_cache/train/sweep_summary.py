"""The summary of a sweep (sweep.json): per variant its members' Development scores and their mean ±
std over seeds, and every variant against the reference in a paired bootstrap (stats.py).

Read from the members' run directories (metrics.json, predictions_dev.csv), so members reused from an
earlier sweep count like members trained now. A member whose training diverged has no run: it is
listed under its variant's "diverged" and left out of the means and the comparisons, which say so.
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
    from ser_cache.train.stats import paired_bootstrap

    diverged = diverged or {}
    truth_of = {uid: i for i, uid in enumerate(data.ids.tolist())}
    variants: dict[str, dict] = {}
    predictions: dict[str, list[tuple[list[str], np.ndarray]]] = {}
    for m in members:
        v = variants.setdefault(m.variant, {"options": _options(cfg, m.variant), "members": [], "diverged": []})
        failed = diverged.get(f"{m.variant}/seed-{m.seed}")
        if failed is not None:
            v["diverged"].append({"seed": m.seed, **failed})
            continue
        metrics = json.loads((Path(m.cfg.out) / layout.METRICS).read_text())
        ids, avd = prediction_file.read_predictions(Path(m.cfg.out) / layout.DEV_PREDICTIONS)
        predictions.setdefault(m.variant, []).append((ids, avd))
        v["members"].append({"seed": m.seed, "run": str(m.cfg.out), "best_epoch": metrics["best_epoch"],
                             "rows": metrics["rows"], "ccc": metrics["ccc"],
                             "balanced_ccc": metrics.get("balanced_ccc")})
    for v in variants.values():
        if not v["members"]:  # every seed diverged: nothing to average
            v["mean"], v["std"], v["rows"] = {}, {}, None
            continue
        table = {f"ccc_{a}": [x["ccc"][a] for x in v["members"]] for a in ("arousal", "valence", "dominance", "mean")}
        balanced = [x["balanced_ccc"]["mean"] for x in v["members"] if x["balanced_ccc"]]
        if balanced:
            table["balanced_ccc_mean"] = balanced
        v["mean"] = {key: float(np.mean(values)) for key, values in table.items()}
        # The sample std (ddof 1): the spread one would see between seeds; none from a single seed.
        v["std"] = {key: float(np.std(values, ddof=1)) if len(values) > 1 else None for key, values in table.items()}
        v["rows"] = v["members"][0]["rows"]
    comparisons = {}
    for name in variants:
        if name == cfg.reference:
            continue
        if name not in predictions or cfg.reference not in predictions:  # every seed of one side diverged
            comparisons[name] = None
            continue
        common = set.intersection(*(set(ids) for ids, _ in predictions[name] + predictions[cfg.reference]))
        ids = sorted(common)
        if len(ids) < 2:
            comparisons[name] = None
            continue
        truth = data.avd[[truth_of[i] for i in ids]].astype(np.float64)
        comparisons[name] = paired_bootstrap(truth, _aligned(predictions[name], ids),
                                             _aligned(predictions[cfg.reference], ids), resamples=cfg.resamples,
                                             seed=cfg.base.seed)
    return {"format": SWEEP_FORMAT, "split": data.dev_split,
            "seeds": list(range(cfg.base.seed, cfg.base.seed + cfg.seeds)),
            "reference": cfg.reference, "base_options": _jsonable_options(cfg.base), "variants": variants,
            "comparisons": comparisons}


def _aligned(member_predictions: list[tuple[list[str], np.ndarray]], ids: list[str]) -> np.ndarray:
    """(S, len(ids), 3): each seed's predictions of `ids`, in that order."""
    out = []
    for member_ids, avd in member_predictions:
        where = {uid: i for i, uid in enumerate(member_ids)}
        out.append(avd[[where[i] for i in ids]])
    return np.stack(out).astype(np.float64)


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
