"""`ser-cache probe-layers`: every hidden state of a layered store alone, and their learned weighting."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ser_cache.cli import shared_options as shared
from ser_cache.cli.app import app, guarded, log_to_stderr, out, writable
from ser_cache.cli.stage_two import titled

SHORT = {"ccc_arousal": "arousal", "ccc_valence": "valence", "ccc_dominance": "dominance", "ccc_mean": "mean",
         "macro_f1": "macro-F1"}


@app.command("probe-layers")
@shared.training_options
def probe_layers_command(
    store: Path = typer.Argument(..., help="A pooled store with a layer axis (extract --layers all, or a list)."),
    features: list[Path] | None = typer.Option(None, "--features", "-f", metavar="STORE",
                                               help="Another store every member takes as well (a text store, say); "
                                                    "repeat for more."),
    data: Path = typer.Option(..., "--data", "-d", help="MSP-Podcast directory or CSV manifest (labels and splits)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Probe folder: OUT/layer-K/seed-S and OUT/base/seed-S "
                                                          "runs, probe.csv, probe.json, probe.png, sweep.json."),
    seeds: int = typer.Option(1, help="Seeds per layer: --seed, --seed + 1, ..."),
    resamples: int = typer.Option(1000, help="Bootstrap resamples of the weighted sum's interval."),
    members_at_once: int | None = typer.Option(None, help="At most this many members trained together (memory)."),
    train_split: shared.TrainSplit = shared.TRAINING.train_split,
    dev_split: shared.DevSplit = shared.TRAINING.dev_split,
    epochs: shared.Epochs = shared.TRAINING.epochs,
    lr: shared.HeadsLr = shared.HEADS.lr,
    batch_size: shared.HeadsBatchSize = shared.HEADS.batch_size,
    weight_decay: shared.WeightDecay = shared.TRAINING.weight_decay,
    seed: int = typer.Option(shared.TRAINING.seed, help="First seed."),
    objective: dict | None = None,  # --no-undersample ... --dropout: shared.OBJECTIVE_OPTIONS
    task_options: dict | None = None,  # --task ... --class-loss-weight: shared.TASK_OPTIONS
    memory_budget: shared.MemoryBudget = shared.HEADS.memory_budget_gb,
    device: shared.Device = shared.TRAINING.device,
    precision: shared.HeadsPrecision = shared.TRAINING.precision,
    threads: shared.Threads = shared.HEADS.threads,
    overwrite: bool = typer.Option(shared.TRAINING.overwrite, help="Train again members written with other options, "
                                   "or on a store since rebuilt with other settings."),
    progress: shared.Progress = shared.TRAINING.progress,
) -> None:
    """Which layer carries the emotion: heads on each hidden state of STORE alone and on their learned weighting.

    One member per layer (train-heads --layer NAME=K) and one on the learned softmax weighting
    (train-heads without --layer), trained together as a sweep on the same rows; prints the table
    of Development CCC per attribute (macro-F1 under --task categorical) per layer and writes it
    (probe.csv, probe.json) with probe.png: each score against the layer index, the weighted sum a
    line with its bootstrap interval as a band. Run again, it reuses the members already written.
    """
    from ser_cache.infra.outputs import given
    from ser_cache.train.probe import ProbeConfig, probe_layers

    others = list(features or [])
    read = given("the store", store) + given("--features", *others) + given("--data", data)
    writable(out_dir, "--out", folder=True, inputs=read)
    log_to_stderr()
    features = [store, *others]  # the base options' stores (heads_config reads locals())
    base = shared.heads_config(locals())
    cfg = ProbeConfig(store=store, base=base, seeds=seeds, members_at_once=members_at_once, resamples=resamples)
    result = guarded(probe_layers, cfg)
    if result is None:
        return
    out.print(probe_table(result, wide=out.width >= 100))
    for path in result.paths:
        out.print(f"wrote {path}", highlight=False, soft_wrap=True)


def probe_table(result, *, wide: bool = True):
    """One row per hidden state and one for the learned weighting (its interval beside it): each score's
    mean over seeds (± std with several seeds); `wide` off: the mean CCC and macro-F1 only."""
    from rich import box

    columns = [c for c in result.columns if wide or c in ("ccc_mean", "macro_f1")]
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    table.add_column("layer")
    for c in columns:
        table.add_column(SHORT.get(c, c), justify="right")
    best = {c: max((r for r in result.table if isinstance(r["layer"], int) and r.get(c) is not None),
                   key=lambda r: r[c], default=None) for c in columns}
    for r in result.table:
        cells = [str(r["layer"])]
        for c in columns:
            v, sd = r.get(c), r.get(f"{c}_std")
            text = "—" if v is None else f"{v:.3f}" if sd is None else f"{v:.3f}±{sd:.3f}"
            if best[c] is r:
                text += " *"
            cells.append(text)
        table.add_row(*cells, style="bold" if not isinstance(r["layer"], int) else None)
    interval = "; ".join(f"{SHORT.get(c, c)} {lo:.3f}…{hi:.3f}" for c, (lo, hi) in result.interval.items()
                         if c in columns)
    from rich.console import Group
    from rich.text import Text

    # Below the table, not its caption: a caption wraps at the table's width.
    note = "* the best layer" + (f"; the weighted sum's 95% bootstrap interval: {interval}" if interval else "")
    return Group(titled(f"{result.out}: {result.name}, {result.split} score of each hidden state alone and of "
                        "the weighted sum", table), Text(note))
