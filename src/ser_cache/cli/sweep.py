"""`ser-cache sweep`: seeds and variants of train-heads trained together, and the table comparing them."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ser_cache.cli import shared_options as shared
from ser_cache.cli.app import KNOWN_ERRORS, app, fail, guarded, log_to_stderr, out, writable
from ser_cache.cli.stage_two import LayerOption, titled

KNOWN_ERRORS.append("ser_cache.infra.shards:ShardError")

ATTRIBUTE_COLUMNS = (("arousal", "ccc_arousal"), ("valence", "ccc_valence"), ("dominance", "ccc_dominance"),
                     ("mean", "ccc_mean"), ("balanced", "balanced_ccc_mean"))
CLASS_COLUMNS = (("macro-F1", "macro_f1"), ("accuracy", "accuracy"), ("bal. acc.", "balanced_accuracy"))


@app.command("sweep")
@shared.training_options
def sweep_command(
    ctx: typer.Context,
    features: list[Path] | None = typer.Option(None, "--features", "-f", metavar="STORE",
                                               help="A feature store (.zarr); repeat. Loaded once for every member. "
                                                    "Required (but with --summarize)."),
    data: Path | None = typer.Option(None, "--data", "-d", help="MSP-Podcast directory or CSV manifest (labels and "
                                     "splits). Required (but with --summarize)."),
    out_dir: Path | None = typer.Option(None, "--out", "-o", help="Sweep folder: OUT/VARIANT/seed-S runs and "
                                        "OUT/sweep.json. Required (but with --summarize)."),
    seeds: int = typer.Option(3, help="Seeds per variant: --seed, --seed + 1, ..."),
    variant: list[str] | None = typer.Option(
        None, "--variant", "-V", metavar="'NAME: OPTION=VALUE ...'",
        help="A variant: the options it changes against the base (the other options), e.g. 'no-ox: ox=drop' or "
             "'s-pred: speaker-weight=0.1 inputs=whisper+roberta'. Options: lr, weight-decay, gender-weight, "
             "speaker-weight, aam-margin, aam-scale, ox, undersample (yes/no), batch-size, dropout, conv-dropout, "
             "hidden, conv-dim, inputs (store names joined by +, or all), layer (K or NAME=K, as --layer). Repeat "
             "for more."),
    inputs: str = typer.Option("all",
                               help="Stores the base variant takes: names joined by + (as `info` names them), or all."),
    reference: str = typer.Option("base", help="The variant every other one is compared with."),
    resamples: int = typer.Option(1000, help="Bootstrap resamples of the comparisons."),
    members_at_once: int | None = typer.Option(None,
                                               help="At most this many members trained together (memory); default all "
                                                    "that fit one stack."),
    curves: bool = typer.Option(False, help="Draw curves.png in every member's run (about 0.5 s each; "
                                "`ser-cache plot run RUN` draws one later)."),
    train_split: shared.TrainSplit = shared.TRAINING.train_split,
    dev_split: shared.DevSplit = shared.TRAINING.dev_split,
    epochs: shared.Epochs = shared.TRAINING.epochs,
    lr: shared.HeadsLr = shared.HEADS.lr,
    batch_size: shared.HeadsBatchSize = shared.HEADS.batch_size,
    weight_decay: shared.WeightDecay = shared.TRAINING.weight_decay,
    seed: int = typer.Option(shared.TRAINING.seed, help="First seed."),
    objective: dict | None = None,  # --no-undersample ... --dropout: shared.OBJECTIVE_OPTIONS
    conv_dim: shared.ConvDim = shared.TRAINING.conv_dim,
    conv_dropout: shared.ConvDropout = shared.TRAINING.conv_dropout,
    layer: LayerOption = None,
    task_options: dict | None = None,  # --task ... --class-loss-weight: shared.TASK_OPTIONS
    memory_budget: shared.MemoryBudget = shared.HEADS.memory_budget_gb,
    device: shared.Device = shared.TRAINING.device,
    precision: shared.HeadsPrecision = shared.TRAINING.precision,
    threads: shared.Threads = shared.HEADS.threads,
    overwrite: bool = typer.Option(shared.TRAINING.overwrite, help="Train again members written with other options, "
                                   "or on a store since rebuilt with other settings."),
    progress: shared.Progress = shared.TRAINING.progress,
    tensorboard: Path | None = typer.Option(shared.TRAINING.tensorboard, metavar="DIR", help="TensorBoard scalars "
                                               "of every member in DIR/VARIANT/seed-S (pip install "
                                               "'ser-cache[tensorboard]')."),
    shard: str | None = typer.Option(None, "--shard", metavar="I/N|slurm",
                                     help="Train only shard I of N of the members (I from 0; 'slurm': from the job "
                                          "array's environment); the shard that ends last writes sweep.json."),
    summarize: Path | None = typer.Option(None, "--summarize", metavar="OUT",
                                          help="Write OUT/sweep.json of a sharded sweep from its plan "
                                               "(OUT/sweep.plan.json) and members, and print the table; no other "
                                               "option."),
) -> None:
    """Train the base options and every --variant with several seeds together; compare them with a paired bootstrap.

    Every member is an ordinary run (OUT/VARIANT/seed-S); OUT/sweep.json holds the table: per
    variant mean ± std over seeds of the Development CCC, and against --reference the difference
    in mean CCC with a 95% interval over Development utterances and seeds.

    --task categorical (or both: a second table) compares the variants' macro-F1 the same way. The
    task and --classes are the whole sweep's; a variant may change class-weights and class-loss-weight.

    --shard I/N (or slurm, in a job array) trains members I, I+N, ... of the plan; the shard that
    ends last writes sweep.json, or --summarize OUT does, once every member is written.
    """
    from ser_cache.infra.outputs import given
    from ser_cache.infra.shards import parse_shard
    from ser_cache.system.epoch_log import tensorboard_problem
    from ser_cache.train.sweep import SweepConfig, parse_variant, summarize_sweep, sweep

    if summarize is not None:
        others = _given_besides(ctx, "summarize")
        if others:
            fail(f"--summarize OUT reads every option from OUT/sweep.plan.json and trains nothing: give it alone "
                 f"(not with {', '.join(others)})")
        log_to_stderr()
        _print_result(guarded(summarize_sweep, summarize))
        return
    absent = [name for name, value in (("--features", features), ("--data", data), ("--out", out_dir)) if not value]
    if absent:
        fail(f"missing option {', '.join(absent)}: a sweep needs --features, --data and --out (or --summarize OUT "
             "alone, to summarize a sharded sweep)")
    shard = guarded(parse_shard, shard)  # a bad value: one line, exit 2
    read = given("--features", *features) + given("--data", data)  # not `inputs`: locals() become the config
    writable(out_dir, "--out", folder=True, inputs=read)
    if tensorboard is not None:
        writable(tensorboard, "--tensorboard", folder=True, inputs=read)
    if tensorboard is not None and tensorboard_problem():
        fail(tensorboard_problem())
    log_to_stderr()
    variants = guarded(lambda: tuple(parse_variant(v) for v in variant or ()))  # a bad one: one line, exit 2
    layer = tuple(layer or ())  # TrainHeadsConfig.layer
    base = shared.heads_config(locals())
    cfg = SweepConfig(base=base, seeds=seeds, variants=variants, inputs=inputs, reference=reference,
                      members_at_once=members_at_once, resamples=resamples, curves=curves, shard=shard)
    _print_result(guarded(sweep, cfg), shard)


def _given_besides(ctx: typer.Context, *names: str) -> list[str]:
    """The options given on the command line (or by the environment), not left at their defaults, but `names`."""
    sources = {p.name: ctx.get_parameter_source(p.name) for p in ctx.command.params if p.name not in names}
    return [p.opts[0] for p in ctx.command.params if p.opts and sources.get(p.name) is not None
            and sources[p.name].name not in ("DEFAULT", "DEFAULT_MAP")]


def _print_result(result, shard=None) -> None:
    """The tables of sweep.json, or what a shard did while other members are still missing."""
    if result is None:
        return
    if not result.complete:
        shown = ", ".join(result.missing[:8]) + (f" and {len(result.missing) - 8} more" if len(result.missing) > 8
                                                 else "")
        out.print(f"{result.out}: shard {shard.label if shard else ''} done ({result.trained} member(s) trained, "
                  f"{result.reused} already written); {len(result.missing)} member(s) of the sweep not written yet "
                  f"({shown}): the shard that ends last writes sweep.json (or `ser-cache sweep --summarize "
                  f"{result.out}`)", highlight=False, soft_wrap=True)
        return
    summary = result.summary
    about = f"over {len(summary['seeds'])} seed(s); Δ against {summary['reference']}"
    if "comparisons" in summary:  # the attribute task (alone, or under --task both)
        out.print(sweep_table(summary, wide=out.width >= 120, title=f"{result.out}: {summary['split']} CCC {about}"))
    if "macro_f1_comparisons" in summary:
        out.print(sweep_table(summary, wide=out.width >= 120, classes=True,
                              title=f"{result.out}: {summary['split']} macro-F1 {about} "
                                    f"({len(summary['classes'])} classes)"))


def _pm(mean, std, digits: int) -> str:
    if mean is None:
        return "—"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f}±{std:.{digits}f}"


def sweep_table(summary: dict, *, title: str = "", wide: bool = True, classes: bool = False):
    """Per variant: CCC mean±std over seeds; against the reference: Δ mean CCC, its 95% interval, P(Δ > 0).

    `wide` (a console of 120 columns or more): arousal, valence and dominance too, 4 decimals; else
    the mean and balanced CCC with 3 decimals, which fits 80 columns. sweep.json has every digit.
    `classes`: the class task's table instead: macro-F1 and balanced accuracy (wide: and accuracy),
    Δ macro-F1 against the reference, its interval and P(Δ > 0); rows are the utterances with a class.
    """
    from rich import box

    reference = summary["reference"]
    if classes:
        columns = CLASS_COLUMNS if wide else (CLASS_COLUMNS[0], CLASS_COLUMNS[2])
    else:
        columns = ATTRIBUTE_COLUMNS if wide else ATTRIBUTE_COLUMNS[3:]
    comparisons = summary["macro_f1_comparisons" if classes else "comparisons"]
    digits = 4 if wide else 3
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    table.add_column("variant")
    table.add_column("rows", justify="right")
    for label, _ in columns:
        table.add_column(label, justify="right")
    table.add_column("Δ F1" if classes else "Δ mean", justify="right")
    table.add_column("95% interval", justify="right", no_wrap=True)
    table.add_column("P(Δ>0)", justify="right")
    notes: list[str] = []
    for name, v in summary["variants"].items():
        failed = v.get("diverged") or []
        # A member whose training diverged has no run: marked here and named below the table, never
        # left out without a word.
        if failed:
            notes.append(f"* {name}: seed(s) {', '.join(str(d['seed']) for d in failed)} of "
                         f"{len(failed) + len(v['members'])} diverged ({failed[0]['reason']}); no run written, "
                         "left out of the means")
        rows = v["class_rows"] if classes else v["rows"]
        cells = [f"{name}*" if failed else name, "—" if rows is None else str(rows)]
        cells += [_pm(v["mean"].get(key), v["std"].get(key), digits) for _, key in columns]
        c = comparisons.get(name)
        if name == reference:
            cells += ["ref.", "", ""]
        elif not v["members"] or not summary["variants"].get(reference, {}).get("members", True):
            cells += ["diverged", "", ""]
        elif c is None:
            cells += ["no common rows", "", ""]
        else:
            cells += [f"{c['difference']:+.{digits}f}", f"{c['ci_low']:+.{digits}f}…{c['ci_high']:+.{digits}f}",
                      f"{c['share_positive']:.2f}"]
        table.add_row(*cells, style="bold" if name == reference else None)
    if notes:
        table.caption = "\n".join(notes)
        table.caption_justify = "left"
    return titled(title, table)
