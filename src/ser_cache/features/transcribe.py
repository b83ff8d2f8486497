"""`ser-cache transcribe`: automatic transcripts with Whisper, for utterances that have none.

The challenge's Test3 turns come without transcripts, while a multimodal system's text branch
needs one per utterance. This runs Whisper (English, no timestamps, greedy or beam search) on
those utterances and writes a table `FileName,text` that `predict --transcripts` reads.

The loop, in order:
1. pick the utterances (by default those without a transcript; `--all`: every one), read their
   file headers (durations; unreadable files fail here), sort by duration and pack batches by
   total seconds, so that clips of similar length, and so of similar token counts, decode together;
2. decode the next batch's audio in a helper thread while the model generates for this one
   (transcriber.WhisperTranscriber);
3. after each batch, append its rows to the journal `<out>.partial` and fsync it. A run killed at
   any point loses at most the batch in flight: the next run reads the journal, skips its rows,
   and packs the rest exactly as before (greedy packing restarted at a batch boundary gives the
   same batches), so it ends with the table an uninterrupted run writes;
4. at the end write the table atomically (rows sorted by FileName), then the sidecar, then remove
   the journal.

The sidecar `<out>.json` records the model, its revision and every setting that changes the text;
a rerun with other settings is refused (or starts over with --overwrite). It is written before the
first journal line, so a journal always has its settings beside it.

The modules, lowest first (no module imports a higher one): transcript_table (the table, the
journals, the sidecar, the error report), transcribe_plan (the options, the result, the selection and
packing, what both loops share), transcribe_shards (the `--shard I/N` run: see its docstring, and the
shards' files and locks), and this one: the one-process loop, and `transcribe`, which hands a run with
`cfg.shard` to transcribe_shards.transcribe_shard. The names other code imports from here (the options,
the result, the error, DEFAULT_MODEL, `report_path`) are re-exported (`__all__`).
"""

from __future__ import annotations

import time
from pathlib import Path

from ser_cache.data import audio as audio_lib
from ser_cache.data.transcripts import sidecar_path
from ser_cache.features.transcribe_plan import (
    DEFAULT_MODEL,
    TranscribeConfig,
    TranscribeResult,
    durations,
    fresh_record,
    load_transcriber,
    pack,
    prefetch,
    select_utterances,
)
from ser_cache.features.transcribe_shards import (
    refuse_shards,
    run_lock,
    shared_files_lock,
    transcribe_shard,
    unsharded_lock_target,
)
from ser_cache.features.transcriber import WHISPER_SECONDS, WhisperTranscriber
from ser_cache.features.transcript_table import (
    Journal,
    TranscribeError,
    differences,
    journal_path,
    read_sidecar,
    read_table,
    report_path,
    write_finished,
    write_sidecar,
)
from ser_cache.infra.progress import ExtractProgress

# What `from ser_cache.features.transcribe import ...` offers: the command's function, its options, its
# result and error, and the paths of what it writes.
__all__ = ["DEFAULT_MODEL", "TranscribeConfig", "TranscribeError", "TranscribeResult", "done_rows", "report_path",
           "transcribe"]


def done_rows(cfg: TranscribeConfig, settings: dict) -> tuple[dict[str, str], dict | None]:
    """Rows an earlier run with the same settings finished (its table and its journal), and its record.

    With --overwrite they are dropped; with other settings the run is refused.
    """
    out, sidecar, journal = Path(cfg.out), sidecar_path(Path(cfg.out)), journal_path(Path(cfg.out))
    if cfg.overwrite:
        journal.unlink(missing_ok=True)
        return {}, None
    record = read_sidecar(sidecar)
    if record is None:
        if out.exists() or journal.exists():
            made = journal if journal.exists() else out
            raise TranscribeError(f"{made} exists without its settings file {sidecar.name}, so it cannot be "
                                  "checked against this run; pass --overwrite to start again or choose another --out")
        return {}, None
    diff = differences(record.get("settings", {}), settings)
    if diff:
        raise TranscribeError(f"{out} was made with other settings ({'; '.join(diff)}); pass --overwrite to "
                              "start again or choose another --out")
    table = read_table(out) if out.is_file() else {}
    table.update(Journal(journal).read())
    return table, record


# --------------------------------------------------------------------------- the loop


def transcribe(cfg: TranscribeConfig, transcriber: WhisperTranscriber | None = None) -> TranscribeResult:
    """Transcribe the utterances `cfg` selects into `cfg.out`; resumable, see the module docstring.
    With `cfg.shard`, only that shard's part of the plan (see transcribe_shards.transcribe_shard)."""
    cfg.verify()
    if cfg.shard is not None:
        return transcribe_shard(cfg, transcriber)
    t0 = time.perf_counter()
    out = Path(cfg.out)
    utts, have_transcript = select_utterances(cfg)
    with run_lock(unsharded_lock_target(out), f"another transcribe of {out} (without --shard) is running"):
        if transcriber is None:
            transcriber = load_transcriber(cfg)
        settings = transcriber.settings(WHISPER_SECONDS)
        with shared_files_lock(out):
            refuse_shards(out, cfg.overwrite)
            done, previous = done_rows(cfg, settings)
            record = fresh_record(cfg, settings, previous)
            write_sidecar(sidecar_path(out), record)  # before the journal's first line: a journal has its settings

        todo = [u for u in utts if u.id not in done]
        seconds, failed = durations(todo, WHISPER_SECONDS)
        by_id = {u.id: u for u in utts}
        batches = pack(seconds, cfg.batch_seconds)
        journal = Journal(journal_path(out))
        new: dict[str, str] = {}
        audio_seconds = 0.0
        progress = ExtractProgress(enabled=cfg.progress, total=len(seconds), name=out.name)
        try:
            with progress:
                for batch, loaded in prefetch(batches, by_id):
                    ok = []
                    for uid, (wave, reason) in zip(batch, loaded):
                        if reason is not None:
                            failed[uid] = reason
                        else:
                            ok.append((uid, wave))
                    if ok:
                        texts = transcriber.transcribe([w for _, w in ok])
                        rows = [(uid, text) for (uid, _), text in zip(ok, texts)]
                        journal.append(rows)
                        new.update(rows)
                        audio_seconds += sum(len(w) for _, w in ok) / audio_lib.SAMPLE_RATE
                    progress.advance(len(batch), sum(seconds[i] for i in batch))
        finally:
            journal.close()

        table = {**done, **new}
        report = write_finished(out, record, table, failed, by_id)
        journal_path(out).unlink(missing_ok=True)
    return TranscribeResult(out=out, sidecar=sidecar_path(out), report=report, selected=len(utts),
                            transcribed=len(new), skipped=len(utts) - len(todo), failed=len(failed),
                            have_transcript=have_transcript, rows=len(table),
                            wall_seconds=time.perf_counter() - t0, audio_seconds=audio_seconds, settings=settings)
