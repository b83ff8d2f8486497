"""plots: each figure is written at its size, is not blank, and draws the numbers the data gives."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from typer.testing import CliRunner

from ser_cache.infra import atomic
from ser_cache.runs import layout, plots, score_plots
from ser_cache.runs.plots import PlotError
from ser_cache.system.metrics import ATTRIBUTES, ccc

from synthetic import history_rows, make_run, speaker_corpus, speaker_store


def check_png(path: Path, size: tuple[float, float]) -> None:
    """The PNG is (height, width) = size × DPI pixels and shows something: more than one colour."""
    image = imread(path)
    assert image.shape[:2] == (round(size[1] * plots.DPI), round(size[0] * plots.DPI))
    pixels = image[..., :3].reshape(-1, 3)
    assert pixels.std() > 0
    assert len(np.unique(pixels, axis=0)) > 10


# --------------------------------------------------------------------------- run directories


@pytest.mark.slow  # the curves' parts: test_curves_* below
def test_training_curves_of_a_finished_run(tmp_path):
    run = make_run(tmp_path / "run", epochs=6, best_epoch=4)
    result = plots.training_curves(run, svg=True)
    assert result.paths == [run / "curves.png", run / "curves.svg"]
    check_png(run / "curves.png", plots.CURVES_SIZE)
    assert (run / "curves.svg").read_text().lstrip().startswith("<?xml")
    assert result.finished and result.kept_epoch == json.loads((run / "config.json").read_text())["best_epoch"]
    assert result.epochs == [1, 2, 3, 4, 5, 6]
    # the speaker loss is zero throughout (head off): not drawn
    assert set(result.losses) == {"total", "ccc", "gender"}
    with open(run / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert result.dev_ccc["mean"] == pytest.approx([float(r["dev_ccc_mean"]) for r in rows])
    assert result.balanced_mean == pytest.approx([float(r["dev_balanced_ccc_mean"]) for r in rows])
    assert not list(run.glob(".*tmp*"))  # nothing temporary left behind


def test_training_curves_elsewhere_and_without_balanced(tmp_path):
    run = make_run(tmp_path / "run")
    with open(run / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in (*ATTRIBUTES, "mean"):
            r[f"dev_balanced_ccc_{k}"] = "nan"
    atomic.write_csv_atomic(run / "history.csv", list(rows[0]), [list(r.values()) for r in rows])
    result = plots.training_curves(run, out_dir=tmp_path / "figs")
    assert result.paths == [tmp_path / "figs" / "curves.png"] and result.balanced_mean is None
    assert not (run / "curves.png").exists()


def checkpoint_of(run: Path, history: list[dict], best_epoch: int) -> Path:
    """A fine-tuning checkpoint with this history and best epoch (and empty module states), as save_checkpoint
    writes."""
    pytest.importorskip("torch")
    from ser_cache.infra import statefile
    from ser_cache.runs.checkpoint_file import CHECKPOINT, CHECKPOINT_FORMAT, CHECKPOINT_VERSION

    ckpt = {"epoch": len(history), "train": {}, "world": 1, "model": {}, "aam": None, "optimizer": {}, "scaler": {},
            "sampler": {}, "rng": [], "best": {"epoch": best_epoch, "score": 0.5}, "history": history}
    return statefile.save(run / CHECKPOINT, ckpt, fmt=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION)


def test_training_curves_of_an_unfinished_finetuning_run(tmp_path):
    run = tmp_path / "ft"
    run.mkdir()
    (run / layout.IN_PROGRESS).write_text("{}")
    checkpoint_of(run, history_rows(3, speaker=True), best_epoch=2)
    result = plots.training_curves(run)
    assert not result.finished and result.kept_epoch == 2
    assert result.epochs == [1, 2, 3] and set(result.losses) == {"total", "ccc", "gender", "speaker"}
    check_png(run / "curves.png", plots.CURVES_SIZE)


def test_training_curves_refusals(tmp_path):
    with pytest.raises(PlotError, match="no such run directory"):
        plots.training_curves(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PlotError, match="not a run directory"):
        plots.training_curves(tmp_path / "empty")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / layout.IN_PROGRESS).write_text("{}")
    with pytest.raises(PlotError, match="not finished an epoch"):
        plots.training_curves(unfinished)
    (unfinished / "checkpoint.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(PlotError, match="checkpoint.safetensors: not a readable fine-tuning checkpoint"):
        plots.training_curves(unfinished)


@pytest.mark.slow
def test_training_curves_of_a_trained_run(tmp_path):
    """A run that train_heads really wrote (history.csv, config.json as it writes them)."""
    from ser_cache.train.options import TrainHeadsConfig
    from ser_cache.train.recipe import train_heads

    from synthetic import make_corpus, make_store

    manifest, ids, feats = make_corpus(tmp_path / "corpus", n=120)
    store = make_store(tmp_path / "audio.zarr", ids, feats["audio"])
    cfg = TrainHeadsConfig(features=(store,), data=manifest, out=tmp_path / "run", epochs=3, progress=False,
                           balanced_trials=2, threads=1)
    trained = train_heads(cfg)
    result = plots.training_curves(tmp_path / "run")
    assert result.kept_epoch == trained.best_epoch and result.epochs == [1, 2, 3]
    check_png(tmp_path / "run" / "curves.png", plots.CURVES_SIZE)


# --------------------------------------------------------------------------- evaluation and ensemble


def labelled(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    true = rng.uniform(1, 7, (n, 3))
    pred = np.clip(true + rng.normal(0, 0.8, (n, 3)), 1, 7)
    emotions = np.array(list("NHSADCFU") + ["O", "X"])[rng.integers(0, 10, n)].tolist()
    emotions[0] = "F"  # F is given exactly one row below: too few for a CCC
    emotions = ["N" if e == "F" else e for e in emotions]
    emotions[0] = "F"
    return pred, true, emotions


# the figures' parts: the tests below
@pytest.mark.parametrize("n, svg", [pytest.param(300, False, marks=pytest.mark.slow),  # a scatter, then a hexbin
                                     pytest.param(2500, True, marks=pytest.mark.slow)])
def test_evaluation_plots(tmp_path, n, svg):
    pred, true, emotions = labelled(n)
    rng = np.random.default_rng(1)
    gender_true = rng.integers(0, 2, n)
    gender_pred = np.where(rng.random(n) < 0.8, gender_true, 1 - gender_true)
    result = score_plots.evaluation_plots(pred, true, emotions, tmp_path, gender_true=gender_true,
                                          gender_pred=gender_pred,
                                    gender_labels=["Female", "Male"], title="test", svg=svg)
    names = {"scatter.png", "ccc_per_class.png", "gender_confusion.png"}
    assert {p.name for p in result.paths} == names | ({n.replace(".png", ".svg") for n in names} if svg else set())
    check_png(tmp_path / "scatter.png", plots.SCATTER_SIZE)
    check_png(tmp_path / "ccc_per_class.png", plots.PER_CLASS_SIZE)
    check_png(tmp_path / "gender_confusion.png", plots.CONFUSION_SIZE)
    for j, attr in enumerate(ATTRIBUTES):
        assert result.ccc[attr] == ccc(pred[:, j], true[:, j])
    codes = np.array(emotions)
    assert "F" not in result.ccc_per_class  # one row only
    assert set(result.ccc_per_class) == set("NHSADCU")  # O and X are not primary classes
    rows = codes == "H"
    assert result.ccc_per_class["H"]["valence"] == ccc(pred[rows, 1], true[rows, 1])
    expected = np.array([[np.sum((gender_true == t) & (gender_pred == p)) for p in (0, 1)] for t in (0, 1)])
    np.testing.assert_array_equal(result.gender_confusion, expected)
    assert result.gender_labels == ["Female", "Male"]


@pytest.mark.slow
def test_evaluation_plots_without_gender_and_with_string_genders(tmp_path):
    pred, true, emotions = labelled(50)
    result = score_plots.evaluation_plots(pred, true, emotions, tmp_path / "a")
    assert {p.name for p in result.paths} == {"scatter.png", "ccc_per_class.png"} and result.gender_confusion is None
    truth = ["Female", "Male", "Unknown"] * 16 + ["Female", "Male"]
    guess = ["Female", "Female", "Male"] * 16 + ["Male", "Male"]
    result = score_plots.evaluation_plots(pred, true, emotions, tmp_path / "b", gender_true=truth, gender_pred=guess,
                                    gender_labels=["Female", "Male"])
    # rows whose true gender is not a label (Unknown) are not counted
    np.testing.assert_array_equal(result.gender_confusion, [[16, 1], [16, 1]])
    with pytest.raises(PlotError, match=r"\(N, 3\)"):
        score_plots.evaluation_plots(pred[:, :2], true[:, :2], emotions, tmp_path / "c")
    with pytest.raises(PlotError, match="both gender_true and gender_pred"):
        score_plots.evaluation_plots(pred, true, emotions, tmp_path / "c", gender_true=truth)


def test_ensemble_plots(tmp_path):
    members = [{"ccc": {"arousal": 0.6, "valence": 0.5, "dominance": 0.55, "mean": 0.55}, "split": "Development"},
               {"arousal": 0.62, "valence": 0.7, "dominance": 0.5}]
    ensemble = {"ccc": {"arousal": 0.65, "valence": 0.72, "dominance": 0.58, "mean": 0.65}}
    result = score_plots.ensemble_plots(["whisper", "mm"], members, ensemble, tmp_path, svg=True)
    assert [p.name for p in result.paths] == ["ensemble.png", "ensemble.svg"]
    check_png(tmp_path / "ensemble.png", plots.ENSEMBLE_SIZE)
    assert result.names == ["whisper", "mm", "ensemble"]
    assert result.scores["mm"]["mean"] == pytest.approx((0.62 + 0.7 + 0.5) / 3)
    assert result.scores["ensemble"] == ensemble["ccc"]
    with pytest.raises(PlotError, match="expected CCCs"):
        score_plots.ensemble_plots(["a"], [{"arousal": 0.1}], ensemble, tmp_path)


# --------------------------------------------------------------------------- speakers


@pytest.fixture(scope="module")
def speaker_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("speakers")
    return speaker_corpus(root / "corpus")


@pytest.mark.slow
def test_speaker_tsne_separates_speakers(speaker_data, tmp_path):
    """A layered store (the mean over layers is drawn); pooled stores in the tests below."""
    manifest, ids, labels = speaker_data
    shape = (4, 32)
    good = speaker_store(tmp_path / "good.zarr", ids, labels, separated=True, shape=shape)
    noise = speaker_store(tmp_path / "noise.zarr", ids, labels, separated=False, shape=shape)
    a = plots.speaker_tsne(good, manifest, speakers=6, per_speaker=8, seed=0, out=tmp_path / "good.png", svg=True)
    b = plots.speaker_tsne(noise, manifest, speakers=6, per_speaker=8, seed=0, out=tmp_path / "noise.png")
    assert a.paths == [tmp_path / "good.png", tmp_path / "good.svg"]
    check_png(tmp_path / "good.png", plots.TSNE_SIZE)
    check_png(tmp_path / "noise.png", plots.TSNE_SIZE)
    for r in (a, b):
        assert -1 <= r.silhouette_vectors <= 1 and -1 <= r.silhouette_tsne <= 1
        assert len(r.speakers) == 6 and len(r.ids) == 48 and r.points.shape == (48, 2)
        assert "spk00" not in r.speakers  # 3 utterances only
        assert r.eligible == 11
        assert all(i.startswith(s.replace("spk", "s")) for i, s in zip(r.ids, r.labels))
    assert a.speakers == b.speakers  # the same seed draws the same speakers
    assert a.silhouette_vectors > b.silhouette_vectors + 0.2
    assert a.silhouette_tsne > b.silhouette_tsne + 0.2


@pytest.mark.slow
def test_speaker_tsne_frame_store_and_layer(speaker_data, tmp_path):
    manifest, ids, labels = speaker_data
    frames = speaker_store(tmp_path / "frames.zarr", ids, labels, separated=True, shape=(5, 16), frames=True)
    r = plots.speaker_tsne(frames, manifest, speakers=4, per_speaker=5, seed=3, out=tmp_path / "f.png")
    assert r.silhouette_vectors > 0.3
    layered = speaker_store(tmp_path / "layered.zarr", ids, labels, separated=True, shape=(3, 16))
    r = plots.speaker_tsne(layered, manifest, speakers=4, per_speaker=5, layer=-1)
    assert r.paths == [tmp_path / "layered-speakers.png"]
    with pytest.raises(PlotError, match="layer 7 does not exist"):
        plots.speaker_tsne(layered, manifest, speakers=4, per_speaker=5, layer=7)
    with pytest.raises(PlotError, match="no layers"):
        plots.speaker_tsne(frames, manifest, speakers=4, per_speaker=5, layer=0)


def test_speaker_tsne_refuses_too_few_speakers(speaker_data, tmp_path):
    manifest, ids, labels = speaker_data
    store = speaker_store(tmp_path / "s.zarr", ids, labels, separated=True)
    with pytest.raises(PlotError, match=r"11 speaker\(s\) have at least 10 utterances.*12 are asked for"):
        plots.speaker_tsne(store, manifest, speakers=12, per_speaker=10)
    with pytest.raises(PlotError, match=r"0 speaker\(s\) have at least 13"):
        plots.speaker_tsne(store, manifest, speakers=2, per_speaker=13)
    with pytest.raises(PlotError, match="ending in .png"):
        plots.speaker_tsne(store, manifest, out=tmp_path / "fig.svg")


# --------------------------------------------------------------------------- the commands


def test_plot_commands(speaker_data, tmp_path):
    from ser_cache.cli.plot import plot_app

    manifest, ids, labels = speaker_data
    runner = CliRunner()
    run = make_run(tmp_path / "run")
    result = runner.invoke(plot_app, ["run", str(run), "--out", str(tmp_path / "figs"), "--svg"])
    assert result.exit_code == 0, result.output
    assert "kept epoch 4" in result.output
    assert (tmp_path / "figs" / "curves.png").is_file() and (tmp_path / "figs" / "curves.svg").is_file()

    store = speaker_store(tmp_path / "s.zarr", ids, labels, separated=True)
    args = ["speakers", str(store), "--data", str(manifest), "--speakers", "3", "--per-speaker", "4",
            "--out", str(tmp_path / "fig.png"), "--seed", "1"]
    result = runner.invoke(plot_app, args)
    assert result.exit_code == 0, result.output
    assert "silhouette (vectors, cosine)" in result.output and (tmp_path / "fig.png").is_file()

    result = runner.invoke(plot_app, [*args[:4], "--speakers", "30"])
    assert result.exit_code == 2
    assert "error:" in result.output and "11 speaker(s)" in result.output and "Traceback" not in result.output


# --------------------------------------------------------------------------- what the figures show


def weighted_run(path: Path, epochs: int = 3, *, gender_weight: float = 1.0, speaker_weight: float = 0.1,
                 speaker_loss: float = 9.0, inputs=("whisper-tiny", "minilm")) -> Path:
    """A finished run whose history holds unweighted parts and total = ccc + alpha*gender + beta*speaker,
    as training writes it; the speaker loss (an AAM-softmax's, several units) is larger than the total."""
    path.mkdir(parents=True)
    rows = history_rows(epochs, speaker=True)
    for r in rows:
        r["loss_gender"] = r["loss_gender"] if gender_weight else 0.0
        r["loss_speaker"] = speaker_loss / r["epoch"] if speaker_weight else 0.0
        r["loss_total"] = r["loss_ccc"] + gender_weight * r["loss_gender"] + speaker_weight * r["loss_speaker"]
    atomic.write_csv_atomic(path / layout.HISTORY, list(rows[0]), [list(r.values()) for r in rows])
    atomic.write_json_atomic(path / layout.CONFIG, {
        "format": layout.RUN_FORMAT, "format_version": 1, "best_epoch": 2,
        "train": {"gender_weight": gender_weight, "speaker_weight": speaker_weight, "dev_split": "Development"},
        "inputs": [{"name": name} for name in inputs]})
    return path


def lines_by_label(ax) -> dict:
    return {line.get_label(): line for line in ax.get_lines()}


def overlaps(a, b) -> bool:
    """Whether two display-space boxes share any area."""
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


@pytest.fixture(scope="module")
def curves(tmp_path_factory):
    """The curves of a 3-epoch run named "run", both heads on (alpha 1, beta 0.1), drawn once for the tests below."""
    run = weighted_run(tmp_path_factory.mktemp("curves") / "run", epochs=3)
    return run, plots.training_curves(run)


def test_curves_title_says_which_run_and_what_it_trained(curves, tmp_path):
    """A run directory named just "run" (the demo's) was titled "run"."""
    _, result = curves
    assert result.figure._suptitle.get_text() == result.title == "run: heads on whisper-tiny + minilm"
    fig = plots.training_curves(weighted_run(tmp_path / "b"), title="lr seed 2").figure
    assert fig._suptitle.get_text() == "lr seed 2: heads on whisper-tiny + minilm"


def test_curves_epoch_ticks_are_whole_numbers(curves):
    fig = curves[1].figure
    for ax in fig.axes:
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_curves_legends_beside_the_curves_not_over_them(curves):
    fig = curves[1].figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        legend = ax.get_legend()
        assert legend is not None
        assert not overlaps(legend.get_window_extent(renderer), ax.get_window_extent(renderer))
        assert legend.get_window_extent(renderer).x1 <= fig.bbox.x1 + 1  # and inside the figure


def test_curves_draw_each_loss_part_as_weighted_in_the_total(curves):
    run, result = curves
    ax = result.figure.axes[0]
    lines = lines_by_label(ax)
    with open(run / layout.HISTORY, newline="") as f:
        history = list(csv.DictReader(f))
    speaker = lines["β·speaker (β = 0.1)"]
    assert np.allclose(speaker.get_ydata(), [0.1 * float(r["loss_speaker"]) for r in history])
    assert np.allclose(lines["α·gender (α = 1)"].get_ydata(), [float(r["loss_gender"]) for r in history])
    total = np.asarray(lines["total"].get_ydata())
    parts = [np.asarray(lines[k].get_ydata()) for k in ("CCC loss", "α·gender (α = 1)", "β·speaker (β = 0.1)")]
    assert np.allclose(sum(parts), total)  # the parts drawn add up to the total drawn
    assert all((p <= total + 1e-12).all() for p in parts)  # none above it (the unweighted speaker loss was)
    assert result.weights == {"ccc": 1.0, "gender": 1.0, "speaker": 0.1}


def test_curves_total_stays_visible_where_it_equals_the_ccc_loss(tmp_path):
    """Heads off: the total is the CCC loss; it must not be hidden under it."""
    result = plots.training_curves(weighted_run(tmp_path / "run", gender_weight=0.0, speaker_weight=0.0))
    lines = lines_by_label(result.figure.axes[0])
    assert set(result.losses) == {"total", "ccc"}
    total, part = lines["total"], lines["CCC loss"]
    assert np.allclose(total.get_ydata(), part.get_ydata())
    assert total.get_zorder() > part.get_zorder()  # drawn over it ...
    assert total.get_linestyle() not in ("-", "solid")  # ... with gaps that let it show through
    assert total.get_color() != part.get_color()


def test_curves_one_colour_one_meaning(curves):
    fig = curves[1].figure
    meaning_of: dict[str, set] = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            colour = matplotlib_colour(line.get_color())
            meaning_of.setdefault(colour, set()).add(line.get_label())
    assert all(len(labels) == 1 for labels in meaning_of.values()), meaning_of


def matplotlib_colour(colour) -> tuple:
    from matplotlib.colors import to_rgba

    return tuple(round(c, 4) for c in to_rgba(colour))


def test_curves_settings_of_an_unfinished_run(tmp_path):
    """in_progress.json carries the fine-tuning options: their weights and what is trained."""
    run = tmp_path / "ft"
    run.mkdir()
    atomic.write_json_atomic(run / layout.IN_PROGRESS, {"format": layout.RUN_FORMAT, "system": "finetuned-wavlm",
                                                   "train": {"gender_weight": 1.0, "speaker_weight": 0.0}})
    settings = plots._run_settings(run, finished=False)
    assert plots._loss_weights(settings) == {"ccc": 1.0, "gender": 1.0, "speaker": 0.0}
    assert plots._curves_title("ft", settings) == "ft: fine-tuned WavLM"
    (run / layout.IN_PROGRESS).write_text("[]")
    assert plots._loss_weights(plots._run_settings(run, finished=False)) is None


def class_data(seed: int = 0):
    """160 rows: seven primary classes of 20, disgust with 2 only, 12 O and 6 X rows; happy's true
    valence constant. Genders: 150 female (135 predicted female, 15 male) and 10 male (5 and 5)."""
    rng = np.random.default_rng(seed)
    emotions = [c for c in "NHSACFU" for _ in range(20)] + ["D", "D"] + ["O"] * 12 + ["X"] * 6
    true = rng.uniform(1, 7, (len(emotions), 3))
    codes = np.array(emotions)
    true[codes == "H", 1] = 4.0  # every happy row valence 4: CCC is undefined there
    pred = np.clip(true + rng.normal(0, 0.5, true.shape), 1, 7)
    gender_true = ["Female"] * 150 + ["Male"] * 10
    gender_pred = ["Female"] * 135 + ["Male"] * 15 + ["Female"] * 5 + ["Male"] * 5
    return pred, true, emotions, gender_true, gender_pred


@pytest.fixture(scope="module")
def per_class(tmp_path_factory):
    """class_data's evaluation figures, drawn once for the tests below."""
    pred, true, emotions, gender_true, gender_pred = class_data()
    return (pred, true, emotions), score_plots.evaluation_plots(pred, true, emotions,
                                                                tmp_path_factory.mktemp("per_class"),
                                                          gender_true=gender_true, gender_pred=gender_pred,
                                                          gender_labels=["Female", "Male"])


def test_per_class_skips_small_classes_and_says_which(per_class):
    (pred, true, emotions), result = per_class
    assert "D" not in result.ccc_per_class and result.skipped_classes == {"D": 2}
    assert result.class_counts == {c: 20 for c in "NHSACFU"}
    fig = result.figures["ccc_per_class.png"]
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert len(ticks) == 7 and not any("(D)" in t for t in ticks)
    notes = " ".join(t.get_text() for t in fig.texts)
    assert "fewer than 10 utterances: disgust (D) n=2" in notes
    assert "other (O) n=12" in notes and "no agreement (X) n=6" in notes
    # a lower minimum keeps it
    per_class_2, _, skipped_2 = score_plots.class_cccs(pred, true, np.array(emotions, dtype=object), 2)
    assert "D" in per_class_2 and not skipped_2


def test_per_class_names_the_class_codes(per_class):
    fig = per_class[1].figures["ccc_per_class.png"]
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert ticks[:3] == ["neutral (N)\nn=20", "happy (H)\nn=20", "sad (S)\nn=20"]
    assert "contempt (C)\nn=20" in ticks and "surprise (U)\nn=20" in ticks


def test_per_class_undefined_ccc_is_na_not_zero(per_class):
    result = per_class[1]
    happy = result.ccc_per_class["H"]
    assert np.isnan(happy["valence"]) and np.isfinite(happy["arousal"])
    ax = result.figures["ccc_per_class.png"].axes[0]
    marks = [t for t in ax.texts if t.get_text() == "n/a"]
    assert len(marks) == 1
    # at happy's valence bar: the second class, the middle of its three bars
    assert marks[0].get_position()[0] == pytest.approx(1.0)
    heights = [bar.get_height() for bar in ax.patches if bar.get_x() + bar.get_width() / 2 == pytest.approx(1.0)]
    assert len(heights) == 1 and np.isnan(heights[0])  # no bar of height 0 there


def test_gender_confusion_coloured_by_row_share(per_class):
    """150 female rows and 10 male: a male row's error must colour as strongly as a female row's."""
    result = per_class[1]
    np.testing.assert_array_equal(result.gender_confusion, [[135, 15], [5, 5]])
    ax = result.figures["gender_confusion.png"].axes[0]
    image = ax.get_images()[0]
    np.testing.assert_allclose(image.get_array(), [[0.9, 0.1], [0.5, 0.5]])
    assert image.get_clim() == (0.0, 1.0)
    cells = sorted(t.get_text() for t in ax.texts)
    assert cells == sorted(["135\n90%", "15\n10%", "5\n50%", "5\n50%"])


def test_ensemble_names_its_split(tmp_path):
    members = [{"arousal": 0.6, "valence": 0.5, "dominance": 0.55}, {"arousal": 0.62, "valence": 0.7, "dominance": 0.5}]
    ensemble = {"ccc": {"arousal": 0.65, "valence": 0.72, "dominance": 0.58}, "split": "Test1"}
    result = score_plots.ensemble_plots(["a", "b"], members, ensemble, tmp_path)
    assert result.split == "Test1" and "on Test1" in result.figure.axes[0].get_title()


@pytest.mark.parametrize("members", [2, pytest.param(7, marks=pytest.mark.slow)])
def test_ensemble_values_level_and_apart(tmp_path, members):
    """Each bar's CCC is written level, in readable type, over its own bar, no two touching."""
    from matplotlib.font_manager import FontProperties

    rng = np.random.default_rng(members)
    names = [f"wavlm-large-seed-{i}" for i in range(members)]
    tables = [{a: float(rng.uniform(0.3, 0.8)) for a in ATTRIBUTES} for _ in names]
    ensemble = {"ccc": {a: 0.7 for a in ATTRIBUTES}}  # no "split": given as an argument
    fig = score_plots.ensemble_plots(names, tables, ensemble, tmp_path, split="Development").figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    values = [t for t in ax.texts if t.get_text()]
    assert len(values) == 4 * (members + 1)
    assert all(t.get_rotation() == 0 for t in values)
    assert all(t.get_fontsize() >= FontProperties(size="small").get_size_in_points() - 1e-9 for t in values)
    boxes = sorted((t.get_window_extent(renderer) for t in values), key=lambda b: b.x0)
    assert not any(overlaps(a, b) for a, b in zip(boxes, boxes[1:]))
    check_png(tmp_path / "ensemble.png", score_plots.ensemble_size([*names, "ensemble"]))
    assert "on Development" in fig.axes[0].get_title()
