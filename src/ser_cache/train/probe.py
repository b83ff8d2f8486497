"""`ser-cache probe-layers`: which hidden state of an encoder carries the emotion — every layer of a
layered store alone, and the learned weighting of all, on the same rows: the figure of a layer
analysis in one command.

A probe is a sweep (sweep.py) and nothing else trains: its base variant is the learned softmax
weighting over the store's layers (train-heads without --layer), and one variant per hidden state
K the store holds, `layer-K: layer=NAME=K` (train-heads --layer NAME=K). Members of every layer have
models of the same shapes (heads.LayerPick is a buffer), so they train in one stack; each is
written as an ordinary run, OUT/layer-K/seed-S, equal to the run train-heads would make, and a
probe run again reuses them (a killed probe resumes). Other --features stores (a text store, say)
are inputs of every member.

Then, from the members' runs: per layer the Development CCC of each attribute and their mean (mean
± std over seeds), or macro-F1 under --task categorical (both under --task both); the weighted
sum's level with a bootstrap interval over Development utterances and seeds (stats.level_interval,
stats.macro_f1_interval); the table as probe.csv and probe.json, and the figure probe.png
(runs/score_plots.py: each score against the layer index, the weighted sum a line and its interval
a band). sweep.json holds the sweep's own comparisons (each layer against the weighted sum).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ser_cache.infra import atomic
from ser_cache.system.errors import TrainError
from ser_cache.system.metrics import ATTRIBUTES
from ser_cache.train.options import TrainHeadsConfig
from ser_cache.train.sweep import BASE, SweepConfig, Variant, sweep

log = logging.getLogger(__name__)

TABLE_CSV = "probe.csv"
TABLE_JSON = "probe.json"
FIGURE = "probe.png"
WEIGHTED = "weighted"  # the weighted sum's row in the table (the sweep's base variant)
PROBE_FORMAT = "ser-cache-probe-layers"


def variant_name(k: int) -> str:
    return f"layer-{k:02d}"


@dataclass(frozen=True)
class ProbeConfig:
    """The layered store, the options every member shares (a TrainHeadsConfig: `features` the store
    first then the other inputs, `out` the probe's folder, `seed` the first seed), and the sweep's."""

    store: Path
    base: TrainHeadsConfig
    seeds: int = 1
    members_at_once: int | None = None
    resamples: int = 1000
    confidence: float = 0.95


@dataclass
class ProbeResult:
    out: Path
    name: str  # the layered input's name
    layers: list[int]
    table: list[dict]  # one row per layer, then the weighted sum's
    interval: dict  # the weighted sum's bootstrap interval: score → (low, high)
    columns: list[str]
    split: str = "Development"
    paths: list[Path] = field(default_factory=list)
    trained: int = 0
    reused: int = 0


def store_layers(store: Path) -> tuple[str, tuple[int, ...]]:
    """The store's input name and the hidden states along its layer axis; an error for a store without
    one, or a frame store (its frames are read at one layer per run: probe a pooled store)."""
    from ser_cache.encoders.layers import has_layer_axis, stored_layers
    from ser_cache.features.store import FeatureStore
    from ser_cache.features.store_ref import StoreRef

    opened = FeatureStore.open(store)
    attrs, shape = opened.attrs, tuple(opened.feature_shape)
    name = StoreRef.of(store, attrs, shape).name
    setting = (attrs.get("settings") or {}).get("layer")
    if opened.is_frames:
        raise TrainError(f"{store}: a frame store; probe-layers trains one member per layer on the same rows and "
                         "takes a pooled store of every layer (extract --layers all, the default pooling)")
    if len(shape) != 2:
        raise TrainError(f"{store}: holds one vector per utterance (layer {setting or 'last'}), no layer axis to "
                         "probe; extract it with --layers all (or a list such as 0,6,12,18,24)")
    held = stored_layers(setting, axis_length=shape[0]) if has_layer_axis(setting) else tuple(range(shape[0]))
    return name, tuple(held)


def probe_config_sweep(cfg: ProbeConfig, name: str, layers: tuple[int, ...]) -> SweepConfig:
    """The sweep a probe is: the weighted sum as the base, a variant `layer-K: layer=NAME=K` per layer."""
    variants = tuple(Variant(variant_name(k), {"layer": (f"{name}={k}",)}) for k in layers)
    return SweepConfig(base=cfg.base, seeds=cfg.seeds, variants=variants, inputs="all", reference=BASE,
                       members_at_once=cfg.members_at_once, resamples=cfg.resamples, curves=False)


def verify(cfg: ProbeConfig) -> None:
    problems = []
    if cfg.base.layer:
        problems.append(f"--layer {' '.join(cfg.base.layer)}: probe-layers trains every layer (and their weighting) "
                        "itself; leave --layer out")
    resolved = {str(Path(p).resolve()) for p in cfg.base.features}
    if str(Path(cfg.store).resolve()) not in resolved:
        problems.append(f"{cfg.store}: the probed store must be one of the inputs")
    if not 0 < cfg.confidence < 1:
        problems.append(f"--confidence {cfg.confidence}: expected a share in (0, 1)")
    if problems:
        raise TrainError("; ".join(problems))


def probe_layers(cfg: ProbeConfig) -> ProbeResult:
    """Train (or reuse) every member, then write the table (probe.csv, probe.json) and the figure (probe.png)."""
    verify(cfg)
    name, layers = store_layers(Path(cfg.store))
    log.info("probe-layers: input %s holds hidden states %s; %d member(s) a seed (each layer and the weighted sum)",
             name, ",".join(map(str, layers)), len(layers) + 1)
    result = sweep(probe_config_sweep(cfg, name, layers))
    return summarize_probe(cfg, result.summary, name, layers, trained=result.trained, reused=result.reused)


def summarize_probe(cfg: ProbeConfig, summary: dict, name: str, layers: tuple[int, ...], *, trained: int = 0,
                    reused: int = 0) -> ProbeResult:
    """The table, the weighted sum's interval and the figure, from the sweep's summary and member runs."""
    from ser_cache.runs.score_plots import layer_probe_plot

    task = cfg.base.task
    columns = ([*(f"ccc_{a}" for a in ATTRIBUTES), "ccc_mean"] if task != "categorical" else []) + (
        ["macro_f1"] if task != "attributes" else [])
    rows = []
    for k, variant in [(k, variant_name(k)) for k in layers] + [(None, BASE)]:
        v = summary["variants"][variant]
        row = {"layer": WEIGHTED if k is None else k, "seeds": len(v["members"])}
        for c in columns:
            row[c] = v["mean"].get(c)
            row[f"{c}_std"] = v["std"].get(c)
        rows.append(row)
    interval = weighted_interval(cfg, summary)
    out = Path(cfg.base.out)
    header = ["layer", "seeds"] + [x for c in columns for x in (c, f"{c}_std")]
    atomic.write_csv_atomic(out / TABLE_CSV, header, [[_cell(r[h]) for h in header] for r in rows])
    record = {"format": PROBE_FORMAT, "input": name, "store": str(Path(cfg.store).resolve()),
              "split": summary["split"], "seeds": summary["seeds"], "layers": list(layers), "task": task,
              "table": rows, "weighted_interval": {c: list(v) for c, v in interval.items()},
              "confidence": cfg.confidence, "resamples": cfg.resamples}
    atomic.write_json_atomic(out / TABLE_JSON, record)
    drawn = layer_probe_plot(rows, interval, out / FIGURE, columns=columns, split=summary["split"],
                             title=f"{name}: each hidden state alone, and the learned weighting",
                             confidence=cfg.confidence)
    return ProbeResult(out=out, name=name, layers=list(layers), table=rows, interval=interval, columns=columns,
                       split=summary["split"], paths=[out / TABLE_CSV, out / TABLE_JSON, *drawn.paths],
                       trained=trained, reused=reused)


def _cell(x) -> str:
    if x is None:
        return ""
    return f"{x:.6f}" if isinstance(x, float) else str(x)


def weighted_interval(cfg: ProbeConfig, summary: dict) -> dict[str, tuple[float, float]]:
    """The weighted sum's bootstrap interval of each score column, from its members' Development predictions."""
    from ser_cache.data.corpus import load_corpus
    from ser_cache.runs import layout, prediction_file
    from ser_cache.system.tasks import class_codes
    from ser_cache.train.stats import level_interval, macro_f1_interval

    members = summary["variants"][BASE]["members"]
    if not members:
        return {}
    utts = {u.id: u for u in load_corpus(cfg.base.data)}
    out: dict[str, tuple[float, float]] = {}
    kw = {"resamples": cfg.resamples, "seed": cfg.base.seed, "confidence": cfg.confidence}
    if cfg.base.task != "categorical":
        preds = [prediction_file.read_predictions(Path(m["run"]) / layout.DEV_PREDICTIONS) for m in members]
        ids = sorted(set.intersection(*(set(i) for i, _ in preds)))
        stacked = np.stack([p[[{u: j for j, u in enumerate(i)}[x] for x in ids]] for i, p in preds])
        truth = np.array([utts[x].avd for x in ids], dtype=np.float64)
        r = level_interval(truth, stacked, **kw)
        for j, c in enumerate([*(f"ccc_{a}" for a in ATTRIBUTES), "ccc_mean"]):
            out[c] = (float(r["low"][j]), float(r["high"][j]))
    if cfg.base.task != "attributes":
        classes = list(class_codes(cfg.base.classes))
        preds = [prediction_file.read_class_predictions(Path(m["run"]) / layout.DEV_CLASS_PREDICTIONS, classes)[:2]
                 for m in members]
        ids = sorted(x for x in set.intersection(*(set(i) for i, _ in preds)) if utts[x].emotion in classes)
        codes = np.stack([np.array([classes.index(c[{u: j for j, u in enumerate(i)}[x]]) for x in ids])
                          for i, c in preds])
        truth = np.array([classes.index(utts[x].emotion) for x in ids])
        r = macro_f1_interval(truth, codes, len(classes), **kw)
        out["macro_f1"] = (r["low"], r["high"])
    return out

