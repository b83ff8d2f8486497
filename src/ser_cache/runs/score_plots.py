"""Figures of scores: an evaluation's (predicted vs true, CCC per emotion class, gender confusion;
for a class run the normalised class confusion matrix and F1 per class) and an ensemble's (its
members' CCC beside its own). docs/plots.md says what each shows.

The drawing and writing (an off-screen Figure, atomic PNG/SVG), the sizes and the colours are
plots.py's; `ser_cache.runs.plots` also gives this module's functions, under the same names.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ser_cache.runs.plots import (
    CLASS_CONFUSION,
    CLASS_CONFUSION_SIZE,
    CLASS_F1,
    COLOURS,
    CONFUSION,
    CONFUSION_SIZE,
    EMOTION_NAMES,
    ENSEMBLE,
    ENSEMBLE_INCHES_PER_BAR,
    ENSEMBLE_SIZE,
    HEXBIN_ABOVE,
    MIN_CLASS_ROWS,
    OTHER_EMOTIONS,
    PER_CLASS,
    PER_CLASS_SIZE,
    SCATTER,
    SCATTER_SIZE,
    PlotError,
    new_figure,
    save_figure,
)
from ser_cache.system.metrics import ATTRIBUTES, PRIMARY_EMOTIONS, ccc

# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class EvaluationResult:
    paths: list[Path]
    ccc: dict[str, float]  # per attribute, as drawn in the scatter titles
    ccc_per_class: dict[str, dict[str, float]]  # class -> attribute -> CCC (NaN: undefined), classes drawn
    gender_labels: list[str] = field(default_factory=list)
    gender_confusion: np.ndarray | None = None  # rows: true label, columns: predicted, in gender_labels' order
    class_counts: dict[str, int] = field(default_factory=dict)  # utterances of each class drawn
    skipped_classes: dict[str, int] = field(default_factory=dict)  # classes with too few utterances -> rows
    figures: dict = field(default_factory=dict, repr=False, compare=False)  # file name -> matplotlib Figure


def _gender_strings(values, labels: Sequence[str] | None, name: str) -> np.ndarray:
    """Gender labels as strings; integer codes are indices into `labels`."""
    array = np.asarray(values)
    if array.dtype.kind in "iu":
        if not labels:
            raise PlotError(f"{name}: integer gender codes need gender_labels to name them")
        if array.size and (array.min() < 0 or array.max() >= len(labels)):
            raise PlotError(f"{name}: gender codes must lie in 0..{len(labels) - 1} (gender_labels {list(labels)})")
        return np.asarray(labels, dtype=object)[array]
    return np.asarray(["" if v is None else str(v) for v in array.tolist()], dtype=object)


def evaluation_plots(pred_avd, true_avd, emotions: Sequence[str | None], out_dir: str | Path, gender_true=None,
                     gender_pred=None, gender_labels: Sequence[str] | None = None, title: str = "",
                     svg: bool = False, min_class_rows: int = MIN_CLASS_ROWS) -> EvaluationResult:
    """Predicted vs true per attribute, CCC per primary emotion class, and (with genders) a confusion matrix.

    Classes with fewer than `min_class_rows` utterances are not drawn (the figure names them).
    """
    pred = np.asarray(pred_avd, dtype=np.float64)
    true = np.asarray(true_avd, dtype=np.float64)
    if pred.ndim != 2 or pred.shape[1] != 3 or pred.shape != true.shape:
        raise PlotError(f"predictions and labels must both be (N, 3) arousal/valence/dominance; got {pred.shape} "
                        f"and {true.shape}")
    if len(pred) < 2:
        raise PlotError(f"{len(pred)} labelled utterance(s); at least 2 are needed for a CCC")
    codes = np.asarray(["" if e is None else str(e) for e in emotions], dtype=object)
    if len(codes) != len(pred):
        raise PlotError(f"{len(codes)} emotion(s) for {len(pred)} prediction(s); give one per row")
    if (gender_true is None) != (gender_pred is None):
        raise PlotError("give both gender_true and gender_pred, or neither")
    out_dir = Path(out_dir)
    prefix = f"{title}: " if title else ""
    paths: list[Path] = []

    # Predicted against true, one panel per attribute.
    scores = {a: ccc(pred[:, j], true[:, j]) for j, a in enumerate(ATTRIBUTES)}
    fig = new_figure(SCATTER_SIZE)
    low = float(min(pred.min(), true.min()))
    high = float(max(pred.max(), true.max()))
    for j, (ax, attr) in enumerate(zip(fig.subplots(1, 3), ATTRIBUTES)):
        if len(pred) > HEXBIN_ABOVE:
            hb = ax.hexbin(true[:, j], pred[:, j], gridsize=40, mincnt=1, bins="log", cmap="viridis",
                           extent=(low, high, low, high))
            fig.colorbar(hb, ax=ax, label="utterances")
        else:
            ax.scatter(true[:, j], pred[:, j], s=8, alpha=0.6)
        ax.plot([low, high], [low, high], color="red", linewidth=1, label="identity")
        ax.set(title=f"{attr}: CCC {scores[attr]:.3f}", xlabel="true", ylabel="predicted",
               xlim=(low, high), ylim=(low, high), aspect="equal")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{prefix}predicted vs true ({len(pred)} utterances)")
    paths += save_figure(fig, out_dir / SCATTER, svg)
    figures = {SCATTER: fig}

    # CCC per primary emotion class.
    per_class, counts, skipped = class_cccs(pred, true, codes, min_class_rows)
    figures[PER_CLASS] = _per_class_figure(per_class, counts, skipped, codes, min_class_rows, prefix)
    paths += save_figure(figures[PER_CLASS], out_dir / PER_CLASS, svg)

    # Gender: true against predicted.
    labels: list[str] = []
    confusion = None
    if gender_true is not None:
        from sklearn.metrics import confusion_matrix

        t = _gender_strings(gender_true, gender_labels, "gender_true")
        p = _gender_strings(gender_pred, gender_labels, "gender_pred")
        if len(t) != len(p):
            raise PlotError(f"gender_true has {len(t)} row(s), gender_pred {len(p)}; give one of each per row")
        labels = list(gender_labels) if gender_labels else sorted({*t.tolist(), *p.tolist()} - {""})
        known = np.isin(t, labels)  # rows whose true gender is unknown ("", "Unknown") are not scored
        if not known.any():
            raise PlotError(f"no row has a true gender among {labels}; cannot draw a confusion matrix")
        confusion = confusion_matrix(t[known].astype(str), p[known].astype(str), labels=labels)
        figures[CONFUSION] = _confusion_figure(confusion, labels, prefix)
        paths += save_figure(figures[CONFUSION], out_dir / CONFUSION, svg)
    return EvaluationResult(paths=paths, ccc=scores, ccc_per_class=per_class, gender_labels=labels,
                            gender_confusion=confusion, class_counts=counts, skipped_classes=skipped,
                            figures=figures)


def class_cccs(pred: np.ndarray, true: np.ndarray, codes: np.ndarray, min_rows: int):
    """(class -> attribute -> CCC, class -> rows, skipped class -> rows) over the primary emotion classes.

    A class with fewer than `min_rows` utterances is skipped: a CCC over a handful of points says
    nothing. Where a class's true values of an attribute do not vary, its CCC is undefined (the
    formula gives 0 or 1 whatever the predictions): NaN, drawn as "n/a".
    """
    per_class, counts, skipped = {}, {}, {}
    for code in PRIMARY_EMOTIONS:
        rows = np.flatnonzero(codes == code)
        if rows.size == 0:
            continue
        if rows.size < min_rows:
            skipped[code] = int(rows.size)
            continue
        counts[code] = int(rows.size)
        per_class[code] = {a: ccc(pred[rows, j], true[rows, j]) if np.ptp(true[rows, j]) > 0 else math.nan
                           for j, a in enumerate(ATTRIBUTES)}
    return per_class, counts, skipped


def _emotion(code: str) -> str:
    return f"{EMOTION_NAMES[code]} ({code})"


def _per_class_figure(per_class: dict, counts: dict, skipped: dict, codes: np.ndarray, min_rows: int, prefix: str):
    fig = new_figure(PER_CLASS_SIZE)
    ax = fig.subplots()
    if per_class:
        classes = list(per_class)
        x = np.arange(len(classes))
        width = 0.8 / len(ATTRIBUTES)
        for j, attr in enumerate(ATTRIBUTES):
            offsets = x + (j - 1) * width
            values = [per_class[c][attr] for c in classes]
            ax.bar(offsets, values, width, label=attr, color=COLOURS[attr])
            for where, value in zip(offsets, values):
                if math.isnan(value):  # no bar for an undefined CCC, and no 0 either: say so
                    ax.text(where, 0.02, "n/a", ha="center", va="bottom", fontsize="small",
                            color=COLOURS[attr])
        ax.set_xticks(x, [f"{EMOTION_NAMES[c]} ({c})\nn={counts[c]}" for c in classes])
        ax.axhline(0, color="black", linewidth=0.8)
        values = [v for table in per_class.values() for v in table.values() if not math.isnan(v)] or [0.0]
        ax.set_ylim(min(0.0, min(values)) - 0.05, max(1.0, max(values)) + 0.05)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    else:
        ax.text(0.5, 0.5, f"no primary emotion class with {min_rows} utterances or more", ha="center",
                va="center", transform=ax.transAxes)
    notes = []
    if skipped:
        notes.append(f"not drawn, fewer than {min_rows} utterances: "
                     + ", ".join(f"{_emotion(c)} n={n}" for c, n in skipped.items()))
    others = {c: int(np.sum(codes == c)) for c in OTHER_EMOTIONS}
    if any(others.values()):
        notes.append("not emotion classes: " + ", ".join(f"{_emotion(c)} n={n}" for c, n in others.items() if n))
    if notes:
        fig.text(0.01, 0.0, "\n".join(notes), fontsize="small", ha="left", va="bottom")
        fig.get_layout_engine().set(rect=(0, 0.05 * len(notes), 1, 1 - 0.05 * len(notes)))
    ax.set(title=f"{prefix}CCC per primary emotion class", ylabel="CCC")
    ax.grid(axis="y", alpha=0.3)
    return fig


def _confusion_figure(confusion: np.ndarray, labels: list[str], prefix: str):
    """Coloured by the share of each true gender's rows (a rarer gender's errors show as clearly as a
    common one's); each cell gives its count and that share."""
    fig = new_figure(CONFUSION_SIZE)
    ax = fig.subplots()
    shares = row_shares(confusion)
    im = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, label="share of the true gender's rows")
    for (i, k), n in np.ndenumerate(confusion):
        ax.text(k, i, f"{n}\n{shares[i, k]:.0%}", ha="center", va="center",
                color="white" if shares[i, k] > 0.5 else "black")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), [f"{label}\n(n={n})" for label, n in zip(labels, confusion.sum(axis=1))])
    accuracy = np.trace(confusion) / max(confusion.sum(), 1)
    ax.set(xlabel="predicted", ylabel="true")
    ax.set_title(f"{prefix}gender\naccuracy {accuracy:.3f}", fontsize="medium")  # two lines: a 5-inch figure
    return fig


def row_shares(confusion: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (a row without rows: zeros)."""
    totals = confusion.sum(axis=1, keepdims=True)
    return np.divide(confusion, totals, out=np.zeros(confusion.shape), where=totals > 0)


@dataclass(frozen=True)
class ClassPlotsResult:
    paths: list[Path]
    figures: dict = field(default_factory=dict, repr=False, compare=False)  # file name -> matplotlib Figure


def class_plots(scores: Mapping, out_dir: str | Path, title: str = "", svg: bool = False) -> ClassPlotsResult:
    """A class run's figures from its scores (system.metrics.class_metrics): the confusion matrix
    normalised by the true class's rows (CLASS_CONFUSION) and the F1 of every class with the
    macro-F1 (CLASS_F1). Each file is written atomically."""
    classes = [str(c) for c in scores.get("classes") or ()]
    confusion = np.asarray(scores.get("confusion"), dtype=np.int64)
    if not classes or confusion.shape != (len(classes), len(classes)):
        raise PlotError(f"class scores need their classes and a {len(classes)}×{len(classes)} confusion matrix; "
                        f"got {confusion.shape}")
    if confusion.sum() == 0:
        raise PlotError("no row with a class to draw a confusion matrix from")
    out_dir = Path(out_dir)
    prefix = f"{title}: " if title else ""
    figures = {CLASS_CONFUSION: _class_confusion_figure(confusion, classes, prefix),
               CLASS_F1: _class_f1_figure(scores, classes, prefix)}
    paths: list[Path] = []
    for name, fig in figures.items():
        paths += save_figure(fig, out_dir / name, svg)
    return ClassPlotsResult(paths=paths, figures=figures)


def _class_confusion_figure(confusion: np.ndarray, classes: list[str], prefix: str):
    """Coloured by the share of each true class's rows (a rare class's errors show as clearly as a
    common one's); each cell gives its share and count."""
    fig = new_figure(CLASS_CONFUSION_SIZE)
    ax = fig.subplots()
    shares = row_shares(confusion)
    im = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, label="share of the true class's rows")
    for (i, k), n in np.ndenumerate(confusion):
        if n:
            ax.text(k, i, f"{shares[i, k]:.0%}\n{n}", ha="center", va="center", fontsize="x-small",
                    color="white" if shares[i, k] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), [f"{_emotion(c)} n={n}" for c, n in zip(classes, confusion.sum(axis=1))])
    accuracy = np.trace(confusion) / max(confusion.sum(), 1)
    ax.set(xlabel="predicted", ylabel="true")
    ax.set_title(f"{prefix}emotion class\naccuracy {accuracy:.3f} ({int(confusion.sum())} utterances)",
                 fontsize="medium")
    return fig


def _class_f1_figure(scores: Mapping, classes: list[str], prefix: str):
    fig = new_figure(PER_CLASS_SIZE)
    ax = fig.subplots()
    per_class = scores["per_class"]
    x = np.arange(len(classes))
    values = [float(per_class[c]["f1"]) for c in classes]
    ax.bar(x, values, 0.6, color="tab:blue")
    for where, value in zip(x, values):
        ax.text(where, value + 0.01, f"{value:.2f}", ha="center", va="bottom", fontsize="small")
    macro = float(scores["macro_f1"])
    ax.axhline(macro, color="tab:orange", linewidth=1.5, label=f"macro-F1 {macro:.3f}")
    ax.set_xticks(x, [f"{_emotion(c)}\nn={per_class[c]['support']}" for c in classes], fontsize="small")
    ax.set_ylim(0.0, 1.05)
    ax.legend(fontsize="small", loc="upper right")
    ax.set(title=f"{prefix}F1 per emotion class", ylabel="F1")
    ax.grid(axis="y", alpha=0.3)
    return fig


# --------------------------------------------------------------------------- ensemble


@dataclass(frozen=True)
class EnsembleResult:
    paths: list[Path]
    names: list[str]  # the members, then "ensemble"
    scores: dict[str, dict[str, float]]  # name -> arousal, valence, dominance, mean
    split: str | None = None  # the split scored, as the title names it
    figure: object = field(default=None, repr=False, compare=False)  # the matplotlib Figure written


def _ccc_scores(scores: Mapping, name: str) -> dict[str, float]:
    """A CCC table (attribute -> CCC), or a score dict holding one under "ccc" (ensemble/evaluate's)."""
    table = scores.get("ccc", scores) if isinstance(scores, Mapping) else None
    if not isinstance(table, Mapping) or not all(a in table for a in ATTRIBUTES):
        raise PlotError(f"{name}: expected CCCs for {', '.join(ATTRIBUTES)}; got {scores!r:.80}")
    out = {a: float(table[a]) for a in ATTRIBUTES}
    out["mean"] = float(table["mean"]) if "mean" in table else float(np.mean(list(out.values())))
    return out


def ensemble_size(names: Sequence[str]) -> tuple[float, float]:
    """ENSEMBLE_SIZE, wider where more bars (and longer names in the legend beside them) need room:
    each bar's CCC is written level above it, so a bar must be as wide as "0.655" in small type."""
    bars = 4 * len(names)  # arousal, valence, dominance, mean
    axes = bars / 0.8 * ENSEMBLE_INCHES_PER_BAR  # the bars of a group fill 0.8 of its width
    legend = 0.7 + 0.075 * max(map(len, names))
    return (max(ENSEMBLE_SIZE[0], axes + legend + 0.9), ENSEMBLE_SIZE[1])


def ensemble_plots(member_names: Sequence[str], member_scores: Sequence[Mapping], ensemble_scores: Mapping,
                   out_dir: str | Path, svg: bool = False, split: str | None = None) -> EnsembleResult:
    """The members' and the ensemble's CCC per attribute (and mean), side by side; `<out_dir>/ensemble.png`.

    `split`: the split scored, named in the title (default: the "split" the score dicts carry).
    """
    if len(member_names) != len(member_scores):
        raise PlotError(f"{len(member_names)} member name(s) for {len(member_scores)} score table(s)")
    if not member_names:
        raise PlotError("no members to compare the ensemble with")
    names = [*map(str, member_names), "ensemble"]
    tables = [_ccc_scores(s, n) for n, s in zip(member_names, member_scores)]
    tables.append(_ccc_scores(ensemble_scores, "ensemble"))
    scores = dict(zip(names, tables))
    if split is None and isinstance(ensemble_scores, Mapping) and ensemble_scores.get("split"):
        split = str(ensemble_scores["split"])

    keys = (*ATTRIBUTES, "mean")
    fig = new_figure(ensemble_size(names))
    ax = fig.subplots()
    x = np.arange(len(keys))
    width = 0.8 / len(names)
    for i, (name, table) in enumerate(scores.items()):
        offset = (i - (len(names) - 1) / 2) * width
        style = {"color": "black"} if name == "ensemble" else {}
        bars = ax.bar(x + offset, [table[k] for k in keys], width, label=name, **style)
        ax.bar_label(bars, fmt="%.3f", fontsize="small", padding=2)  # level: the figure is wide enough
    ax.set_xticks(x, keys)
    ax.axhline(0, color="black", linewidth=0.8)
    on = f" on {split}" if split else ""
    ax.set(title=f"CCC{on} of {len(member_names)} member(s) and their ensemble", ylabel="CCC")
    values = [v for t in tables for v in t.values()]
    ax.set_ylim(min(0.0, min(values)) - (0.1 if min(values) < 0 else 0), max(1.0, max(values)) + 0.1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    paths = save_figure(fig, Path(out_dir) / ENSEMBLE, svg)
    return EnsembleResult(paths=paths, names=names, scores=scores, split=split, figure=fig)


# --------------------------------------------------------------------------- a layer probe (probe-layers)

PROBE_PANEL = (4.0, 3.6)  # inches per score panel
PROBE_LABELS = {"ccc_arousal": "arousal CCC", "ccc_valence": "valence CCC", "ccc_dominance": "dominance CCC",
                "ccc_mean": "mean CCC", "macro_f1": "macro-F1"}
PROBE_COLOURS = {"ccc_arousal": COLOURS["arousal"], "ccc_valence": COLOURS["valence"],
                 "ccc_dominance": COLOURS["dominance"], "ccc_mean": COLOURS["mean"], "macro_f1": "tab:purple"}


@dataclass(frozen=True)
class ProbeFigureResult:
    paths: list[Path]
    layers: list[int]
    levels: dict[str, list[float]]  # score → its value at each layer, as drawn
    weighted: dict[str, float]  # score → the weighted sum's level (the line)
    figure: object = field(default=None, repr=False, compare=False)


def layer_probe_plot(rows: Sequence[Mapping], interval: Mapping[str, Sequence[float]], png: str | Path, *,
                     columns: Sequence[str], split: str = "Development", title: str = "", confidence: float = 0.95,
                     svg: bool = False) -> ProbeFigureResult:
    """One panel per score (CCC per attribute and their mean, macro-F1): the score of each hidden state
    alone against its index (mean over seeds, ± std as error bars with several), the learned weighting's
    level a dashed line and its bootstrap interval a band. `rows`: probe-layers' table (one per layer,
    "layer" an int, then the weighted sum's, "layer" not an int); `interval`: score → (low, high)."""
    per_layer = [r for r in rows if isinstance(r["layer"], int)]
    weighted = [r for r in rows if not isinstance(r["layer"], int)]
    if not per_layer or len(weighted) != 1:
        raise PlotError("a layer probe's table needs a row per layer and one of the weighted sum")
    layers = [int(r["layer"]) for r in per_layer]
    fig = new_figure((PROBE_PANEL[0] * len(columns) + 1.0, PROBE_PANEL[1]))
    axes = fig.subplots(1, len(columns), squeeze=False)[0]
    levels, lines = {}, {}
    for ax, c in zip(axes, columns):
        y = [math.nan if r.get(c) is None else float(r[c]) for r in per_layer]
        err = [0.0 if r.get(f"{c}_std") is None else float(r[f"{c}_std"]) for r in per_layer]
        colour = PROBE_COLOURS.get(c, "black")
        ax.errorbar(layers, y, yerr=err if any(err) else None, color=colour, marker="o", markersize=4, linewidth=1.5,
                    capsize=2, label="one hidden state")
        level = weighted[0].get(c)
        if level is not None:
            lines[c] = float(level)
            ax.axhline(float(level), color="black", linestyle="--", linewidth=1.2, label="learned weighting")
            if c in interval:
                low, high = interval[c]
                ax.axhspan(float(low), float(high), color="gray", alpha=0.25,
                           label=f"its {confidence:.0%} bootstrap interval")
        levels[c] = y
        ax.set(title=PROBE_LABELS.get(c, c), xlabel="hidden state (transformers numbering)",
               ylabel=f"{split} {PROBE_LABELS.get(c, c)}")
        ax.grid(alpha=0.3)
        ax.set_xticks(layers if len(layers) <= 13 else layers[::max(1, len(layers) // 12)])
    axes[0].legend(fontsize="small", loc="best")
    if title:
        fig.suptitle(title)
    paths = save_figure(fig, Path(png), svg)
    return ProbeFigureResult(paths=paths, layers=layers, levels=levels, weighted=lines, figure=fig)
