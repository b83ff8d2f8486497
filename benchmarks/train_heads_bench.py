"""Benchmark `train_heads` at MSP-Podcast scale: wall time, time per epoch, peak memory, final CCC.

    python benchmarks/train_heads_bench.py                      # 116,000 rows, 50 epochs
    python benchmarks/train_heads_bench.py --rows 20000 --epochs 5   # a quick look
    python benchmarks/train_heads_bench.py --rows 20000 --epochs 5 --precision bf16 --profile 200

Builds, in a temporary directory, three float16 stores shaped like the paper's inputs (Whisper
large-v3 1280 dims, RoBERTa-large 1024, x-vector 512) over `--rows` utterances split like
MSP-Podcast v1.12 (Train 72.5% / Development 27.5%, speaker-disjoint), with emotion classes as
imbalanced as the corpus's and attribute labels the features carry (plus noise, so the CCC is
not 1). Then it trains heads with the paper's defaults (undersampling, 50 epochs) and reports.

By default the x-vector store is an input ("+ S Emb", speaker head off); `--speaker-weight 0.1`
benchmarks the speaker head instead, which keeps the x-vector store out of the input.
Target (issue 3): under 60 s and 2 GB on 2 CPU cores.

`--frames` benchmarks frame heads (MMWhisper): a Whisper large-v3 frame store instead of the
pooled one — every row its own number of 1280-d frames, 275 on average (MSP-Podcast's 5.5-s
mean clip at 50 frames/s), between 138 and 550 (2.75-11 s), in a store padded to Whisper's 750
positions — beside the RoBERTa-large store, through a ConvPool. A subset of rows is enough on a
CPU (`--rows 2000`); `--memory-budget GB` makes train-heads stream the frames.
Target (frame heads): 50 epochs at MSP-Podcast scale under 5 minutes on one H100.

`--compare` (issue 11) trains twice in one process on the same data, `--precision fp32` then
`--precision bf16`, after an untimed one-epoch run in each (it takes the process's one-time costs
off the fp32 figures; `--no-warmup` skips it). In the same process, on the threads the training
uses, it measures the matrix-product rate of both dtypes (ser_cache.train.peaks.matmul_tflops: best of
`--peak-trials` 5 timings after warm-up, before and after the timed runs) at `--peak-size` 2048³
and at the heads' fused first layer, rows × in_dim × sum of the first layers' widths (from the
heads the runs built), for the training batch (64) and the evaluation batch (4096; 64 with
frames), and at one head's first layer for the training batch (what a CPU runs below
heads.FUSE_MIN_ROWS_CPU rows). It counts an epoch's FLOPs from the model's Linear/Conv1d layers
(2·k·n per row each; training: 3 × forward over the epoch's rows, plus the AAM product with the
speaker head; "executed": without the input gradient backward skips for layers fed by the data;
Development scoring: forward over the Development rows) and prints one table: per precision the
peaks, wall, median seconds per epoch (training part, Development scoring part), achieved TFLOP/s
and utilisation (achieved / measured peak of the same dtype, at the training shape and at
2048³), peak memory and Development mean CCC; and bf16 against fp32: speed-ups (fp32 time / bf16
time), peak ratios (bf16 / fp32), the CCC difference against the issue's |Δ mean CCC| ≤ 0.005.
`--json PATH` writes the same figures (and the table). Not with `--precision`.

    python benchmarks/train_heads_bench.py --compare --rows 20000 --epochs 5 --keep /tmp/benchdata
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# name, kind, dims, how strongly it carries (arousal, valence, dominance, gender)
STORES = (
    ("whisper-large-v3", "whisper", 1280, (1.0, 0.3, 0.6, 1.0)),
    ("roberta-large", "text", 1024, (0.3, 1.0, 0.2, 0.0)),
    ("wavlm-base-plus-sv", "xvector", 512, (0.2, 0.0, 0.2, 1.0)),
)
# MSP-Podcast-like imbalance: Neutral and No-agreement large, Fear and Disgust rare.
EMOTIONS = {  # share, (arousal, valence, dominance) centre
    "N": (0.33, (4.0, 4.1, 4.0)), "H": (0.18, (4.9, 5.6, 4.6)), "X": (0.13, (4.2, 3.9, 4.1)),
    "A": (0.08, (5.6, 2.5, 5.3)), "S": (0.07, (3.0, 2.7, 3.3)), "C": (0.06, (4.1, 3.0, 4.8)),
    "O": (0.06, (4.2, 4.0, 4.0)), "U": (0.05, (5.1, 4.6, 4.2)), "D": (0.025, (4.3, 2.6, 4.5)),
    "F": (0.015, (4.9, 2.8, 3.1)),
}
FRAME_STORE = "whisper-large-v3-frames"  # replaces the pooled Whisper store with --frames
WHISPER_POSITIONS = 750  # a 15-s window's encoder positions: a frame store's T
FRAMES_PER_SECOND = 50
DEV_SHARE = 0.275  # MSP-Podcast v1.12: ~84k Train, ~32k Development
ROWS_PER_SPEAKER = 60
PERCEPTION_NOISE = 0.6  # std (label units) of what the features see beyond the label


def peak_rss_mb() -> float:
    """Peak RSS of the process (since `reset_peak_rss`, where that worked)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def rss_mb() -> float:
    """The process's RSS now (0 where /proc is not there)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def reset_peak_rss() -> bool:
    """Start the peak RSS afresh (Linux: /proc/self/clear_refs 5), so a second run in the process
    gets its own peak; False where the kernel does not allow it (the peak is then the process's)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def store_names(frames: bool) -> list[str]:
    """The inputs of a run: the three pooled stores, or (--frames, MMWhisper) Whisper frames + RoBERTa."""
    if frames:
        return [FRAME_STORE, STORES[1][0]]
    return [name for name, *_ in STORES]


def reuse(root: Path, rows: int, seed: int, frames: bool = False) -> tuple[Path | None, list[Path] | None]:
    """The corpus and stores a previous `--keep` run built with the same rows, seed and mode, if any."""
    marker = root / "built.json"
    if not marker.is_file() or json.loads(marker.read_text()) != {"rows": rows, "seed": seed, "frames": frames}:
        return None, None
    return root / "corpus", [root / f"{name}.zarr" for name in store_names(frames)]


def frame_counts(rows: int, rng: np.random.Generator) -> np.ndarray:
    """Frames per clip: 2.75-11 s at 50 frames/s, right-skewed like MSP-Podcast's durations, mean ~275."""
    seconds = np.clip(rng.gamma(shape=6.0, scale=5.5 / 6.0, size=rows), 2.75, 11.0)
    return np.round(seconds * FRAMES_PER_SECOND).astype(np.int64)


def build(root: Path, rows: int, seed: int, frames: bool = False) -> tuple[Path, list[Path]]:
    """Write the label file and the stores; generated chunk by chunk, so memory stays small."""
    from ser_cache.features.store import FeatureStore

    if root.exists() and any(root.iterdir()):
        raise SystemExit(f"{root}: not empty, and not built by this script with --rows {rows} --seed {seed}"
                         f"{' --frames' if frames else ''}")
    rng = np.random.default_rng(seed)
    codes = list(EMOTIONS)
    share = np.array([EMOTIONS[c][0] for c in codes])
    emo = rng.choice(len(codes), size=rows, p=share / share.sum())
    centres = np.array([EMOTIONS[c][1] for c in codes])[emo]
    avd = np.clip(np.round(centres + rng.normal(0, 0.9, (rows, 3)), 1), 1.0, 7.0)
    speaker = rng.integers(0, max(2, rows // ROWS_PER_SPEAKER), rows)
    n_speakers = int(speaker.max()) + 1
    male = rng.random(n_speakers) < 0.5
    dev_speakers = rng.random(n_speakers) < DEV_SHARE
    ids = [f"MSP-PODCAST_{s:04d}_{i:06d}.wav" for i, s in enumerate(speaker)]
    corpus = root / "corpus"
    (corpus / "Labels").mkdir(parents=True)
    # The MSP-Podcast layout lists the turns' audio in Audios/; the features are made up, so empty
    # files stand in for it (load_corpus checks that each listed turn has one, never reads them).
    (corpus / "Audios").mkdir()
    for name in ids:
        (corpus / "Audios" / name).touch()
    with open(corpus / "Labels" / "labels_consensus.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["FileName", "EmoClass", "EmoAct", "EmoVal", "EmoDom", "SpkrID", "Gender", "Split_Set"])
        for i in range(rows):
            s = speaker[i]
            w.writerow([ids[i], codes[emo[i]], *(f"{x:.1f}" for x in avd[i]),
                        "Unknown" if s % 25 == 0 else str(s), "Male" if male[s] else "Female",
                        "Development" if dev_speakers[s] else "Train"])

    # What the features see: the standardised labels plus perception noise, and the gender.
    latent = np.column_stack([(avd - 4.0) / 1.2 + rng.normal(0, PERCEPTION_NOISE, (rows, 3)),
                              np.where(male[speaker], 1.0, -1.0)]).astype(np.float32)
    stores = []
    for name, kind, dims, strength in STORES:
        directions = rng.normal(0, 1, (4, dims)).astype(np.float32) * np.array(strength, np.float32)[:, None]
        directions *= 0.15  # per-dimension signal well under the unit noise: the heads must pool many dims
        voice = rng.normal(0, 0.3, (n_speakers, dims)).astype(np.float32)  # speaker identity
        if frames and kind == "whisper":
            stores.append(_build_frames(root, ids, latent, directions, rng, seed))
            continue
        if frames and kind == "xvector":
            continue  # MMWhisper: Whisper frames + RoBERTa
        store = FeatureStore.create(root / f"{name}.zarr", ids, (dims,),
                                    {"name": name, "kind": kind, "model_id": f"synthetic/{name}",
                                     "modality": "text" if kind == "text" else "audio",
                                     "fingerprint": f"bench-{name}-{seed}", "settings": {"synthetic": True}})
        for c in range(store.n_chunks):
            start, end = store.chunk_bounds(c)
            x = rng.standard_normal((end - start, dims), dtype=np.float32)
            x += latent[start:end] @ directions
            if kind == "xvector":
                x += voice[speaker[start:end]]
            n = end - start
            store.write_chunk(c, x.astype(np.float16), np.ones(n, bool), np.zeros(n, bool))
        stores.append(store.path)
    (root / "built.json").write_text(json.dumps({"rows": rows, "seed": seed, "frames": frames}))
    return corpus, stores


def _build_frames(root: Path, ids: list[str], latent: np.ndarray, directions: np.ndarray,
                  rng: np.random.Generator, seed: int) -> Path:
    """A Whisper large-v3 frame store: each frame is noise plus its clip's signal, as the pooled store's rows."""
    from ser_cache.features.store import FeatureStore

    dims = directions.shape[1]
    counts = frame_counts(len(ids), rng)
    settings = {"synthetic": True, "pooling": "frames"}
    store = FeatureStore.create(root / f"{FRAME_STORE}.zarr", ids, (WHISPER_POSITIONS, dims),
                                {"name": FRAME_STORE, "kind": "whisper", "model_id": f"synthetic/{FRAME_STORE}",
                                 "modality": "audio", "pooling": "frames", "fingerprint": f"bench-frames-{seed}",
                                 "settings": settings}, frames=True)
    for c in range(store.n_chunks):
        start, end = store.chunk_bounds(c)
        n, longest = end - start, int(counts[start:end].max())
        x = np.zeros((n, WHISPER_POSITIONS, dims), dtype=np.float16)
        x[:, :longest] = rng.standard_normal((n, longest, dims), dtype=np.float32) + \
            (latent[start:end] @ directions)[:, None, :]
        store.write_chunk(c, x, np.ones(n, bool), np.zeros(n, bool), frames=counts[start:end])
    return store.path


def profile_steps(cfg, steps: int, top: int = 12) -> dict:
    """Where a training step's time goes: `steps` steps of fit.py's loop for one job (stack_of one
    model, its AdamW, the same batch and loss calls) on the run's data, under torch.profiler, split
    into data gather, forward, loss, backward and optimizer; plus the top ops."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from ser_cache.infra import runtime
    from ser_cache.system import setup
    from ser_cache.system.inputs import index_tensor
    from ser_cache.train import fit, recipe
    from ser_cache.train.stack import stack_of

    with runtime.torch_threads(cfg.threads):
        device = runtime.resolve_device(cfg.device)
        data = recipe.load_training_data(cfg)
        data.place(device)
        run = setup.set_up(cfg, data, device)
        stack = stack_of([run.model], [run.aam])
        optimizer = stack.optimizer([cfg.lr], [cfg.weight_decay], fused=runtime.fused_adamw_ok(device))
        targets = {"avd": torch.from_numpy(data.avd).to(device), "gender": torch.from_numpy(run.genders).to(device),
                   "speaker": torch.from_numpy(run.speakers).to(device)}
        rng = np.random.default_rng(0)
        phases = ("gather", "forward", "loss", "backward", "optimizer")
        speaker_loss = (lambda e, lab: stack.speaker_loss(0, e, lab)) if run.aam is not None else None

        def step():
            idx = rng.choice(run.train_idx, cfg.batch_size, replace=False)
            with record_function("gather"):
                rows = index_tensor(idx, device)
                batch = fit.stacked(data.batch(rows, idx), 1, device)
                target = {k: v[rows] for k, v in targets.items()}
            with record_function("forward"):
                out = stack.forward(batch)
            with record_function("loss"):
                loss, _ = setup.batch_loss({k: v[0] for k, v in out.items()}, target, speaker_loss,
                                              gender_weight=cfg.gender_weight, speaker_weight=cfg.speaker_weight,
                                              tensors=True)
            with record_function("backward"):
                optimizer.zero_grad()
                loss.backward()
            with record_function("optimizer"):
                optimizer.step()

        for _ in range(10):  # warm-up
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
    events = prof.key_averages()
    total = sum(e.cpu_time_total for e in events if e.key in phases)
    split = {e.key: round(e.cpu_time_total / steps / 1000, 3) for e in events if e.key in phases}
    table = events.table(sort_by="self_cpu_time_total", row_limit=top)
    print(table, file=sys.stderr)
    return {"steps": steps, "ms_per_step": round(total / steps / 1000, 3), "ms_per_phase": split,
            "top_self_cpu": [(e.key, round(e.self_cpu_time_total / steps / 1000, 3)) for e in
                             sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]]}


def run_figures(args, cfg, stores: list[Path]) -> dict:
    """Train once with `cfg` and return the figures of the run (the single-run JSON)."""
    import torch

    from ser_cache.features.store import FeatureStore
    from ser_cache.infra.runtime import resolve_device
    from ser_cache.train.recipe import train_heads

    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t, cpu = time.perf_counter(), cpu_seconds()
    result = train_heads(cfg)
    wall, cpu = time.perf_counter() - t, cpu_seconds() - cpu
    epoch_s = [float(r["seconds"]) for r in result.history]
    eval_s = [float(r["eval_seconds"]) for r in result.history]
    config = json.loads((result.run_dir / "config.json").read_text())
    train_s = float(np.median(np.subtract(epoch_s, eval_s)))
    figures = {
        "rows": args.rows,
        "train_rows": config["data"]["train_rows"],
        "dev_rows": config["data"]["dev_rows"],
        "rows_per_epoch": config["data"]["rows_per_epoch"],
        "inputs": {i["name"]: i["feature_shape"] for i in config["inputs"]},
        "epochs": args.epochs,
        "undersample": not args.no_undersample,
        "speaker_weight": args.speaker_weight,
        "batch_size": cfg.batch_size,
        "device": args.device,
        "precision": cfg.precision,
        "compute_dtype": config["train"]["compute_dtype"],
        "torch_threads": cfg.threads or torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "train_wall_seconds": round(wall, 1),
        "train_cpu_seconds": round(cpu, 1),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "load_and_write_seconds": round(wall - sum(epoch_s), 1),
        "epoch_seconds_mean": round(float(np.mean(epoch_s)), 3),
        "epoch_seconds_median": round(float(np.median(epoch_s)), 3),
        "epoch_seconds": [round(x, 2) for x in epoch_s],
        "train_seconds_median": round(train_s, 3),
        "eval_seconds_median": round(float(np.median(eval_s)), 3),
        "train_rows_per_second": round(config["data"]["rows_per_epoch"] / train_s, 1),
        "dev_rows_per_second": round(config["data"]["dev_rows"] / float(np.median(eval_s)), 1),
        "peak_rss_mb": round(peak_rss_mb()),
        "best_epoch": result.best_epoch,
        "dev_ccc": {k: round(v, 4) for k, v in result.metrics["ccc"].items()},
        "dev_balanced_ccc": {k: round(v, 4) for k, v in (result.metrics.get("balanced_ccc") or {}).items()},
    }
    if device.type == "cuda":
        figures["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
    if args.profile:
        figures["profile"] = profile_steps(cfg, args.profile)
    if args.frames:
        counts = FeatureStore.open(stores[0]).frame_counts()
        figures.update(frames_mean=round(float(counts.mean()), 1), frames_min=int(counts.min()),
                       frames_max=int(counts.max()), frame_inputs=config["frame_inputs"],
                       memory=config.get("memory"))
    # Not in the JSON, for --compare: the run's config and the unrounded times and CCC.
    figures["_config"] = config
    figures["_exact"] = {"wall_s": wall, "epoch_s": float(np.median(epoch_s)), "train_s": train_s,
                         "eval_s": float(np.median(eval_s)), "mean_ccc": float(result.metrics["ccc"]["mean"])}
    return figures


def cpu_name() -> str:
    """The CPU's model name and whether it multiplies bf16 natively (AMX / AVX512-BF16 flags)."""
    from ser_cache.infra.runtime import NATIVE_BF16_FLAGS

    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        return platform.processor() or "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    native = sorted(flags & set(NATIVE_BF16_FLAGS))
    return (f"{name}, {os.cpu_count()} CPUs; bf16 "
            f"{'native (' + ', '.join(native) + ')' if native else 'emulated (no avx512_bf16 / amx_bf16)'}")


def measure_peaks(model, cfg, device, square: int, trials: int) -> tuple[dict, dict]:
    """Matmul TFLOP/s of fp32 and bf16 at `peaks.peak_shapes` of `model`, on the training's threads."""
    import torch

    from ser_cache.infra import runtime
    from ser_cache.system import scoring
    from ser_cache.train import peaks

    shapes = peaks.peak_shapes(model, cfg.batch_size, scoring.eval_batch_size(model), square=square)
    measured = {}
    with runtime.torch_threads(cfg.threads):
        for name in peaks.PRECISIONS:
            dtype = runtime.precision_dtype(name) or torch.float32
            measured[name] = {shape: peaks.matmul_tflops(*mkn, dtype, device, trials=trials)
                              for shape, mkn in shapes.items()}
    return shapes, measured


def epoch_flops(config: dict, frames_mean: dict[str, float] | None = None) -> tuple[dict, list]:
    """FLOPs of one epoch of the run described by `config` (a run's config.json), counted on the model
    rebuilt from it: training (3 × forward; executed) over rows_per_epoch rows, including the speaker
    head's AAM product when it is on, and Development scoring (forward) over dev_rows rows."""
    from ser_cache.system.model import FeatureModel
    from ser_cache.train import peaks

    model = FeatureModel.from_config(config["heads"], config.get("frame_inputs") or None)
    prods = peaks.products(model, frames_mean)
    train_prods = list(prods)
    if config.get("n_speakers"):
        train_prods.append(peaks.Product("aam", config["heads"]["speaker_embedding_dim"], config["n_speakers"]))
    rows, dev = config["data"]["rows_per_epoch"], config["data"]["dev_rows"]
    flops = {"train": peaks.train_flops(train_prods, rows), "executed": peaks.executed_train_flops(train_prods, rows),
             "eval": peaks.forward_flops(prods, dev)}
    return flops, [vars(x) for x in train_prods]


def compare_precisions(args, base_cfg, stores: list[Path], root: Path) -> dict:
    """fp32 then bf16 on the same data, the matmul peaks, the FLOPs; prints the table, returns the figures."""
    import dataclasses

    import torch

    from ser_cache.features.store import FeatureStore
    from ser_cache.infra.runtime import resolve_device
    from ser_cache.system.model import FeatureModel
    from ser_cache.train import peaks
    from ser_cache.train.recipe import train_heads

    # One epoch in each precision first, not timed: the first run in a process pays one-time costs
    # (imports in scoring and writing, kernel set-up) that would otherwise all land on fp32.
    device = resolve_device(args.device)

    def peaks_of(run_dir: Path) -> tuple[dict, dict]:
        config = json.loads((run_dir / "config.json").read_text())
        model = FeatureModel.from_config(config["heads"], config.get("frame_inputs") or None)
        return measure_peaks(model, base_cfg, device, args.peak_size, args.peak_trials)

    warmup_s, peak_s, peak_sets = 0.0, 0.0, []
    if args.warmup:
        t = time.perf_counter()
        for precision in peaks.PRECISIONS:
            train_heads(dataclasses.replace(base_cfg, precision=precision, epochs=1, out=root / "run-warmup"))
        warmup_s = time.perf_counter() - t
        # The peaks before the timed runs (on the warm-up's heads: the same shapes) and after them.
        t = time.perf_counter()
        peak_sets.append(peaks_of(root / "run-warmup")[1])
        peak_s += time.perf_counter() - t
    runs = {}
    for precision in peaks.PRECISIONS:
        cfg = dataclasses.replace(base_cfg, precision=precision, out=root / f"run-{precision}")
        reset = reset_peak_rss()
        at_start = rss_mb()
        figures = run_figures(args, cfg, stores)
        figures.update(peak_rss_reset=reset, rss_mb_at_start=round(at_start))
        runs[precision] = figures
        print(f"{precision}: {figures['train_wall_seconds']} s, {figures['epoch_seconds_median']} s/epoch, "
              f"Development mean CCC {figures['dev_ccc']['mean']:.4f}", file=sys.stderr)
    config = runs["fp32"]["_config"]
    t = time.perf_counter()
    shapes, after = peaks_of(root / "run-fp32")
    peak_s += time.perf_counter() - t
    peak_sets.append(after)
    # Best of before and after: a peak is what the hardware can do; the spread is in the JSON.
    peak = {p: {name: max(s[p][name] for s in peak_sets) for name in shapes} for p in peaks.PRECISIONS}
    frames_mean = None
    if args.frames:
        frames_mean = {FRAME_STORE: float(FeatureStore.open(stores[0]).frame_counts().mean())}
    flops, counted = epoch_flops(config, frames_mean)

    exact = {p: {**runs[p]["_exact"], "peak_mb": runs[p].get("peak_gpu_memory_mb", runs[p]["peak_rss_mb"])}
             for p in peaks.PRECISIONS}
    result = peaks.compare(exact, peak, flops)
    table = peaks.format_table(exact, peak, shapes, flops, result)
    head = (f"train_heads, fp32 vs bf16: {config['data']['train_rows']:,} training rows "
            f"({config['data']['rows_per_epoch']:,} per epoch), {config['data']['dev_rows']:,} Development rows, "
            f"{args.epochs} epochs, batch {base_cfg.batch_size}, {device}, {runs['fp32']['torch_threads']} torch "
            "threads\n"
            f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else cpu_name()}; torch "
            f"{torch.__version__}; "
            f"peaks: best of {args.peak_trials} timings "
            f"{'before and after the timed runs' if args.warmup else 'after the runs'}"
            f" ({peak_s:.1f} s); "
            f"{'warm-up (1 epoch each, untimed) ' + format(warmup_s, '.1f') + ' s' if args.warmup else 'no warm-up'}; "
            f"load average {os.getloadavg()[0]:.2f}\n"
            "memory: " + ("peak GPU memory allocated" if device.type == "cuda" else
                          "peak RSS during each run (RSS at its start, " +
                          " / ".join(f"{r['rss_mb_at_start']} MB" for r in runs.values()) + ", included)"
                          if all(r["peak_rss_reset"] for r in runs.values())
                          else "peak RSS of the process so far (could not be reset between runs)"))
    print(head + "\n\n" + table)

    def rounded(d: dict) -> dict:  # 4 significant digits; NaN (nothing to divide by) as null
        return {k: (None if np.isnan(v) else float(f"{v:.4g}")) if isinstance(v, float) else v for k, v in d.items()}

    for r in runs.values():
        r.pop("_config")
        r.pop("_exact")
    return {
        "mode": "compare",
        "hardware": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "runs": runs,
        "peak_shapes": {k: list(v) for k, v in shapes.items()},
        "peak_tflops": {p: rounded(v) for p, v in peak.items()},
        "peak_tflops_measurements": [{p: rounded(v) for p, v in m.items()} for m in peak_sets],
        "peak_seconds": round(peak_s, 1),
        "warmup_seconds": round(warmup_s, 1) if args.warmup else None,
        "flops_per_epoch": {k: round(v) for k, v in flops.items()},
        "flops_counted": {"products": counted, "rule": "2·k·n per row for every Linear(k, n) and 1×1 Conv1d (per "
                          "valid frame); training = 3 × forward, executed = forward + weight gradient + input "
                          "gradient only where backward computes it; Development scoring = forward; bias, "
                          "activations, loss and optimizer not counted"},
        "per_precision": {p: rounded(v) for p, v in result["per_precision"].items()},
        "ratios": rounded(result["ratios"]),
        "ccc_delta": float(f"{result['ccc_delta']:.4g}"),
        "ccc_target": result["ccc_target"],
        "ccc_target_met": result["ccc_target_met"],
        "table": table,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=116_000, help="utterances in all (Train + Development)")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--no-undersample", action="store_true", help="train on every row each epoch")
    p.add_argument("--speaker-weight", type=float, default=0.0,
                   help="0: x-vectors as input (+ S Emb); >0: speaker head on, x-vectors kept out of the input")
    p.add_argument("--batch-size", type=int, default=None, help="default: train_heads' own")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu (the target's setting), cuda, auto")
    p.add_argument("--threads", type=int, default=None, help="torch threads for training (default: train_heads' own)")
    p.add_argument("--precision", default=None,
                   help="auto (default), fp32, bf16: of the matrix products (train-heads --precision)")
    p.add_argument("--compare", action="store_true",
                   help="train fp32 then bf16 in this process, measure both dtypes' matmul peaks, print one table")
    p.add_argument("--peak-size", type=int, default=2048, metavar="N",
                   help="--compare: the square reference product is N³ (default 2048)")
    p.add_argument("--peak-trials", type=int, default=5, metavar="K", help="--compare: best of K timings (default 5)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="--compare: skip the untimed one-epoch run in each precision before the timed runs")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="after training, profile this many training steps (torch.profiler) and print the top ops")
    p.add_argument("--frames", action="store_true",
                   help="frame heads (MMWhisper): Whisper large-v3 frames through a ConvPool + RoBERTa-large")
    p.add_argument("--memory-budget", type=float, default=None,
                   help="GB for the inputs (default: train_heads' own); less than the frames streams them")
    p.add_argument("--conv-dim", type=int, default=None, help="ConvPool width (default: train_heads' own, 256)")
    p.add_argument("--keep", type=Path, default=None,
                   help="build the data in this folder and keep it; reused when it is already there")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.profile and args.frames:
        p.error("--profile profiles pooled-store heads only, not --frames")
    if args.compare and args.precision is not None:
        p.error("--compare runs fp32 and bf16; leave --precision out")
    if args.peak_size < 1 or args.peak_trials < 1:
        p.error("--peak-size and --peak-trials: expected 1 or more")

    from ser_cache.train.options import TrainHeadsConfig

    tmp = None
    if args.keep is None:
        tmp = tempfile.TemporaryDirectory(prefix="ser-cache-bench-")
        root = Path(tmp.name)
    else:
        root = args.keep
    try:
        t = time.perf_counter()
        corpus, stores = reuse(root, args.rows, args.seed, args.frames) if args.keep else (None, None)
        if corpus is None:
            corpus, stores = build(root, args.rows, args.seed, args.frames)
        build_s = time.perf_counter() - t
        rss_after_build = peak_rss_mb()
        print(f"built {args.rows:,} rows of {', '.join(store_names(args.frames))} in {build_s:.1f} s "
              f"(peak RSS so far {rss_after_build:.0f} MB)", file=sys.stderr)

        extra = {} if args.batch_size is None else {"batch_size": args.batch_size}
        if args.threads is not None:
            extra["threads"] = args.threads
        if args.memory_budget is not None:
            extra["memory_budget_gb"] = args.memory_budget
        if args.conv_dim is not None:
            extra["conv_dim"] = args.conv_dim
        cfg = TrainHeadsConfig(features=tuple(stores), data=corpus, out=root / "run", overwrite=True,
                               epochs=args.epochs, seed=args.seed, undersample=not args.no_undersample,
                               speaker_weight=args.speaker_weight, device=args.device,
                               precision=args.precision or "auto", progress=False, **extra)
        if args.compare:
            figures = compare_precisions(args, cfg, stores, root)
        else:
            figures = run_figures(args, cfg, stores)
            del figures["_config"], figures["_exact"]
            figures["precision"] = args.precision or "auto"
        figures["build_seconds"] = round(build_s, 1)
        figures["peak_rss_mb_after_build"] = round(rss_after_build)
    finally:
        if tmp is not None:
            tmp.cleanup()
    if args.compare:
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2, ensure_ascii=False) + "\n")
        return figures
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    if args.frames:
        verdict = "the frame-heads target (50 epochs, 116,000 rows, < 5 min) is for one H100"
    elif args.rows == 116_000 and args.epochs == 50:
        ok = figures["train_wall_seconds"] < 60 and figures["peak_rss_mb"] < 2048
        verdict = f"target <60 s and <2 GB: {'met' if ok else 'missed'}"
    else:
        verdict = "the target applies to --rows 116000 --epochs 50"
    print(f"train_heads: {figures['train_wall_seconds']} s ({figures['epoch_seconds_mean']} s/epoch, "
          f"{figures['load_and_write_seconds']} s loading and writing), peak RSS {figures['peak_rss_mb']} MB, "
          f"Development mean CCC {figures['dev_ccc']['mean']:.3f}; {verdict}", file=sys.stderr)
    return figures


if __name__ == "__main__":
    main()
