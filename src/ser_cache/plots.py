"""Figures of runs, evaluations, ensembles and stores: PNG (and SVG) files, written atomically.

Each function draws one kind of figure, writes it, and returns the paths written and the numbers
drawn (so a test, or a caller, can check the figure says what the data says). What each figure
shows is documented for users in docs/plots.md.

Why no pyplot: pyplot keeps global state (a current figure, a backend chosen for the whole
process). A figure built as `matplotlib.figure.Figure` on a `FigureCanvasAgg` renders off-screen
and leaves a user's interactive backend alone. matplotlib and scikit-learn are imported inside the
functions, so importing this module (the CLI does, for PlotError) costs nothing.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ser_cache import runs
from ser_cache.atomic import atomic_path
from ser_cache.metrics import ATTRIBUTES, PRIMARY_EMOTIONS, ccc

# Sizes in inches at DPI dots per inch: a PNG is exactly (width * DPI) x (height * DPI) pixels.
DPI = 100
CURVES_SIZE = (12.0, 4.5)
SCATTER_SIZE = (13.5, 4.5)
PER_CLASS_SIZE = (9.0, 4.5)
CONFUSION_SIZE = (5.0, 4.5)
ENSEMBLE_SIZE = (9.0, 4.5)
TSNE_SIZE = (7.0, 6.0)

HEXBIN_ABOVE = 2000  # more points than this: a hexbin (density), not a scatter that hides it

CURVES = "curves.png"
SCATTER = "scatter.png"
PER_CLASS = "ccc_per_class.png"
CONFUSION = "gender_confusion.png"
ENSEMBLE = "ensemble.png"

LOSS_PARTS = ("ccc", "gender", "speaker")  # history.csv's loss_<part> columns besides loss_total
UNKNOWN_SPEAKERS = (None, "", "Unknown")  # MSP-Podcast writes "Unknown" where no speaker is known


class PlotError(Exception):
    """A figure cannot be drawn from what was given; the message names the input and the reason."""


# --------------------------------------------------------------------------- drawing and writing


def _figure(size: tuple[float, float]):
    """A Figure on its own Agg canvas: nothing global (pyplot's state, the backend) changes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


# Names that mean a figure file of another format: refused rather than taken for a folder's name.
OTHER_FIGURE_SUFFIXES = (".svg", ".pdf", ".eps", ".ps", ".jpg", ".jpeg", ".tif", ".tiff", ".gif", ".webp")


def figure_path(out: str | Path | None, default: Path) -> Path:
    """Where a figure goes, the same rule for every `plot` command's --out: a name ending in .png is
    the file itself; another figure format is refused; anything else is a folder that gets
    `default`'s file name; None is `default`."""
    if out is None:
        return Path(default)
    out = Path(out)
    if out.suffix.lower() in OTHER_FIGURE_SUFFIXES:
        raise PlotError(f"--out {out}: the figure is a PNG; give a name ending in .png (--svg writes the SVG "
                        "beside it) or a folder")
    return out if out.suffix.lower() == ".png" else out / Path(default).name


def _save(fig, png: Path, svg: bool) -> list[Path]:
    """The PNG (and the SVG beside it), each through a temporary file renamed into place."""
    png = Path(png)
    written = []
    for path, fmt in [(png, "png")] + ([(png.with_suffix(".svg"), "svg")] if svg else []):
        with atomic_path(path) as tmp:
            # The temporary name does not end in .png, so the format is given, not guessed.
            fig.savefig(tmp, format=fmt, dpi=DPI)
        written.append(path)
    return written


def _nan(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


# --------------------------------------------------------------------------- training curves


@dataclass(frozen=True)
class CurvesResult:
    paths: list[Path]
    epochs: list[int]
    losses: dict[str, list[float]]  # "total" and every part that is not zero throughout
    dev_ccc: dict[str, list[float]]  # arousal, valence, dominance, mean
    balanced_mean: list[float] | None  # None when the run has no balanced CCC
    kept_epoch: int | None
    finished: bool


def read_history(run_dir: str | Path) -> tuple[list[dict], int | None, bool]:
    """(history rows, the kept epoch, finished?) of a run directory.

    A finished run: history.csv and config.json's best_epoch. A fine-tuning run still in progress
    (in_progress.json, no config.json): its checkpoint's history and its best epoch so far.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PlotError(f"{run_dir}: no such run directory")
    if runs.is_unfinished_run(run_dir):
        from ser_cache.checkpoint import CHECKPOINT, LEGACY_CHECKPOINT, CheckpointError, read_checkpoint

        if not (run_dir / CHECKPOINT).is_file() and not (run_dir / LEGACY_CHECKPOINT).exists():
            raise PlotError(f"{run_dir}: an unfinished run without {CHECKPOINT}: it has not finished an epoch yet")
        try:
            ckpt = read_checkpoint(run_dir, tensors=False)  # the header alone: no weights are read
        except CheckpointError as exc:
            raise PlotError(str(exc)) from None
        return [dict(r) for r in ckpt["history"]], int(ckpt["best"]["epoch"]), False
    try:
        config = runs.read_config(run_dir)
    except runs.RunError as exc:
        raise PlotError(str(exc)) from None
    path = run_dir / runs.HISTORY
    if not path.is_file():
        raise PlotError(f"{run_dir}: no {runs.HISTORY}, so no curves to draw (an imported run has no "
                        "training history; a trained one lost the file)")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    kept = config.get("best_epoch")
    return rows, None if kept is None else int(kept), True


def training_curves(run_dir: str | Path, out_dir: str | Path | None = None, svg: bool = False,
                    title: str | None = None) -> CurvesResult:
    """Losses and Development CCC per epoch, the kept epoch marked; `<out_dir>/curves.png` (default: the run),
    or `out_dir` itself when it names a .png file (`figure_path`)."""
    run_dir = Path(run_dir)
    rows, kept, finished = read_history(run_dir)
    if not rows:
        raise PlotError(f"{run_dir}: the history has no epochs yet")
    if "epoch" not in rows[0] or "loss_total" not in rows[0] or "dev_ccc_mean" not in rows[0]:
        raise PlotError(f"{run_dir}: the history lacks epoch, loss_total or dev_ccc_mean; not a ser-cache run's history")
    epochs = [int(_nan(r["epoch"])) for r in rows]

    def column(name: str) -> list[float]:
        return [_nan(r.get(name)) for r in rows]

    losses = {"total": column("loss_total")}
    for part in LOSS_PARTS:
        values = column(f"loss_{part}")
        if any(np.isfinite(v) and v != 0 for v in values):
            losses[part] = values
    dev = {k: column(f"dev_ccc_{k}") for k in (*ATTRIBUTES, "mean")}
    balanced = column("dev_balanced_ccc_mean")
    balanced_mean = balanced if any(np.isfinite(balanced)) else None

    fig = _figure(CURVES_SIZE)
    ax_loss, ax_ccc = fig.subplots(1, 2)
    for name, values in losses.items():
        ax_loss.plot(epochs, values, marker=".", label=name, linewidth=2 if name == "total" else 1)
    ax_loss.set(title="training loss", xlabel="epoch", ylabel="loss")
    for name, values in dev.items():
        ax_ccc.plot(epochs, values, marker=".", label=name, linewidth=2 if name == "mean" else 1)
    if balanced_mean is not None:
        ax_ccc.plot(epochs, balanced_mean, linestyle="--", color="black", label="balanced mean")
    ax_ccc.set(title="Development CCC", xlabel="epoch", ylabel="CCC")
    if kept is not None:
        label = f"kept epoch {kept}" if finished else f"best so far: epoch {kept}"
        for ax in (ax_loss, ax_ccc):
            ax.axvline(kept, color="grey", linestyle=":", label=label)
    for ax in (ax_loss, ax_ccc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"{title or run_dir.name}" + ("" if finished else f" (in progress, {len(epochs)} epochs)"))
    paths = _save(fig, figure_path(out_dir, run_dir / CURVES), svg)
    return CurvesResult(paths=paths, epochs=epochs, losses=losses, dev_ccc=dev, balanced_mean=balanced_mean,
                        kept_epoch=kept, finished=finished)


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class EvaluationResult:
    paths: list[Path]
    ccc: dict[str, float]  # per attribute, as drawn in the scatter titles
    ccc_per_class: dict[str, dict[str, float]]  # class -> attribute -> CCC (classes with 2 rows or more)
    gender_labels: list[str] = field(default_factory=list)
    gender_confusion: np.ndarray | None = None  # rows: true label, columns: predicted, in gender_labels' order


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
                     svg: bool = False) -> EvaluationResult:
    """Predicted vs true per attribute, CCC per primary emotion class, and (with genders) a confusion matrix."""
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
    fig = _figure(SCATTER_SIZE)
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
    paths += _save(fig, out_dir / SCATTER, svg)

    # CCC per primary emotion class.
    per_class = {}
    for code in PRIMARY_EMOTIONS:
        rows = np.flatnonzero(codes == code)
        if rows.size >= 2:
            per_class[code] = {a: ccc(pred[rows, j], true[rows, j]) for j, a in enumerate(ATTRIBUTES)}
    fig = _figure(PER_CLASS_SIZE)
    ax = fig.subplots()
    if per_class:
        classes = list(per_class)
        x = np.arange(len(classes))
        width = 0.8 / len(ATTRIBUTES)
        for j, attr in enumerate(ATTRIBUTES):
            ax.bar(x + (j - 1) * width, [per_class[c][attr] for c in classes], width, label=attr)
        counts = {c: int(np.sum(codes == c)) for c in classes}
        ax.set_xticks(x, [f"{c}\n(n={counts[c]})" for c in classes])
        ax.axhline(0, color="black", linewidth=0.8)
        values = [v for table in per_class.values() for v in table.values()]
        ax.set_ylim(min(0.0, min(values)) - 0.05, max(1.0, max(values)) + 0.15)  # room for the legend
        ax.legend(fontsize="small", ncols=len(ATTRIBUTES), loc="upper center")
    else:
        ax.text(0.5, 0.5, "no primary emotion class with 2 utterances or more", ha="center", va="center",
                transform=ax.transAxes)
    ax.set(title=f"{prefix}CCC per primary emotion class", ylabel="CCC")
    ax.grid(axis="y", alpha=0.3)
    paths += _save(fig, out_dir / PER_CLASS, svg)

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
        fig = _figure(CONFUSION_SIZE)
        ax = fig.subplots()
        im = ax.imshow(confusion, cmap="Blues")
        fig.colorbar(im, ax=ax)
        for (i, k), n in np.ndenumerate(confusion):
            ax.text(k, i, str(n), ha="center", va="center",
                    color="white" if n > confusion.max() / 2 else "black")
        ax.set_xticks(range(len(labels)), labels)
        ax.set_yticks(range(len(labels)), labels)
        accuracy = np.trace(confusion) / max(confusion.sum(), 1)
        ax.set(xlabel="predicted", ylabel="true", title=f"{prefix}gender (accuracy {accuracy:.3f})")
        paths += _save(fig, out_dir / CONFUSION, svg)
    return EvaluationResult(paths=paths, ccc=scores, ccc_per_class=per_class, gender_labels=labels,
                            gender_confusion=confusion)


# --------------------------------------------------------------------------- ensemble


@dataclass(frozen=True)
class EnsembleResult:
    paths: list[Path]
    names: list[str]  # the members, then "ensemble"
    scores: dict[str, dict[str, float]]  # name -> arousal, valence, dominance, mean


def _ccc_scores(scores: Mapping, name: str) -> dict[str, float]:
    """A CCC table (attribute -> CCC), or a score dict holding one under "ccc" (ensemble/evaluate's)."""
    table = scores.get("ccc", scores) if isinstance(scores, Mapping) else None
    if not isinstance(table, Mapping) or not all(a in table for a in ATTRIBUTES):
        raise PlotError(f"{name}: expected CCCs for {', '.join(ATTRIBUTES)}; got {scores!r:.80}")
    out = {a: float(table[a]) for a in ATTRIBUTES}
    out["mean"] = float(table["mean"]) if "mean" in table else float(np.mean(list(out.values())))
    return out


def ensemble_plots(member_names: Sequence[str], member_scores: Sequence[Mapping], ensemble_scores: Mapping,
                   out_dir: str | Path, svg: bool = False) -> EnsembleResult:
    """The members' and the ensemble's CCC per attribute (and mean), side by side; `<out_dir>/ensemble.png`."""
    if len(member_names) != len(member_scores):
        raise PlotError(f"{len(member_names)} member name(s) for {len(member_scores)} score table(s)")
    if not member_names:
        raise PlotError("no members to compare the ensemble with")
    names = [*map(str, member_names), "ensemble"]
    tables = [_ccc_scores(s, n) for n, s in zip(member_names, member_scores)]
    tables.append(_ccc_scores(ensemble_scores, "ensemble"))
    scores = dict(zip(names, tables))

    keys = (*ATTRIBUTES, "mean")
    fig = _figure(ENSEMBLE_SIZE)
    ax = fig.subplots()
    x = np.arange(len(keys))
    width = 0.8 / len(names)
    for i, (name, table) in enumerate(scores.items()):
        offset = (i - (len(names) - 1) / 2) * width
        style = {"color": "black"} if name == "ensemble" else {}
        bars = ax.bar(x + offset, [table[k] for k in keys], width, label=name, **style)
        ax.bar_label(bars, fmt="%.3f", fontsize="x-small", rotation=90, padding=2)
    ax.set_xticks(x, keys)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set(title=f"CCC of {len(member_names)} member(s) and their ensemble", ylabel="CCC")
    ax.set_ylim(top=max(1.0, max(max(t.values()) for t in tables) + 0.1))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    paths = _save(fig, Path(out_dir) / ENSEMBLE, svg)
    return EnsembleResult(paths=paths, names=names, scores=scores)


# --------------------------------------------------------------------------- speakers (paper Fig. 2)


@dataclass(frozen=True)
class SpeakerResult:
    paths: list[Path]
    speakers: list[str]  # the speakers drawn, sorted
    ids: list[str]  # the utterances drawn, grouped by speaker
    labels: list[str]  # each utterance's speaker
    points: np.ndarray  # (n, 2) t-SNE coordinates
    silhouette_vectors: float  # on the store's vectors, cosine distance
    silhouette_tsne: float  # on the 2-D points, Euclidean distance
    eligible: int  # speakers with enough utterances


def default_tsne_path(store_path: str | Path) -> Path:
    store_path = Path(store_path)
    return store_path.with_name(f"{store_path.name.removesuffix('.zarr')}-speakers.png")


def _store_vectors(store, rows: np.ndarray, layer: int | None) -> np.ndarray:
    """(len(rows), D) float32 vectors of `rows`: frames averaged, layers averaged (or one `layer`)."""
    if store.is_frames:
        if layer is not None:
            raise PlotError(f"{store.path}: a frame store has no layers; leave out the layer")
    elif layer is not None and len(store.feature_shape) < 2:
        # A pooled store holds one (D,) vector per utterance: a layer asked for would be ignored silently.
        raise PlotError(f"--layer {layer}: store {store.path} holds one vector of {store.feature_shape} per "
                        "utterance, no layers; leave --layer out (it picks a layer of a layered store)")
        _, frames, _ = store.read_frames(rows)
        return frames.mean()
    chunk_of = rows // store.chunk_rows
    out = None
    for chunk in np.unique(chunk_of).tolist():  # whole chunks, only those holding a drawn row
        where = np.flatnonzero(chunk_of == chunk)
        start, _ = store.chunk_bounds(chunk)
        block, _ = store.read_chunk(chunk)
        picked = block[rows[where] - start].astype(np.float32)
        if picked.ndim == 3:  # (n, layers, D)
            if layer is None:
                picked = picked.mean(axis=1)
            elif not -picked.shape[1] <= layer < picked.shape[1]:
                raise PlotError(f"{store.path}: layer {layer} does not exist; the store has {picked.shape[1]} layers")
            else:
                picked = picked[:, layer]
        elif picked.ndim != 2:
            raise PlotError(f"{store.path}: features of shape {picked.shape[1:]}; expected (D,) or (layers, D)")
        if out is None:
            out = np.empty((len(rows), picked.shape[1]), dtype=np.float32)
        out[where] = picked
    return out


def speaker_tsne(store_path: str | Path, data: str | Path, speakers: int = 10, per_speaker: int = 10, seed: int = 0,
                 out: str | Path | None = None, svg: bool = False, layer: int | None = None) -> SpeakerResult:
    """Paper Fig. 2: t-SNE of `per_speaker` utterances of each of `speakers` speakers, coloured by speaker.

    Speakers are drawn (seeded) among those with at least `per_speaker` utterances that the store
    has written; their utterances likewise. The silhouette scores measure how well the vectors
    group by speaker: on the store's vectors (cosine distance) and on the 2-D points.
    """
    from sklearn.manifold import TSNE
    from sklearn.metrics import silhouette_score
    from threadpoolctl import threadpool_limits

    from ser_cache.corpus import load_corpus
    from ser_cache.store import FeatureStore

    if speakers < 2:
        raise PlotError(f"--speakers {speakers}: at least 2 speakers are needed to compare them")
    if per_speaker < 2:
        raise PlotError(f"--per-speaker {per_speaker}: at least 2 utterances per speaker are needed")
    store_path = Path(store_path)
    out = figure_path(out, default_tsne_path(store_path))  # a .png file, or a folder for the default name
    store = FeatureStore.open(store_path)
    written, _ = store.flags()
    row_of = {uid: i for i, uid in enumerate(store.ids().tolist()) if written[i]}

    by_speaker: dict[str, list[str]] = {}
    utts = load_corpus(data)
    for u in utts:
        if u.speaker not in UNKNOWN_SPEAKERS and u.id in row_of:
            by_speaker.setdefault(str(u.speaker), []).append(u.id)
    eligible = sorted(s for s, ids in by_speaker.items() if len(ids) >= per_speaker)
    if len(eligible) < speakers:
        _check_rows_match(store, utts, data)
        raise PlotError(f"{data}: {len(eligible)} speaker(s) have at least {per_speaker} utterances in "
                        f"{store_path.name} (of {len(by_speaker)} known speakers); {speakers} are asked for: "
                        f"lower --speakers or --per-speaker")

    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(eligible, size=speakers, replace=False).tolist())
    ids, labels = [], []
    for s in chosen:
        ids += sorted(rng.choice(by_speaker[s], size=per_speaker, replace=False).tolist())
        labels += [s] * per_speaker
    rows = np.array([row_of[i] for i in ids], dtype=np.int64)
    vectors = _store_vectors(store, rows, layer)

    n = len(ids)
    # A few hundred points: one thread is faster than waking (and contending for) a thread pool.
    with threadpool_limits(1):
        points = TSNE(n_components=2, perplexity=min(30, n - 1), init="pca", random_state=seed).fit_transform(vectors)
        sil_vectors = float(silhouette_score(vectors, labels, metric="cosine"))
        sil_points = float(silhouette_score(points, labels))

    fig = _figure(TSNE_SIZE)
    ax = fig.subplots()
    colours = _speaker_colours(len(chosen))
    label_array = np.asarray(labels)
    for k, s in enumerate(chosen):
        mine = label_array == s
        ax.scatter(points[mine, 0], points[mine, 1], s=25, color=colours[k], label=s)
    ax.set(xticks=[], yticks=[], xlabel="t-SNE 1", ylabel="t-SNE 2",
           title=f"{store_path.name.removesuffix('.zarr')}: {speakers} speakers × {per_speaker} utterances\n"
                 f"silhouette {sil_vectors:.3f} (vectors, cosine), {sil_points:.3f} (t-SNE)")
    ax.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.0, 0.5), title="speaker")
    paths = _save(fig, out, svg)
    return SpeakerResult(paths=paths, speakers=chosen, ids=ids, labels=labels, points=points,
                         silhouette_vectors=sil_vectors, silhouette_tsne=sil_points, eligible=len(eligible))


def _check_rows_match(store, utts, data) -> None:
    """Too few speakers because the store's rows are mostly not utterances of `data` (a store of another
    corpus): say so, rather than "lower --speakers"."""
    ids = set(store.ids().tolist())
    matched = sum(u.id in ids for u in utts)
    if matched * 2 < len(ids):
        built = store.attrs.get("corpus")
        raise PlotError(f"{store.path}: its rows do not match --data {data}: {matched} of the store's {len(ids)} "
                        f"utterance ids are in it ({len(utts)} utterances)"
                        + (f"; the store was extracted from {built}" if built else "")
                        + "; pass the corpus the store was built from")


def _speaker_colours(n: int) -> list:
    """Distinct colours: tab10 up to 10 speakers, tab20 up to 20, then a continuous map."""
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["turbo"](i / (n - 1)) for i in range(n)]


def curves_after_training(run_dir: str | Path, title: str | None = None) -> Path | None:
    """`curves.png` for a run just written; a figure that cannot be drawn only costs a warning,
    never the run (the run's files are already in place)."""
    import logging

    try:
        return training_curves(run_dir, title=title).paths[0]
    except Exception as exc:  # plotting is a by-product: report it, keep the run
        logging.getLogger(__name__).warning("%s: training curves not drawn (%s)", run_dir, exc)
        return None
