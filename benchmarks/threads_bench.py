"""Benchmark `train-heads --threads`: the same training on 1 thread and on more, interleaved.

    python benchmarks/threads_bench.py                                   # 4,000 rows, 10 epochs, 1 vs all cores
    python benchmarks/threads_bench.py --rows 20000 --epochs 5 --threads 1,2 --repeats 5
    python benchmarks/threads_bench.py --frames --rows 600 --epochs 2     # frame heads (MMWhisper)

Builds the data once (train_heads_bench.py's synthetic MSP-Podcast-like stores, in a temporary
folder or `--keep`), then trains `--repeats` rounds; each round trains once per thread count,
the order rotating from round to round, so that a change in the machine's load (other processes
coming and going) falls on every thread count alike instead of on whichever ran last. Per thread
count it reports the median wall time of a run and of an epoch, and against the first thread
count the median of the per-round ratios (each ratio pairs two runs made minutes apart at most).
The 1-minute load average before each run is recorded too: on a shared machine the figures are
only comparable within one invocation.

`all` in --threads stands for every CPU (os.cpu_count()); `default` for torch's own number
(`--threads 0`: torch's intra-op threads, usually the physical cores). Before the timed rounds an
untimed one-epoch run takes the process's one-time costs (imports, first reads) off round 1.
`--json PATH` writes every run's figures.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_heads_bench import build, cpu_name, reuse  # noqa: E402  (the data and CPU name, as that benchmark)


def thread_counts(text: str) -> list[int | None]:
    """"1,all,default" -> [1, os.cpu_count(), None]."""
    out = []
    for part in text.split(","):
        part = part.strip()
        out.append(os.cpu_count() if part == "all" else None if part == "default" else int(part))
    if len(set(out)) != len(out):
        raise SystemExit(f"--threads {text}: a thread count is given twice ({out})")
    return out


def name_of(threads: int | None) -> str:
    if threads is None:
        import torch

        return f"default ({torch.get_num_threads()})"
    return str(threads)


def one_run(cfg) -> dict:
    from ser_cache.train.recipe import train_heads

    load = os.getloadavg()[0]
    t = time.perf_counter()
    result = train_heads(cfg)
    wall = time.perf_counter() - t
    epochs = [float(r["seconds"]) for r in result.history]
    return {"wall_s": wall, "epoch_s": float(np.median(epochs)), "load_1min": load,
            "mean_ccc": float(result.metrics["ccc"]["mean"])}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=4000, help="utterances in all (Train + Development)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--threads", default="1,all", help="thread counts to compare, the first the reference "
                   "(all: every CPU; default: torch's own)")
    p.add_argument("--repeats", type=int, default=5, help="rounds; each trains once per thread count")
    p.add_argument("--frames", action="store_true", help="frame heads: Whisper frames through a ConvPool + RoBERTa")
    p.add_argument("--speaker-weight", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="skip the untimed one-epoch run that takes the process's one-time costs off round 1")
    p.add_argument("--keep", type=Path, default=None, help="build the data here and keep it; reused when there")
    p.add_argument("--json", type=Path, default=None, help="also write every run's figures here")
    args = p.parse_args(argv)
    counts = thread_counts(args.threads)
    if args.repeats < 1 or len(counts) < 2:
        p.error("--repeats 1 or more and at least two --threads to compare")

    from ser_cache.train.options import TrainHeadsConfig

    tmp = tempfile.TemporaryDirectory(prefix="ser-cache-threads-") if args.keep is None else None
    root = Path(tmp.name) if tmp else args.keep
    try:
        corpus, stores = reuse(root, args.rows, args.seed, args.frames) if args.keep else (None, None)
        if corpus is None:
            corpus, stores = build(root, args.rows, args.seed, args.frames)
        def config(threads: int | None, epochs: int):
            return TrainHeadsConfig(features=tuple(stores), data=corpus, out=root / "run", overwrite=True,
                                    epochs=epochs, seed=args.seed, speaker_weight=args.speaker_weight,
                                    device="cpu", progress=False, threads=0 if threads is None else threads)

        if args.warmup:
            one_run(config(counts[0], 1))
        runs: dict[str, list[dict]] = {name_of(n): [] for n in counts}
        for r in range(args.repeats):
            order = counts[r % len(counts):] + counts[:r % len(counts)]
            for n in order:
                figures = one_run(config(n, args.epochs))
                runs[name_of(n)].append(figures)
                print(f"round {r + 1}/{args.repeats}, threads {name_of(n)}: {figures['wall_s']:.2f} s "
                      f"({figures['epoch_s']:.3f} s/epoch, load {figures['load_1min']:.2f})", file=sys.stderr)
    finally:
        if tmp is not None:
            tmp.cleanup()

    reference = name_of(counts[0])
    summary = {}
    for name, done in runs.items():
        walls = np.array([d["wall_s"] for d in done])
        ratios = walls / np.array([d["wall_s"] for d in runs[reference]])
        summary[name] = {"median_wall_s": round(float(np.median(walls)), 2),
                         "min_wall_s": round(float(walls.min()), 2), "max_wall_s": round(float(walls.max()), 2),
                         "median_epoch_s": round(float(np.median([d["epoch_s"] for d in done])), 3),
                         f"median_ratio_to_{reference}": round(float(np.median(ratios)), 2),
                         "mean_ccc": round(float(np.mean([d["mean_ccc"] for d in done])), 4)}
    import torch

    figures = {"cpu": cpu_name(), "torch": torch.__version__, "torch_default_threads": torch.get_num_threads(),
               "rows": args.rows, "epochs": args.epochs, "frames": args.frames, "repeats": args.repeats,
               "load_1min_median": round(float(np.median([d["load_1min"] for d in itertools.chain(*runs.values())])),
                                         2),
               "summary": summary, "runs": runs}
    print(f"{figures['cpu']}; torch {torch.__version__}; {args.rows:,} rows, {args.epochs} epochs"
          f"{', frame heads' if args.frames else ''}; {args.repeats} interleaved rounds; "
          f"median 1-min load {figures['load_1min_median']}")
    print(f"{'threads':>12} {'median s':>9} {'min':>7} {'max':>7} {'s/epoch':>8} {'ratio':>6}")
    for name, s in summary.items():
        print(f"{name:>12} {s['median_wall_s']:>9.2f} {s['min_wall_s']:>7.2f} {s['max_wall_s']:>7.2f} "
              f"{s['median_epoch_s']:>8.3f} {s[f'median_ratio_to_{reference}']:>6.2f}")
    print(f"ratio: the median over rounds of (this run's wall time / threads {reference}'s in the same round)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
