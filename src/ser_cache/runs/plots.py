"""Figures of runs, evaluations, ensembles and stores: PNG (and SVG) files, written atomically.

This module draws a run's training curves and a store's speakers, and holds what every figure
shares (drawing, writing, sizes, colours); score_plots.py draws the evaluation and ensemble
figures on top of it.

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
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ser_cache.infra.atomic import atomic_path
from ser_cache.runs import layout, rundir
from ser_cache.system.metrics import ATTRIBUTES

# Sizes in inches at DPI dots per inch: a PNG is exactly (width * DPI) x (height * DPI) pixels.
DPI = 100
CURVES_SIZE = (12.0, 4.5)
SCATTER_SIZE = (13.5, 4.5)
PER_CLASS_SIZE = (9.0, 4.5)
CONFUSION_SIZE = (5.0, 4.5)
CLASS_CONFUSION_SIZE = (7.5, 6.5)  # 8 or 9 emotion classes: a cell holds a count and a share
ENSEMBLE_SIZE = (9.0, 4.5)  # 2 members; wider for more, or for long names (ensemble_size)
ENSEMBLE_INCHES_PER_BAR = 0.4  # a CCC written level ("0.655", small type) fits over a bar this wide
TSNE_SIZE = (7.0, 6.0)

MIN_CLASS_ROWS = 10  # a class with fewer utterances gets no CCC in ccc_per_class.png: too few points to mean anything
HEXBIN_ABOVE = 2000  # more points than this: a hexbin (density), not a scatter that hides it

CURVES = "curves.png"
SCATTER = "scatter.png"
PER_CLASS = "ccc_per_class.png"
CONFUSION = "gender_confusion.png"
CLASS_CONFUSION = "class_confusion.png"  # a class run's (Task 1) normalised confusion matrix
CLASS_F1 = "f1_per_class.png"  # a class run's F1 per class, with its macro-F1
ENSEMBLE = "ensemble.png"
LAYER_WEIGHTS = "layer_weights.png"  # a run's learned softmax weights over each layered input's hidden states
LAYER_WEIGHTS_SIZE = (9.0, 3.2)  # per input (a row of bars each)

LOSS_PARTS = ("ccc", "gender", "speaker")  # history.csv's loss_<part> columns besides loss_total
LOSS_WEIGHT_NAMES = {"gender": "α", "speaker": "β"}  # paper Eq. 1's names for the parts' weights
# MSP-Podcast's primary emotion codes; O and X are not classes (metrics.PRIMARY_EMOTIONS).
EMOTION_NAMES = {"N": "neutral", "H": "happy", "S": "sad", "A": "angry", "D": "disgust", "C": "contempt",
                 "F": "fear", "U": "surprise", "O": "other", "X": "no agreement"}
OTHER_EMOTIONS = ("O", "X")
# One colour per meaning across both panels of curves.png (a colour cycle per panel would give the
# total loss and arousal the same blue).
COLOURS = {"total": "black", "ccc": "tab:purple", "gender": "tab:brown", "speaker": "tab:pink",
           "arousal": "tab:red", "valence": "tab:blue", "dominance": "tab:green", "mean": "tab:orange",
           "balanced mean": "tab:olive", "kept": "tab:gray"}
UNKNOWN_SPEAKERS = (None, "", "Unknown")  # MSP-Podcast writes "Unknown" where no speaker is known


class PlotError(Exception):
    """A figure cannot be drawn from what was given; the message names the input and the reason."""


# --------------------------------------------------------------------------- drawing and writing


def new_figure(size: tuple[float, float]):
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


def save_figure(fig, png: Path, svg: bool) -> list[Path]:
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
    losses: dict[str, list[float]]  # "total" and every part that is not zero throughout, as drawn (weighted)
    dev_ccc: dict[str, list[float]]  # arousal, valence, dominance, mean
    balanced_mean: list[float] | None  # None when the run has no balanced CCC
    kept_epoch: int | None
    finished: bool
    weights: dict[str, float] | None = None  # the loss's part -> weight (alpha, beta); None: not recorded
    title: str = ""
    figure: object = field(default=None, repr=False, compare=False)  # the matplotlib Figure written


def read_history(run_dir: str | Path) -> tuple[list[dict], int | None, bool]:
    """(history rows, the kept epoch, finished?) of a run directory.

    A finished run: history.csv and config.json's best_epoch. A fine-tuning run still in progress
    (in_progress.json, no config.json): its checkpoint's history and its best epoch so far.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PlotError(f"{run_dir}: no such run directory")
    if layout.is_unfinished_run(run_dir):
        from ser_cache.runs.checkpoint_file import CHECKPOINT, LEGACY_CHECKPOINT, CheckpointError, read_checkpoint

        if not (run_dir / CHECKPOINT).is_file() and not (run_dir / LEGACY_CHECKPOINT).exists():
            raise PlotError(f"{run_dir}: an unfinished run without {CHECKPOINT}: it has not finished an epoch yet")
        try:
            ckpt = read_checkpoint(run_dir, tensors=False)  # the header alone: no weights are read
        except CheckpointError as exc:
            raise PlotError(str(exc)) from None
        return [dict(r) for r in ckpt["history"]], int(ckpt["best"]["epoch"]), False
    try:
        config = rundir.read_config(run_dir)
    except layout.RunError as exc:
        raise PlotError(str(exc)) from None
    path = run_dir / layout.HISTORY
    if not path.is_file():
        raise PlotError(f"{run_dir}: no {layout.HISTORY}, so no curves to draw (an imported run has no "
                        "training history; a trained one lost the file)")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    kept = config.get("best_epoch")
    return rows, None if kept is None else int(kept), True


def _run_settings(run_dir: Path, finished: bool) -> dict:
    """The run's recorded settings: config.json, or an unfinished run's in_progress.json ({} if unreadable).

    The curves need the loss weights (to draw each part as it enters the total) and what the run
    trained on (for the title); a run that lacks them is still drawn, with its parts unweighted.
    """
    try:
        if finished:
            return rundir.read_config(run_dir)
        record = json.loads((run_dir / layout.IN_PROGRESS).read_text(encoding="utf-8"))
        return record if isinstance(record, dict) else {}
    except (layout.RunError, OSError, UnicodeDecodeError, ValueError):
        return {}


def _loss_weights(settings: dict) -> dict[str, float] | None:
    """{"ccc": 1, "gender": alpha, "speaker": beta} of paper Eq. 1 as the run trained, or None if not recorded."""
    train = settings.get("train")
    if not isinstance(train, dict):
        return None
    try:
        return {"ccc": 1.0, "gender": float(train["gender_weight"]), "speaker": float(train["speaker_weight"])}
    except (KeyError, TypeError, ValueError):
        return None


def _curves_title(name: str, settings: dict) -> str:
    """The run's name and what it trained: a fine-tuned encoder, or heads on the named feature stores."""
    if settings.get("system") in ("finetuned-wavlm", "finetuned-whisper"):
        return f"{name}: fine-tuned {'WavLM' if settings['system'] == 'finetuned-wavlm' else 'Whisper'}"
    inputs = settings.get("inputs")
    names = ([str(i["name"]) for i in inputs if isinstance(i, dict) and i.get("name")]
             if isinstance(inputs, list) else [])
    return f"{name}: heads on {' + '.join(names)}" if names else name


def training_curves(run_dir: str | Path, out_dir: str | Path | None = None, svg: bool = False,
                    title: str | None = None) -> CurvesResult:
    """Losses and Development CCC per epoch, the kept epoch marked; `<out_dir>/curves.png` (default: the run),
    or `out_dir` itself when it names a .png file (`figure_path`).

    `title`: the run's name in the figure's title (default: the run directory's name).
    """
    from matplotlib.ticker import MaxNLocator

    run_dir = Path(run_dir)
    rows, kept, finished = read_history(run_dir)
    if not rows:
        raise PlotError(f"{run_dir}: the history has no epochs yet")
    if "epoch" not in rows[0] or "loss_total" not in rows[0] or "dev_ccc_mean" not in rows[0]:
        raise PlotError(f"{run_dir}: the history lacks epoch, loss_total or dev_ccc_mean; not a ser-cache run's "
                        "history")
    epochs = [int(_nan(r["epoch"])) for r in rows]
    settings = _run_settings(run_dir, finished)
    weights = _loss_weights(settings)
    train = settings.get("train") if isinstance(settings.get("train"), dict) else {}
    dev_split = str(train.get("dev_split") or "Development")

    def column(name: str) -> list[float]:
        return [_nan(r.get(name)) for r in rows]

    # Each part as it enters the total (paper Eq. 1: ccc + alpha * gender + beta * speaker), so the
    # parts add up to the total and none is drawn above it. Without recorded weights: unweighted, said so.
    losses = {"total": column("loss_total")}
    labels = {"total": "total"}
    for part in LOSS_PARTS:
        values = column(f"loss_{part}")
        if not any(np.isfinite(v) and v != 0 for v in values):
            continue
        if part == "ccc":
            losses[part], labels[part] = values, "CCC loss"
        elif weights is None:
            losses[part], labels[part] = values, f"{part} (unweighted)"
        else:
            w = weights[part]
            losses[part] = [w * v for v in values]
            labels[part] = f"{LOSS_WEIGHT_NAMES[part]}·{part} ({LOSS_WEIGHT_NAMES[part]} = {w:g})"
    dev = {k: column(f"dev_ccc_{k}") for k in (*ATTRIBUTES, "mean")}
    balanced = column("dev_balanced_ccc_mean")
    balanced_mean = balanced if any(np.isfinite(balanced)) else None

    fig = new_figure(CURVES_SIZE)
    ax_loss, ax_ccc = fig.subplots(1, 2)
    for name, values in losses.items():
        if name == "total":
            # On top and dashed: where the total equals a part (the other weights 0), both still show.
            ax_loss.plot(epochs, values, color=COLOURS["total"], linestyle=(0, (4, 2)), linewidth=2.2, zorder=3,
                         label=labels[name])
        else:
            ax_loss.plot(epochs, values, color=COLOURS[name], marker=".", linewidth=1.2, zorder=2, label=labels[name])
    ax_loss.set(title="training loss (parts as weighted in the total)", xlabel="epoch", ylabel="loss")
    for name, values in dev.items():
        ax_ccc.plot(epochs, values, color=COLOURS[name], marker=".", linewidth=2 if name == "mean" else 1.2,
                    label=name)
    if balanced_mean is not None:
        ax_ccc.plot(epochs, balanced_mean, color=COLOURS["balanced mean"], linestyle="--", label="balanced mean")
    ax_ccc.set(title=f"{dev_split} CCC", xlabel="epoch", ylabel="CCC")
    if kept is not None:
        label = f"kept epoch {kept}" if finished else f"best so far: epoch {kept}"
        for ax in (ax_loss, ax_ccc):
            ax.axvline(kept, color=COLOURS["kept"], linestyle=":", label=label)
    for ax in (ax_loss, ax_ccc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.grid(alpha=0.3)
        # Beside the panel, not over the curves (constrained layout makes room for it).
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    name = title or run_dir.resolve().name
    heading = _curves_title(name, settings) + ("" if finished else f" (in progress, {len(epochs)} epochs)")
    fig.suptitle(heading)
    paths = save_figure(fig, figure_path(out_dir, run_dir / CURVES), svg)
    return CurvesResult(paths=paths, epochs=epochs, losses=losses, dev_ccc=dev, balanced_mean=balanced_mean,
                        kept_epoch=kept, finished=finished, weights=weights, title=heading, figure=fig)


# --------------------------------------------------------------------------- learned layer weights


@dataclass(frozen=True)
class LayerWeightsResult:
    paths: list[Path]
    weights: dict[str, dict]  # input → {"layers": [...], "weights": [...]}, as drawn
    figure: object = field(default=None, repr=False, compare=False)


def read_layer_weights(run_dir: str | Path) -> dict[str, dict]:
    """metrics.json's "layer_weights" of a finished run ({} when it weights no layers)."""
    path = Path(run_dir) / layout.METRICS
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PlotError(f"{path}: cannot be read ({exc})") from None
    found = metrics.get("layer_weights") or {}
    for name, entry in found.items():
        if (not isinstance(entry, dict) or len(entry.get("layers") or []) != len(entry.get("weights") or [])
                or not entry.get("layers")):
            raise PlotError(f"{path}: layer_weights of {name!r} needs as many layers as weights (one or more)")
    return found


def layer_weights_plot(run_dir: str | Path, weights: dict[str, dict] | None = None, out: str | Path | None = None,
                       svg: bool = False, title: str | None = None) -> LayerWeightsResult:
    """A bar chart of the learned softmax weight of every hidden state (transformers numbering), one row
    per layered input, the uniform weight (the start) dashed: `layer_weights.png` in the run (or `out`,
    as figure_path reads it). `weights` default: the run's metrics.json."""
    from matplotlib.ticker import MaxNLocator

    run_dir = Path(run_dir)
    weights = read_layer_weights(run_dir) if weights is None else weights
    if not weights:
        raise PlotError(f"{run_dir}: the run learned no layer weights (no input with a layer axis, or --layer "
                        "picked one)")
    fig = new_figure((LAYER_WEIGHTS_SIZE[0], LAYER_WEIGHTS_SIZE[1] * len(weights)))
    axes = fig.subplots(len(weights), 1, squeeze=False)[:, 0]
    for ax, (name, entry) in zip(axes, weights.items()):
        layers, w = [int(i) for i in entry["layers"]], [float(x) for x in entry["weights"]]
        ax.bar(layers, w, color=COLOURS["mean"], edgecolor="black", linewidth=0.5)
        ax.axhline(1 / len(w), color=COLOURS["kept"], linestyle="--", linewidth=1, label=f"uniform (1/{len(w)})")
        best = layers[int(np.argmax(w))]
        ax.set(title=f"{name}: learned layer weights (largest: hidden state {best})",
               xlabel="hidden state (0: input of the first transformer layer)", ylabel="softmax weight")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.suptitle(title or run_dir.resolve().name)
    paths = save_figure(fig, figure_path(out, run_dir / LAYER_WEIGHTS), svg)
    return LayerWeightsResult(paths=paths, weights=weights, figure=fig)


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
        _, frames, _ = store.read_frames(rows)
        return frames.mean()
    if layer is not None and len(store.feature_shape) < 2:
        # A pooled store holds one (D,) vector per utterance: a layer asked for would be ignored silently.
        raise PlotError(f"--layer {layer}: store {store.path} holds one vector of {store.feature_shape} per "
                        "utterance, no layers; leave --layer out (it picks a layer of a layered store)")
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

    from ser_cache.data.corpus import load_corpus
    from ser_cache.features.store import FeatureStore

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

    fig = new_figure(TSNE_SIZE)
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
    paths = save_figure(fig, out, svg)
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
