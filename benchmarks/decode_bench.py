"""How fast `extract`'s decoding workers hand decoded audio to the main process.

    python benchmarks/decode_bench.py                          # 6,000 synthetic clips, 0, 1 and 2 workers
    python benchmarks/decode_bench.py --workers 0 4 8 --utterances 20000 --workdir bench-work

The clips are `ser-cache bench extract`'s synthetic corpus (16-kHz 16-bit WAV, MSP-Podcast-like
lengths: mean 5.5 s), written once into --workdir (or a temporary folder). Each worker count gets
its own decoder, all its workers started and warmed first, then timed over every batch (--batch files
each) in order, as extract consumes them. Prints one JSON line per worker count: utterances and
audio-seconds per second, and the seconds the main process spent waiting.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main(argv=None) -> list[dict]:
    from ser_cache.features.bench import prepare_corpus
    from ser_cache.features.decoding import Decoder
    from ser_cache.features.encode import new_timings

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--utterances", type=int, default=6000)
    p.add_argument("--batch", type=int, default=100, help="files per batch")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--workdir", type=Path, help="keep (and reuse) the synthetic corpus here")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    tmp = tempfile.TemporaryDirectory(prefix="ser-cache-decode-") if args.workdir is None else None
    root = Path(tmp.name) if tmp else args.workdir
    try:
        durations, manifest = prepare_corpus(root, args.utterances, args.seed)
        paths = sorted(str(f) for f in (manifest.parent / "audio").glob("*.wav"))
        batches = [paths[i:i + args.batch] for i in range(0, len(paths), args.batch)]
        results = []
        for workers in args.workers:
            decoder = Decoder(workers, 15.0)
            try:
                # Start every worker (one is spawned per task in flight) and warm them.
                list(decoder.batches(batches[:max(2, Decoder.AHEAD * workers)], new_timings()))
                timings = new_timings()
                t = time.perf_counter()
                n = sum(len(b) for b in decoder.batches(batches, timings))
                dt = time.perf_counter() - t
            finally:
                decoder.close()
            row = {"workers": workers, "utterances": n, "utterances_per_second": round(n / dt),
                   "audio_seconds_per_second": round(float(durations.sum()) / dt),
                   "main_process_waited_seconds": round(timings["decode_wait"], 2)}
            print(json.dumps(row), flush=True)
            results.append(row)
        return results
    finally:
        if tmp:
            tmp.cleanup()


if __name__ == "__main__":
    main()
