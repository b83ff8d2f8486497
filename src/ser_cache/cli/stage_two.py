"""Stage-two commands: train-heads, evaluate, predict, ensemble."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.markup import escape
from rich.table import Table

from ser_cache.cli import rerun, shared_options as shared
from ser_cache.cli.app import KNOWN_ERRORS, app, err, fail, guarded, log_to_stderr, out, writable

KNOWN_ERRORS.extend(["ser_cache.system.rows:TrainError", "ser_cache.runs.layout:RunError",
                     "ser_cache.runs.predict:PredictError",
                     "ser_cache.runs.ensemble:EnsembleError"])

EnsembleTask = Literal["attributes", "categorical"]  # runs.ensemble.ENSEMBLE_TASKS
PredictTask = Literal["attributes", "categorical"]  # runs.predict.PREDICT_TASKS

# Text inputs computed by predict and evaluate (rows no store holds): where their text comes from.
TranscriptsOption = Annotated[Path | None, typer.Option(
    "--transcripts", metavar="FILE",
    help="Transcript table (columns FileName or id, and text; e.g. from `ser-cache transcribe`) for the "
         "utterances without a transcript of their own (corpus Transcripts/, manifest text, a .txt beside a file).")]
PreferTranscriptsOption = Annotated[bool, typer.Option(
    "--prefer-transcripts",
    help="The --transcripts table's text first, the utterance's own only where the table has none.")]
# train-heads' and sweep's --layer (TrainHeadsConfig.layer): one hidden state of a layered store.
LayerOption = Annotated[list[str] | None, typer.Option(
    "--layer", metavar="K|NAME=K",
    help="One hidden state of a store with a layer axis (extract --layers all or a list) instead of the learned "
         "weighting of all: K (transformers numbering: 0 is the input of the first transformer layer) for every "
         "layered input, or NAME=K for the input NAME (repeatable). K must be one of the store's layers.")]


def _fmt(x) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def titled(title: str, table: Table):
    """The table under its title, the title on a line of its own: rich wraps a table's own title at
    the table's width (about 45 columns here), which would break a run's path over several lines;
    on its own line it wraps at the console's width, so a title of up to 80 columns stays one line."""
    from rich.console import Group
    from rich.text import Text

    return Group(Text(title, style="italic"), table) if title else table


def class_table(scores: dict) -> Table:
    """The class task's scores: macro-F1, accuracy, balanced accuracy, then precision/recall/F1 per class."""
    table = Table()
    table.add_column("class")
    for name in ("precision", "recall", "F1", "rows"):
        table.add_column(name, justify="right")
    for code, c in scores["per_class"].items():
        table.add_row(code, _fmt(c["precision"]), _fmt(c["recall"]), _fmt(c["f1"]), str(c["support"]))
    table.add_section()
    table.add_row("macro-F1", "", "", _fmt(scores["macro_f1"]), str(scores["rows"]), style="bold")
    table.add_row("accuracy", "", "", _fmt(scores["accuracy"]), "")
    table.add_row("balanced accuracy", "", "", _fmt(scores["balanced_accuracy"]), "")
    return table


def scores_table(title: str, scores: dict):
    """One row per attribute and the mean: CCC, and balanced CCC where there is one; gender below; the
    class task's table (class_table) below that, or alone for a run without attribute heads."""
    if "ccc" not in scores:
        table = class_table(scores["categorical"])
        gender = scores.get("gender")
        if gender:
            table.add_section()
            table.add_row("gender accuracy", "", "", _fmt(gender["accuracy"]), "")
            table.add_row("gender macro-F1", "", "", _fmt(gender["macro_f1"]), "")
        return titled(title, table)
    if "categorical" in scores:
        from rich.console import Group

        return Group(scores_table(title, {k: v for k, v in scores.items() if k != "categorical"}),
                     class_table(scores["categorical"]))
    balanced = scores.get("balanced_ccc") or {}
    table = Table()
    table.add_column("attribute")
    table.add_column("CCC", justify="right")
    if balanced:
        table.add_column("balanced CCC", justify="right")
    for key in ("arousal", "valence", "dominance", "mean"):
        row = [key, _fmt(scores["ccc"][key])]
        if balanced:
            row.append(_fmt(balanced[key]))
        table.add_row(*row, style="bold" if key == "mean" else None)
    gender = scores.get("gender")
    if gender:
        table.add_section()
        table.add_row("gender accuracy", _fmt(gender["accuracy"]), *([""] if balanced else []))
        table.add_row("gender macro-F1", _fmt(gender["macro_f1"]), *([""] if balanced else []))
    return titled(title, table)


@app.command("train-heads")
@shared.training_options
def train_heads(
    features: list[Path] = typer.Option(..., "--features", "-f", metavar="STORE",
                                        help="A feature store (.zarr); repeat for several inputs. A frame store "
                                             "(extract --pooling frames) goes through a ConvPool first."),
    data: Path = typer.Option(..., "--data", "-d", help="MSP-Podcast directory or CSV manifest (labels and splits)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Run directory to create."),
    train_split: shared.TrainSplit = shared.TRAINING.train_split,
    dev_split: shared.DevSplit = shared.TRAINING.dev_split,
    epochs: shared.Epochs = shared.TRAINING.epochs,
    lr: shared.HeadsLr = shared.HEADS.lr,
    batch_size: shared.HeadsBatchSize = shared.HEADS.batch_size,
    weight_decay: shared.WeightDecay = shared.TRAINING.weight_decay,
    seed: int = typer.Option(shared.TRAINING.seed,
                             help="Seed for initialisation, sampling and the balanced-CCC draws."),
    objective: dict | None = None,  # --no-undersample ... --dropout: shared.OBJECTIVE_OPTIONS
    conv_dim: shared.ConvDim = shared.TRAINING.conv_dim,
    conv_dropout: shared.ConvDropout = shared.TRAINING.conv_dropout,
    layer: LayerOption = None,
    memory_budget: shared.MemoryBudget = shared.HEADS.memory_budget_gb,
    device: shared.Device = shared.TRAINING.device,
    precision: shared.HeadsPrecision = shared.TRAINING.precision,
    threads: shared.Threads = shared.HEADS.threads,
    overwrite: bool = typer.Option(shared.TRAINING.overwrite, help="Replace an existing run directory."),
    progress: shared.Progress = shared.TRAINING.progress,
    tensorboard: shared.TensorBoard = shared.TRAINING.tensorboard,
    task_options: dict | None = None,  # --task ... --class-loss-weight: shared.TASK_OPTIONS
    config: Path | None = typer.Option(
        None, "--config", metavar="RUN/config.json", is_eager=True, callback=rerun.defaults_from_run,
        help="Rerun a train-heads run's settings: every option of its config.json (or run directory) but --out, "
             "--overwrite, --progress and --tensorboard; the options given here override the file's."),
) -> None:
    """Train arousal/valence/dominance heads (plus gender and speaker heads) on cached features; write a run directory.

    Frame stores go through point-wise convolutions and a mean over each clip's frames first:
    --features whisper-large-v3-frames.zarr --features roberta-large.zarr is MMWhisper.
    """
    from ser_cache.infra.outputs import given
    from ser_cache.system.epoch_log import tensorboard_problem
    from ser_cache.train.recipe import train_heads as run_training

    read = given("--features", *features) + given("--data", data)  # not `inputs`: locals() become the config
    writable(out_dir, "--out", folder=True, inputs=read, replaced=overwrite)
    if tensorboard is not None:
        writable(tensorboard, "--tensorboard", folder=True, inputs=read)
    if tensorboard is not None and tensorboard_problem():
        fail(tensorboard_problem())
    log_to_stderr()
    layer = tuple(layer or ())  # TrainHeadsConfig.layer
    cfg = shared.heads_config(locals())
    if config is not None:
        for note in guarded(rerun.provenance_notes, config, cfg.data):
            err.print(f"[yellow]note: {escape(note)}[/]", highlight=False, soft_wrap=True)
    result = guarded(run_training, cfg)
    if result is None:
        return
    out.print(scores_table(f"{result.run_dir} — {cfg.dev_split}, epoch {result.best_epoch} of {cfg.epochs}",
                           result.metrics))


@app.command()
def evaluate(
    run: Path = typer.Argument(..., help="A run directory from train-heads."),
    data: Path = typer.Option(..., "--data", "-d", help="MSP-Podcast directory or CSV manifest."),
    split: list[str] = typer.Option(..., "--split", "-s", metavar="SPLIT",
                                    help="Labelled split to score (repeatable: each split is scored on its own)."),
    dest: Path | None = typer.Option(None, "--out", "-o", help="JSON file, with one --split (default: "
                                        "RUN/eval_<split>.json for each split)."),
    features_dir: Path | None = typer.Option(None, help="Folder with the run's stores, if they moved."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    transcripts: TranscriptsOption = None,
    prefer_transcripts: PreferTranscriptsOption = False,
    plots: Path | None = typer.Option(None, help="Folder for figures: predicted vs true per attribute, CCC per "
                                                    "emotion class, the gender confusion matrix (PLOTS/<split>/ "
                                                    "with several --split)."),
    overwrite: shared.OverwriteFiles = False,
) -> None:
    """Score a run on labelled splits: CCC per attribute, mean, balanced CCC, gender; prints a table, writes JSON.

    Each --split is scored on its own (a CCC over two splits pooled is neither split's figure).
    """
    from ser_cache.infra.outputs import given, run_inputs
    from ser_cache.runs.plots import CLASS_CONFUSION, CLASS_F1, CONFUSION, PER_CLASS, SCATTER
    from ser_cache.runs.predict import evaluate as run_evaluate

    splits = list({s.lower(): s for s in split}.values())  # split names are case-insensitive
    if dest is not None and len(splits) > 1:
        fail(f"--out {dest}: one JSON file for {len(splits)} splits; give one --split with --out, or leave --out "
             "out to write RUN/eval_<split>.json for each")
    defaults = [run / f"eval_{s}.json" for s in splits]  # the run keeps its evaluations
    inputs = (run_inputs(run, features_dir=features_dir, own=defaults) + given("--data", data)
              + given("--transcripts", transcripts))
    for default in defaults:
        writable(dest or default, "--out", inputs=inputs, overwrite=overwrite)
    if plots is not None:
        folders = [plots / s for s in splits] if len(splits) > 1 else [plots]
        writable(plots, "--plots", folder=True, inputs=inputs, overwrite=overwrite,
                 files=[f / name for f in folders
                        for name in (SCATTER, PER_CLASS, CONFUSION, CLASS_CONFUSION, CLASS_F1)])
    log_to_stderr()
    for s in splits:
        folder = plots / s if plots is not None and len(splits) > 1 else plots
        result = guarded(run_evaluate, run, data, s, out=dest, device=device, features_dir=features_dir,
                         transcripts=transcripts, prefer_transcripts=prefer_transcripts, plots=folder)
        if result is None:
            return
        out.print(scores_table(f"{run} — {s} ({result['rows']} utterances)", result))
        err.print(f"wrote {result['out']}", highlight=False)
        for path in result.get("plots", []):
            err.print(f"wrote {path}", highlight=False)


@app.command()
def predict(
    run: Path = typer.Argument(..., help="A run directory from train-heads."),
    files: list[Path] | None = typer.Argument(None, metavar="FILE",
                                              help="Audio files to predict (instead of --data/--split)."),
    data: Path | None = typer.Option(None, "--data", "-d", help="MSP-Podcast directory or CSV manifest."),
    split: list[str] | None = typer.Option(None, "--split", "-s", metavar="SPLIT",
                                           help="Split(s) to predict (repeatable)."),
    transcripts: TranscriptsOption = None,
    prefer_transcripts: PreferTranscriptsOption = False,
    dest: Path = typer.Option(..., "--out", "-o",
                              help="Prediction CSV: exactly the challenge's FileName,EmoAct,EmoVal,EmoDom."),
    features_dir: Path | None = typer.Option(None, help="Folder with the run's stores, if they moved."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    with_gender: bool = typer.Option(False, "--with-gender",
                                     help="Add the gender head's Gender and GenderProb_* columns "
                                                                  "(not part of the challenge's format)."),
    overwrite: shared.OverwriteFiles = False,
    task: PredictTask | None = typer.Option(
        None, "--task", metavar="TASK",
        help="Which file: attributes (Task 2) or categorical (Task 1: FileName,EmoClass, one code per file). "
             "Default: the run's task; a run trained --task both writes attributes unless given categorical."),
    with_probabilities: bool = typer.Option(False, "--with-probabilities",
                                            help="Task 1: add a prob_<code> column per class of the run (what "
                                                 "ensemble --task categorical averages)."),
) -> None:
    """Predict arousal/valence/dominance for corpus splits or audio files, in the challenge's CSV format.

    Cached features are used where the run's stores hold the utterances; otherwise the run's
    encoders are run here. Text inputs need transcripts: the corpus's own (or a .txt beside each
    file), and a --transcripts table (e.g. from `ser-cache transcribe`) where there are none.
    """
    from ser_cache.infra.outputs import given, run_inputs
    from ser_cache.runs.predict import predict as run_predict

    files = files or []
    beside = [f.with_suffix(".txt") for f in files if f.with_suffix(".txt").is_file()]  # a clip's own transcript
    inputs = (run_inputs(run, features_dir=features_dir) + given("--data", data) + given("--transcripts", transcripts)
              + given("the audio file", *files) + given("the transcript", *beside))
    writable(dest, "--out", inputs=inputs, overwrite=overwrite)
    log_to_stderr()
    result = guarded(run_predict, run, data=data, splits=tuple(split or ()), files=tuple(files or ()),
                     transcripts=transcripts, out=dest, device=device, features_dir=features_dir,
                     with_gender=with_gender, prefer_transcripts=prefer_transcripts, task=task,
                     with_probabilities=with_probabilities)
    if result is None:
        return
    err.print(f"wrote {result.rows} predictions to {result.out}", highlight=False)


@app.command()
def ensemble(
    files: list[Path] = typer.Argument(..., metavar="CSV", help="Prediction CSVs of the systems to average."),
    dest: Path = typer.Option(..., "--out", "-o", help="Averaged prediction CSV."),
    weights: str | None = typer.Option(None, help="Comma-separated weight per file, e.g. 0.6,0.4 (default: equal)."),
    data: Path | None = typer.Option(None, "--data", "-d", help="Corpus to score the ensemble against."),
    split: str | None = typer.Option(None, "--split", "-s", help="Labelled split to score."),
    with_gender: bool = typer.Option(False, "--with-gender", help="Also average the members' gender probabilities "
                                                                  "(members predicted --with-gender)."),
    plots: Path | None = typer.Option(None, help="Folder for a figure of the members' and the ensemble's CCC "
                                                    "side by side (needs --data and --split)."),
    label_scale: str = typer.Option("1 7", metavar="'LOW HIGH'", help="The scale every member's value must lie on "
                                    "(a corpus on another scale), or none."),
    overwrite: shared.OverwriteFiles = False,
    task: EnsembleTask = typer.Option("attributes", "--task", metavar="TASK",
                                      help="attributes, or categorical: average Task 1 members' class probabilities "
                                           "(members predicted --with-probabilities) and write the winning code."),
    with_probabilities: bool = typer.Option(False, "--with-probabilities",
                                            help="With --task categorical: also write the mean probabilities "
                                                 "(prob_<code> columns)."),
) -> None:
    """Average the arousal/valence/dominance predictions of several systems; score them with --data/--split."""
    from ser_cache.infra.outputs import given
    from ser_cache.runs.ensemble import ensemble as run_ensemble, member_inputs, scale_option
    from ser_cache.runs.plots import ENSEMBLE

    inputs = member_inputs(files) + given("--data", data)
    writable(dest, "--out", inputs=inputs, overwrite=overwrite)
    if plots is not None:
        writable(plots, "--plots", folder=True, inputs=inputs, overwrite=overwrite, files=[plots / ENSEMBLE])
    parsed = None
    if weights:
        try:
            parsed = [float(w) for w in weights.split(",")]
        except ValueError:
            fail(f"--weights {weights}: expected comma-separated numbers, e.g. 0.6,0.4")
    if task == "categorical" and label_scale != "1 7":
        fail("--label-scale is the range of attribute values; not with --task categorical")
    scale = guarded(scale_option, label_scale)
    result = guarded(run_ensemble, files, out=dest, weights=parsed, data=data, split=split, with_gender=with_gender,
                     plots=plots, scale=scale, task=task, with_probabilities=with_probabilities)
    if result is None:
        return
    err.print(f"wrote {result.rows} averaged predictions to {result.out} "
              f"(weights {', '.join(f'{w:.3g}' for w in result.weights)})", highlight=False)
    if result.scores is not None and task == "categorical":
        out.print(class_members_table(f"ensemble — {split} (Task 1, {result.scores['n']} utterances with a class)",
                                      [Path(f).stem for f in files], result.members, result.scores))
    elif result.scores is not None:
        out.print(members_table(f"ensemble — {split} (CCC)", [Path(f).stem for f in files], result.members,
                                result.scores))
    for path in result.plots:
        err.print(f"wrote {path}", highlight=False)


CLASS_SCORES = (("macro_f1", "macro-F1"), ("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"))


def class_members_table(title: str, names: list[str], members: list[dict], ensemble_scores: dict):
    """Macro-F1, accuracy and balanced accuracy: one column per member, the ensemble last."""
    table = Table()
    table.add_column("metric")
    for name in names:
        table.add_column(name, justify="right")
    table.add_column("ensemble", justify="right", style="bold")
    for key, label in CLASS_SCORES:
        table.add_row(label, *(_fmt(m[key]) for m in members), _fmt(ensemble_scores[key]),
                      style="bold" if key == "macro_f1" else None)
    return titled(title, table)


def members_table(title: str, names: list[str], members: list[dict], ensemble_scores: dict):
    """CCC per attribute and the mean: one column per member, the ensemble last."""
    table = Table()
    table.add_column("attribute")
    for name in names:
        table.add_column(name, justify="right")
    table.add_column("ensemble", justify="right", style="bold")
    for key in ("arousal", "valence", "dominance", "mean"):
        table.add_row(key, *(_fmt(m["ccc"][key]) for m in members), _fmt(ensemble_scores["ccc"][key]),
                      style="bold" if key == "mean" else None)
    return titled(title, table)
