"""Stage-one commands: extract, info, export."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from ser_cache.cli import shared_options as shared
from ser_cache.cli.app import app, err, fail, guarded, out, writable


@app.command()
def extract(
    model: str = typer.Option(..., "--model", "-m",
                              help="Short name (whisper-large-v3, roberta-large, wavlm-large, wavlm-base-plus-sv), "
                                   "Hugging Face id, or local directory."),
    data: Path = typer.Option(..., "--data", "-d", help="MSP-Podcast directory or CSV manifest."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder for the store: OUT/<name>.zarr."),
    split: list[str] | None = typer.Option(None, "--split", "-s", metavar="SPLIT",
                                           help="Split(s) to extract (repeatable); default all."),
    name: str | None = typer.Option(None,
                                    help="Store name (default: the model's short name, plus -frames with --pooling "
                                         "frames)."),
    kind: shared.KindName | None = typer.Option(None, help="Encoder kind (default: detected from the model's "
                                                   "config; ssl: WavLM, HuBERT, wav2vec 2.0, data2vec-audio, "
                                                   "W2V-BERT)."),
    window: shared.WindowMode | None = typer.Option(None,
                                                    help="Whisper only: 'window' (15-s window, as the paper; the "
                                                         "default) or 'trimmed' (real frames only)."),
    pooling: shared.PoolingMode = typer.Option("mean",
                                               help="'mean' or 'mean+std' over valid frames, or 'frames': keep the "
                                                    "last layer at every valid frame (whisper, wavlm; for frame-level "
                                                    "heads)."),
    layers: str | None = typer.Option(
        None, "--layers", metavar="all|last|LIST",
        help="Audio encoders: the hidden states to keep, numbered as transformers numbers them (0 = the input of "
             "the first transformer layer): all, last, or indices and ranges (6,12,18,24 or 8-16). Default: all for "
             "pooled SSL stores (WavLM), last for Whisper and frame stores; frames of L states take L times the "
             "space of last-layer frames (the size is printed before the run)."),
    max_seconds: float = typer.Option(15.0, help="Crop audio to its first N seconds."),
    batch_seconds: float = typer.Option(600.0, help="Padded audio seconds per batch."),
    batch_texts: int = typer.Option(64, help="Transcripts per batch (text encoders)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    precision: shared.EncoderPrecisionMode = typer.Option("auto", help="auto: bf16 on CUDA, fp32 on CPU."),
    workers: int | None = typer.Option(None,
                                       help="Audio decoding processes per rank (default: the rank's share of the cores "
                                            "less one, up to 8 on GPU, 2 on CPU)."),
    on_error: shared.OnErrorMode = typer.Option("skip",
                                                help="'skip' bad files (listed in <name>.errors.csv) or 'fail' at the "
                                                     "first."),
    overwrite: bool = typer.Option(False, help="Rebuild a store whose settings differ."),
    retry_failed: bool = typer.Option(False, help="Recompute rows that failed in an earlier run."),
    chunk_rows: int | None = typer.Option(None, help="Rows per Zarr chunk (default: ~4 MiB chunks)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    transcripts: Path | None = typer.Option(
        None, "--transcripts", metavar="FILE",
        help="Text encoders: a transcript table (columns FileName or id, and text; e.g. from `ser-cache transcribe`) "
             "for the rows the corpus has no transcript for."),
    prefer_transcripts: bool = typer.Option(
        False, "--prefer-transcripts",
        help="The --transcripts table's text first, the corpus's only where the table has none (changes the store's "
             "fingerprint)."),
    shard: shared.ShardSpec = None,
) -> None:
    """Run a frozen encoder once over a corpus; write pooled (or frame-level) features to OUT/<name>.zarr \
(resumable)."""
    from ser_cache.data.transcripts import record_path as transcript_record
    from ser_cache.features.extract import ExtractConfig, extract as run_extract
    from ser_cache.infra.outputs import given, local_folder

    writable(out_dir, "--out", folder=True,
             inputs=given("--data", data) + given("--transcripts", transcripts) + local_folder("--model", model))
    cfg = ExtractConfig(model=model, data=data, out=out_dir, splits=tuple(split or ()), name=name, kind=kind,
                        window=window, pooling=pooling, layers=layers, max_seconds=max_seconds,
                        batch_seconds=batch_seconds,
                        batch_texts=batch_texts, device=device, precision=precision, workers=workers,
                        on_error=on_error, overwrite=overwrite, retry_failed=retry_failed, chunk_rows=chunk_rows,
                        progress=progress, transcripts=transcripts, prefer_transcripts=prefer_transcripts,
                        shard=shard_option(shard))
    # The size before the run, where it can surprise: a frame store, or a choice of layers (frames of
    # every state are L times a last-layer frame store). A default pooled extraction prints as it did.
    result = guarded(run_extract, cfg, announce=_announce if layers is not None or pooling == "frames" else None)
    if result is None or result.rank != 0:
        return
    t = result.timings
    if result.computed == 0:  # a rerun with every row done: no rates to report ("0.0 utt/s")
        failed = (f"; {result.failed} failed (see {result.report}; --retry-failed computes them again)"
                  if result.failed else "")
        err.print(f"[bold]{result.store}[/]: nothing to do: all {result.rows} rows were done before, "
                  f"{result.written} written{failed}", highlight=False, soft_wrap=True)
    else:
        err.print(
            f"[bold]{result.store}[/]: {result.written}/{result.rows} rows written, {result.failed} failed "
            f"({result.computed} computed now, {result.skipped} already done) in {result.wall_seconds:.1f} s — "
            f"{_rates(result)} "
            f"[dim](set-up {result.setup_seconds:.1f} s, headers {t.get('headers', 0):.1f} s, waiting for decoding "
            f"{t.get('decode_wait', 0):.1f} s, "
            f"encoder {t.get('encode', 0):.1f} s, writing {t.get('write', 0):.1f} s)[/]",
            highlight=False,
        )
    if result.shard is not None:
        err.print(_shard_text(result), highlight=False, soft_wrap=True)
    if result.text_sources is not None:
        s = result.text_sources
        err.print(f"text: {s['corpus']} row(s) from the corpus's transcripts, {s['table']} from the table, "
                  f"{s['none']} with none [dim](see {transcript_record(result.store).name})[/]", highlight=False)
    if result.written == 0 and result.computed > 0:
        # Every row this run computed failed, and none was written before: a store of nothing
        # is never what was asked for (a wrong --kind, --max-seconds, a corpus without audio).
        fail(f"nothing was written: all {result.computed} row(s) of {result.store} failed; the reasons are in "
             f"{result.report}", code=1)
    if result.failed and result.computed:
        err.print(f"[yellow]{result.failed} utterance(s) could not be used; see {result.report}[/]", highlight=False)


def shard_option(text: str | None):
    """--shard's value as an infra.shards.Shard (None without one); a bad value exits naming it."""
    from ser_cache.infra.shards import ShardError, parse_shard

    try:
        return parse_shard(text)
    except ShardError as exc:
        fail(str(exc))


def _shard_text(result) -> str:
    """A shard's last line: its share, and whether the store is complete or which shards still have work."""
    share = f"shard {result.shard.label}: {result.shard_rows} row(s) in its share"
    if result.shard_rows == 0:
        share += " (the store has fewer units of work than shards: this one has none)"
    if result.complete:
        return f"{share}; the store is complete"
    if result.shards_pending:
        return (f"{share}; rows pending in {result.shards_pending} — the store is complete when they have run "
                f"(`ser-cache info {result.store}` shows the progress)")
    return f"{share}; the store is not complete: failed rows still to be reported by a running shard"


def _announce(estimate) -> None:
    """The store's estimated size, printed before the run (extract's `announce`)."""
    err.print(estimate_text(estimate), highlight=False, soft_wrap=True)


def estimate_text(e) -> str:
    """One line for extract.SizeEstimate: how big the store's features will be, and why; for frames of
    several layers, how many times a last-layer frame store that is."""
    layers = f" × {e.layers} layers" if e.layers is not None else ""
    vector = f"{layers} × {e.row_shape[-1]} × 2 bytes"
    if not e.frame_level:
        rows = f"{e.rows:,} rows{layers} × " + " × ".join(str(d) for d in e.row_shape[-1:]) + " × 2 bytes"
        return f"{e.store}: the features will take {size_text(e.bytes)} ({rows}, float16)"
    basis = (f"{e.frames / max(e.rows, 1):.0f} frames a row on average, from {e.sampled} clip(s)' durations"
             if e.sampled else "every row at its most frames: an upper bound")
    text = (f"{e.store}: the features will take about {size_text(e.bytes)} ({e.frames:,} valid frames{vector}, "
            f"float16; {basis})")
    if e.layers is not None and e.layers > 1:
        text += (f"; that is {e.layers}× a last-layer frame store of the same clips — keep fewer layers with "
                 "--layers (e.g. 6,12,18) if you do not need them all")
    return text


def _rates(result) -> str:
    """utt/s, and audio-s/s for an audio encoder (a text encoder's rows have no audio seconds)."""
    rates = f"{result.utterances_per_second:.1f} utt/s"
    if getattr(result, "modality", "audio") == "audio":
        rates += f", {result.audio_seconds_per_second:.0f} audio-s/s"
    return rates


@app.command()
def info(
    store: Path = typer.Argument(..., help="A feature store (.zarr)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    verify: bool = typer.Option(False, "--verify",
                                help="Read every chunk (decompression and checksum) and list the missing or damaged "
                                     "ones; exit 1 if any."),
) -> None:
    """Summarise a feature store: model, settings, rows written and failed, size (and a frame store's frames)."""
    from ser_cache.features.integrity import repair_advice
    from ser_cache.features.store import FeatureStore

    s = guarded(FeatureStore.open, store)
    if verify:
        problems = guarded(s.verify, deep=True)
        if not problems:
            out.print(f"{store}: OK, every chunk is on disk and readable ({s.n_rows} rows)", highlight=False)
            return
        for p in problems:
            out.print(f"{store}: {p}", highlight=False, soft_wrap=True)
        err.print(f"[bold red]{len(problems)} chunk(s) missing or damaged:[/] {repair_advice(problems)}",
                  highlight=False,
                  soft_wrap=True)
        raise typer.Exit(1)
    summary = guarded(s.summary)
    summary.update(guarded(_shards_summary, s))
    problems = guarded(s.verify, deep=False)
    if problems:
        err.print(f"[yellow]warning: {len(problems)} chunk(s) missing or damaged, e.g. {problems[0]}; "
                  f"run `ser-cache info --verify {store}`[/]", highlight=False, soft_wrap=True)
    if as_json:
        out.print_json(json.dumps(summary))
        return
    table = Table(title=str(store), show_header=False)
    for key in ("name", "model_id", "revision", "kind", "rows", "written", "failed", "pending", "feature_shape",
                "dtype", "chunk_rows", "fingerprint", "package_version"):
        table.add_row(key, str(summary[key]))
    for key, value in sorted(summary["settings"].items()):
        if key not in ("model_id", "revision", "kind", "feature_shape"):
            table.add_row(f"settings.{key}", str(value))
    table.add_row("size", size_text(summary["size_bytes"]))
    if summary.get("encoder"):
        for key, value in encoder_rows(summary["encoder"], kind=summary.get("kind")):
            table.add_row(key, value)
    if "frames" in summary:
        for key, value in _frame_rows(summary["frames"]):
            table.add_row(key, value)
    if summary.get("transcripts"):
        for key, value in _transcript_rows(summary["transcripts"]):
            table.add_row(key, value)
    for key, value in _shard_rows(summary.get("shards")):
        table.add_row(key, value)
    out.print(table)


def _shards_summary(store) -> dict:
    """A store extracted by shards: every shard's progress (shard_progress.py) under "shards"."""
    from ser_cache.features.shard_progress import progress, recorded_count

    count = recorded_count(store)
    return {"shards": [p.to_dict() for p in progress(store, count)]} if count else {}


def _shard_rows(shards: list[dict] | None) -> list[tuple[str, str]]:
    """Per shard: rows written, failed and pending of its share, and who runs it now; then what is missing."""
    if not shards:
        return []
    rows = []
    for p in shards:
        running = f"; running ({p['running']})" if p["running"] else ""
        state = "done" if p["pending"] == 0 else f"{p['pending']} pending"
        rows.append((f"shard {p['shard']}", f"{p['written']}/{p['rows']} written, {p['failed']} failed, {state} "
                                            f"({p['chunks']} chunk(s)){running}"))
    missing = [p for p in shards if p["pending"]]
    if missing:
        count = shards[0]["shard"].split("/")[1]
        rows.append(("shards missing", ", ".join(p["shard"] for p in missing) +
                     f" — rerun each with the same command and --shard I/{count} (or resubmit those array tasks)"))
    return rows


def encoder_rows(d: dict, kind: str | None = None) -> list[tuple[str, str]]:
    """What extract recorded of a store's encoder (the attribute "encoder", Encoder.describe()) as table
    rows: its family (where the store's `kind` does not already say it), the hidden states held, hidden
    size, frame rate and input convention; the keys it lacks are left out."""
    rows = []
    if d.get("family") and d["family"] != kind:
        rows.append(("encoder.family", str(d["family"])))
    if d.get("layers") is not None:
        held = [int(i) for i in d["layers"]]
        of = f" of {d['n_states']} states (0-{int(d['n_states']) - 1})" if d.get("n_states") else ""
        rows.append(("encoder.layers", f"{index_ranges(held)}: {len(held)} held{of}"))
    if d.get("hidden_size") is not None:
        rows.append(("encoder.hidden_size", str(d["hidden_size"])))
    if d.get("frame_rate") is not None:
        rows.append(("encoder.frame_rate", f"{float(d['frame_rate']):g} Hz"))
    if d.get("input"):
        mask = d.get("attention_mask")
        rows.append(("encoder.input", str(d["input"]) + ("" if mask is None else
                                                         ", attention mask" if mask else ", no attention mask")))
    if d.get("last_state"):
        rows.append(("encoder.last_state", str(d["last_state"])))
    if d.get("emotion_trained") is not None:
        rows.append(("encoder.emotion_trained", "yes" if d["emotion_trained"] else "no"))
    return rows


def index_ranges(indices: list[int]) -> str:
    """[0, 1, 2, 3, 6, 12, 13] → '0-3,6,12-13'."""
    parts, start = [], None
    for k, i in enumerate(indices):
        if start is None:
            start = i
        if k + 1 == len(indices) or indices[k + 1] != i + 1:
            parts.append(str(start) if start == i else f"{start}-{i}")
            start = None
    return ",".join(parts)


def _transcript_rows(t: dict) -> list[tuple[str, str]]:
    """A text store's sources of text as table rows: how many rows each fed, the table and its ASR model."""
    rows = t.get("rows") or {}
    out_rows = [("transcripts", f"{rows.get('corpus', 0)} from the corpus, {rows.get('table', 0)} from the table, "
                                f"{rows.get('none', 0)} with none" + (" (table preferred)" if t.get("prefer") else ""))]
    if t.get("table"):
        out_rows.append(("transcripts.table", f"{t['table']} (sha256 {str(t.get('table_sha256'))[:12]}…)"))
        asr = t.get("asr")
        if asr:
            out_rows.append(("transcripts.asr", f"{asr.get('model_id')} @ {asr.get('revision')}"))
        else:
            out_rows.append(("transcripts.asr", "unknown (no sidecar beside the table)"))
    return out_rows


def _frame_rows(f: dict) -> list[tuple[str, str]]:
    """A frame store's figures as table rows: how many frames the rows hold and what they cost."""
    layers = [("layers per frame", f"{f['layers']} (one vector per hidden state held)")] if f.get("layers") else []
    return [
        *layers,
        ("frames per row", f"mean {f['frames_mean']:.1f}, max {f['frames_max']} (room for {f['max_frames_per_row']})"),
        ("valid frames", f"{f['frames_total']} in {f['rows_written']} rows written"),
        ("valid frames size",
         f"{size_text(f['frames_bytes'])} (float16), {size_text(f['frames_bytes_per_row'])} per row"),
        ("size per row", f"{size_text(f['size_bytes_per_row'])} on disk"),
    ]


def size_text(n_bytes: float) -> str:
    """Bytes in the unit that shows them, with three significant digits: 512 B, 7.25 kB, 48.3 MB, 1.20 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            value = n_bytes / scale
            return f"{value:.{2 if value < 10 else 1 if value < 100 else 0}f} {unit}"
    return f"{n_bytes:.0f} B"


@app.command()
def export(
    store: Path = typer.Argument(..., help="A feature store (.zarr)."),
    fmt: shared.ExportFormat = typer.Option("hdf5", "--format", help="Output format (HDF5, via h5py)."),
    dest: Path | None = typer.Option(None, "--out", "-o", help="Output file (default: next to the store, .h5)."),
    data: Path | None = typer.Option(None, "--data", "-d", help="MSP-Podcast directory or CSV manifest: add each "
                                        "id's labels and split (labels/arousal, …, labels/split) to the file."),
    overwrite: shared.OverwriteFiles = False,
    merged: bool = typer.Option(False, "--merged", help="STORE is a fine-tuned run of adapters and heads (--lora, "
                                                        "--freeze-encoder): write a run (--out) holding the whole "
                                                        "encoder, the adapters merged."),
) -> None:
    """Write a store's arrays and attributes to another format (HDF5 via h5py), with --data its labels too."""
    if merged:  # a few lines here; the work is runs.finetuned_export's
        from ser_cache.runs.finetuned_export import export_merged

        if dest is None:
            fail("--merged: give --out, the run directory to write")
        from ser_cache.infra.outputs import given

        writable(dest, "--out", folder=True, inputs=given("the run", store), replaced=overwrite)
        err.print(f"wrote {guarded(export_merged, store, dest, overwrite=overwrite)}", highlight=False)
        return
    from ser_cache.data.corpus import load_corpus
    from ser_cache.features.export import export_hdf5
    from ser_cache.features.store import FeatureStore
    from ser_cache.infra.outputs import given

    if fmt != "hdf5":
        fail(f"--format {fmt}: expected hdf5")
    writable(dest or store.with_suffix(".h5"), "--out", inputs=given("the store", store) + given("--data", data),
             overwrite=overwrite)
    s = guarded(FeatureStore.open, store)
    # Labels go out as the corpus has them: an exporter does not judge their scale.
    labels = guarded(load_corpus, data, label_scale="none") if data is not None else None
    path = guarded(export_hdf5, s, dest or store.with_suffix(".h5"), labels)
    if labels is not None:
        known = {u.id for u in labels}
        missing = sum(str(i) not in known for i in s.ids())
        if missing:
            err.print(f"[yellow]{missing} of {s.n_rows} id(s) are not in --data {data}; their labels are NaN "
                      "and their strings empty[/]", highlight=False, soft_wrap=True)
    err.print(f"wrote {path}", highlight=False)
