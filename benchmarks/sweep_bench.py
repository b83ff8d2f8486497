"""Benchmark `ser-cache sweep`: K = 1 against K = 10 seeds in the same run, on the same data.

    python benchmarks/sweep_bench.py                           # 116,000 rows, 50 epochs, 1 vs 10 seeds
    python benchmarks/sweep_bench.py --rows 20000 --epochs 5   # a quick look
    python benchmarks/sweep_bench.py --device cuda             # on a GPU

The data are train_heads_bench.py's (three float16 stores shaped like Whisper large-v3, RoBERTa-large
and x-vectors over `--rows` utterances split like MSP-Podcast). The benchmark runs `sweep` with one
seed, then with `--seeds` seeds (members trained together, stack.MemberStack), both in this process,
and reports for each: wall (reading the stores, training, writing every member's run, the summary),
seconds per epoch (the stack's, from the members' history.csv), mean CCC, peak memory; then the
ratio of the K-seed sweep to the one-seed sweep and to K separate one-seed runs.
Targets (issue 11): 10 seeds under 3× one seed on CPU, under 1.5× on a GPU; on an H100-class GPU
the 10-seed sweep of the 116k-row, 50-epoch benchmark under 20 s.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_heads_bench import build, cpu_name, peak_rss_mb, reuse  # noqa: E402


def run_sweep(args, corpus: Path, stores: list[Path], out: Path, seeds: int) -> dict:
    from ser_cache.train.options import TrainHeadsConfig
    from ser_cache.train.sweep import SweepConfig, sweep

    extra = {} if args.threads is None else {"threads": args.threads}
    base = TrainHeadsConfig(features=tuple(stores), data=corpus, out=out, overwrite=True, epochs=args.epochs,
                            seed=args.seed, undersample=not args.no_undersample, speaker_weight=0.0,
                            device=args.device, precision=args.precision, progress=False, **extra)
    shutil.rmtree(out, ignore_errors=True)  # a sweep reuses the members it finds: train them all again
    t = time.perf_counter()
    result = sweep(SweepConfig(base, seeds=seeds, resamples=args.resamples))
    wall = time.perf_counter() - t
    runs = [Path(m["run"]) for m in result.summary["variants"]["base"]["members"]]
    with open(runs[0] / "history.csv", newline="") as f:
        epoch_seconds = [float(r["seconds"]) for r in csv.DictReader(f)]
    mean = result.summary["variants"]["base"]["mean"]
    return {"seeds": seeds, "wall_s": round(wall, 2), "epoch_s": round(sum(epoch_seconds) / len(epoch_seconds), 3),
            "train_s": round(sum(epoch_seconds), 2), "ccc_mean": round(mean["ccc_mean"], 4),
            "ccc_std": result.summary["variants"]["base"]["std"]["ccc_mean"], "peak_rss_mb": round(peak_rss_mb())}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=116_000)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--seeds", type=int, default=10, help="K of the K-seed sweep (default 10)")
    p.add_argument("--no-undersample", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--keep", type=Path, default=None, help="build the data here and keep it (reused when there)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.seeds < 2:
        p.error("--seeds: expected 2 or more (it is compared with one seed)")

    tmp = None
    root = args.keep
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="ser-cache-sweep-bench-")
        root = Path(tmp.name)
    try:
        corpus, stores = reuse(root, args.rows, args.seed) if args.keep else (None, None)
        if corpus is None:
            corpus, stores = build(root, args.rows, args.seed)
        one = run_sweep(args, corpus, stores, root / "sweep-1", 1)
        many = run_sweep(args, corpus, stores, root / f"sweep-{args.seeds}", args.seeds)
    finally:
        if tmp is not None:
            tmp.cleanup()
    figures = {"cpu": cpu_name(), "device": args.device, "rows": args.rows, "epochs": args.epochs,
               "command": "python benchmarks/sweep_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "one_seed": one, "k_seeds": many,
               "ratio_wall": round(many["wall_s"] / one["wall_s"], 2),
               "ratio_epoch": round(many["epoch_s"] / one["epoch_s"], 2),
               "ratio_wall_vs_k_separate": round(many["wall_s"] / (args.seeds * one["wall_s"]), 3)}
    print(f"{figures['cpu']} · device {args.device} · {args.rows:,} rows × {args.epochs} epochs")
    print(f"{'':>10} {'wall s':>8} {'s/epoch':>8} {'train s':>8} {'mean CCC':>9} {'std':>7} {'peak MB':>8}")
    for label, r in (("1 seed", one), (f"{args.seeds} seeds", many)):
        std = "—" if r["ccc_std"] is None else f"{r['ccc_std']:.4f}"
        print(f"{label:>10} {r['wall_s']:8.1f} {r['epoch_s']:8.3f} {r['train_s']:8.1f} {r['ccc_mean']:9.4f} {std:>7} "
              f"{r['peak_rss_mb']:8.0f}")
    print(f"{args.seeds} seeds / 1 seed: wall {figures['ratio_wall']}×, per epoch {figures['ratio_epoch']}× "
          f"(target < 3× on CPU, < 1.5× on a GPU); against {args.seeds} separate runs "
          f"{figures['ratio_wall_vs_k_separate']:.2f}× the time")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
