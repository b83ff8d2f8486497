"""`ser-cache plot`: figures of a run's training and of a store's speakers (docs/plots.md)."""

from __future__ import annotations

from pathlib import Path

import typer

from ser_cache.cli import shared_options as shared
from ser_cache.cli.app import KNOWN_ERRORS, app, guarded, out, writable

KNOWN_ERRORS.append("ser_cache.runs.plots:PlotError")

plot_app = typer.Typer(no_args_is_help=True, help="Figures: training curves of a run, speakers in a feature store.")
app.add_typer(plot_app, name="plot")


@plot_app.command("run")
def plot_run(
    run: Path = typer.Argument(..., help="A run directory (train-heads, finetune wavlm; an unfinished fine-tuning "
                                         "run too)."),
    out_dir: Path | None = typer.Option(None, "--out", "-o", metavar="DIR|FIG.png",
                                           help="A folder for curves.png, or the figure's own name ending in .png "
                                                "(default: the run directory)."),
    svg: bool = typer.Option(False, "--svg", help="Also write the figure as SVG beside the PNG."),
    overwrite: shared.OverwriteFiles = False,
) -> None:
    """Training curves: the losses and the Development CCC per epoch, the kept epoch marked.

    A run that learned layer weights (an input with a layer axis, no --layer) also gets layer_weights.png.
    """
    from ser_cache.infra.outputs import run_inputs
    from ser_cache.runs.layout import METRICS
    from ser_cache.runs.plots import CURVES, LAYER_WEIGHTS, figure_path, layer_weights_plot, training_curves

    own = [run / CURVES, (run / CURVES).with_suffix(".svg"), run / LAYER_WEIGHTS,
           (run / LAYER_WEIGHTS).with_suffix(".svg")]  # the run's own figures may be drawn again
    png = figure_path(out_dir, own[0])
    # Beside curves.png: layer_weights.png, or FIG-layer_weights.png beside a --out FIG.png.
    weights_png = png.parent / (LAYER_WEIGHTS if png.name == CURVES else f"{png.stem}-{LAYER_WEIGHTS}")
    layered = _learned_layer_weights(run / METRICS)
    if out_dir is not None or run.is_dir():  # else reading the run says what is wrong with it
        writable(png, "--out", inputs=run_inputs(run, own=own), overwrite=overwrite,
                 files=([png.with_suffix(".svg")] if svg else [])
                 + ([weights_png] + ([weights_png.with_suffix(".svg")] if svg else []) if layered else []))
    result = guarded(training_curves, run, out_dir, svg=svg)
    if result is None:
        return
    kept = (f"kept epoch {result.kept_epoch}" if result.finished
            else f"in progress, best so far: epoch {result.kept_epoch}")
    out.print(f"{len(result.epochs)} epochs ({kept})")
    for path in result.paths:
        out.print(f"wrote {path}", highlight=False, soft_wrap=True)
    if layered:
        drawn = guarded(layer_weights_plot, run, out=weights_png, svg=svg)
        for path in drawn.paths if drawn is not None else []:
            out.print(f"wrote {path}", highlight=False, soft_wrap=True)


def _learned_layer_weights(metrics: Path) -> bool:
    """Whether a run's metrics.json records learned layer weights (unreadable: no; the curves say what is wrong)."""
    import json

    try:
        return bool(json.loads(metrics.read_text()).get("layer_weights"))
    except (OSError, ValueError, AttributeError):
        return False


@plot_app.command("speakers")
def plot_speakers(
    store: Path = typer.Argument(...,
                                 help="A feature store (.zarr): pooled, layered (layers averaged) or frames (frames "
                                      "averaged)."),
    data: Path = typer.Option(..., "--data", "-d",
                              help="MSP-Podcast directory or CSV manifest (the speaker of each utterance)."),
    speakers: int = typer.Option(10, help="Speakers to draw (paper Fig. 2: 10)."),
    per_speaker: int = typer.Option(10, "--per-speaker", help="Utterances per speaker (paper Fig. 2: 10)."),
    out_path: Path | None = typer.Option(None, "--out", "-o", metavar="DIR|FIG.png",
                                            help="A folder for <store>-speakers.png, or the figure's own name ending "
                                                 "in .png (default: <store>-speakers.png beside the store)."),
    seed: int = typer.Option(0, help="Seed for the speakers, the utterances and t-SNE."),
    layer: int | None = typer.Option(None, help="A layered store: this layer instead of the mean over layers."),
    svg: bool = typer.Option(False, "--svg", help="Also write the figure as SVG beside the PNG."),
    overwrite: shared.OverwriteFiles = False,
) -> None:
    """t-SNE of utterances coloured by speaker, with silhouette scores (how well the vectors group by speaker)."""
    from ser_cache.infra.outputs import given
    from ser_cache.runs.plots import default_tsne_path, figure_path, speaker_tsne

    figure = figure_path(out_path, default_tsne_path(store))
    writable(figure, "--out", inputs=given("the store", store) + given("--data", data), overwrite=overwrite,
             files=[figure.with_suffix(".svg")] if svg else [])
    result = guarded(speaker_tsne, store, data, speakers=speakers, per_speaker=per_speaker, seed=seed, out=out_path,
                     svg=svg, layer=layer)
    if result is None:
        return
    out.print(f"{len(result.speakers)} speakers × {per_speaker} utterances (of {result.eligible} speakers with enough)")
    out.print(f"silhouette (vectors, cosine): {result.silhouette_vectors:.4f}")
    out.print(f"silhouette (t-SNE, 2-D):      {result.silhouette_tsne:.4f}")
    for path in result.paths:
        out.print(f"wrote {path}", highlight=False, soft_wrap=True)
