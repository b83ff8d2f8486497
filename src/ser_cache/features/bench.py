"""`ser-cache bench extract`: the extraction pipeline on synthetic audio, measured against the hardware.

A full-size architecture is built from a configuration shipped in the package (random weights,
no hub), saved with save_pretrained and loaded back through `extract` exactly as a real model
would be. Synthetic audio with MSP-Podcast-like durations (mean 5.5 s, 1.5–15 s) is written to
WAV files, so decoding is measured too. Reported: utterances/s, audio-seconds/s, model TFLOP/s
and utilisation against a matrix-multiply peak measured in the same run (rates over the encoding
loop, which is what a long extraction runs at; the whole call, model loading included, is
reported beside them), peak GPU memory, where
the time went, the CPU-side decode rate per core, and optionally the naive way (one utterance at
a time, fp32, Whisper padded to 30 s) in the same run.

FLOPs are counted analytically per utterance (a multiply-add is 2 FLOPs) for the computation the
chosen mode defines: the whole 15-s window for Whisper's default, the real frames otherwise.
tests/features/test_bench.py checks the formulas against torch's FlopCounterMode.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from ser_cache.data.audio import SAMPLE_RATE
from ser_cache.infra.atomic import atomic_path

BENCH_MODELS = ("whisper-large-v3", "wavlm-large", "roberta-large", "wavlm-base-plus-sv")
MEAN_SECONDS, MIN_SECONDS, MAX_SECONDS = 5.5, 1.5, 15.0
WORDS = ("the", "a", "day", "was", "really", "quite", "happy", "sad", "angry", "calm", "we", "talked", "about",
         "music", "news", "weather", "today", "yesterday", "never", "always", "good", "bad", "news", "show")


class BenchError(Exception):
    pass


@dataclass(frozen=True)
class BenchConfig:
    model: str = "whisper-large-v3"
    config: Path | None = None  # an architecture config.json instead of a shipped one
    random_init: bool = True
    utterances: int = 2000
    window: str = "window"
    pooling: str = "mean"
    device: str = "auto"
    precision: str = "auto"
    batch_seconds: float = 600.0
    workers: int | None = None
    naive: bool = False
    naive_utterances: int = 32
    seed: int = 0
    workdir: Path | None = None


@dataclass
class BenchReport:
    model: str
    kind: str
    parameters: int
    device: str
    precision: str
    window: str
    utterances: int
    audio_seconds: float
    wall_seconds: float  # the whole `extract` call, model loading included
    setup_seconds: float  # reading the corpus, loading the model onto the device, opening the store
    loop_seconds: float  # the encoding loop: decode, encode, write
    utterances_per_second: float  # over the loop (steady state); the rates below are too
    audio_seconds_per_second: float
    end_to_end_utterances_per_second: float  # over the whole call
    tflop_per_utterance_mean: float
    model_tflops: float  # achieved, useful FLOPs over the loop's wall time
    peak_tflops: float  # measured matmul peak, same device and precision
    utilisation: float
    peak_gpu_memory_gib: float | None
    time_split: dict = field(default_factory=dict)
    cpu_decode_per_core: dict = field(default_factory=dict)
    naive: dict | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


# --------------------------------------------------------------------------- FLOPs


def conv_lengths(n_samples: int, kernels, strides) -> list[int]:
    lengths, t = [], n_samples
    for k, s in zip(kernels, strides):
        t = (t - k) // s + 1
        lengths.append(t)
    return lengths


def transformer_flops(t: int, d: int, ffn: int, layers: int) -> float:
    """Q, K, V, output projections (8·d²), the MLP (4·d·ffn) per position, and attention (4·t²·d) per layer."""
    return layers * (t * (8 * d * d + 4 * d * ffn) + 4 * t * t * d)


def encoder_flops(kind: str, config: dict, n: int, window: str = "window") -> float:
    """FLOPs of one utterance: n = samples (audio) or tokens (text)."""
    if kind == "whisper":
        d, mels = config["d_model"], config["num_mel_bins"]
        t = 750 if window == "window" else math.ceil(n / 320)
        frames = 2 * t
        convs = 2 * 3 * mels * d * frames + 2 * 3 * d * d * t
        return convs + transformer_flops(t, d, config["encoder_ffn_dim"], config["encoder_layers"])
    if kind in ("wavlm", "xvector"):
        d = config["hidden_size"]
        dims = config["conv_dim"]
        lengths = conv_lengths(n, config["conv_kernel"], config["conv_stride"])
        cnn = sum(2 * k * c_in * c_out * t for k, c_in, c_out, t in
                  zip(config["conv_kernel"], [1, *dims[:-1]], dims, lengths))
        t = lengths[-1]
        k, g = config["num_conv_pos_embeddings"], config["num_conv_pos_embedding_groups"]
        extra = 2 * dims[-1] * d * t + 2 * k * (d // g) * d * t  # feature projection, positional conv
        total = cnn + extra + transformer_flops(t, d, config["intermediate_size"], config["num_hidden_layers"])
        if kind == "xvector":
            tdnn_in = [config["tdnn_dim"][0], *config["tdnn_dim"][:-1]]
            tt = t
            total += 2 * d * config["tdnn_dim"][0] * t  # projector
            for kk, dil, c_in, c_out in zip(config["tdnn_kernel"], config["tdnn_dilation"], tdnn_in,
                                            config["tdnn_dim"]):
                tt = tt - dil * (kk - 1)
                total += 2 * kk * c_in * c_out * tt
        return float(total)
    if kind == "text":
        d = config["hidden_size"]
        return float(transformer_flops(n, d, config["intermediate_size"], config["num_hidden_layers"]))
    raise BenchError(f"no FLOP count for kind {kind}")


# --------------------------------------------------------------------------- set-up


def shipped_config(name: str) -> dict:
    if name not in BENCH_MODELS:
        raise BenchError(f"--model {name}: expected one of {', '.join(BENCH_MODELS)} (or --config FILE)")
    return json.loads(resources.files("ser_cache.configs").joinpath(f"{name}.json").read_text())


def build_random_model(config: dict, out: Path, seed: int = 0) -> str:
    """Instantiate the architecture with random weights and save it like a real checkpoint; returns the kind."""
    import torch
    from transformers import (
        AutoConfig,
        AutoModel,
        PreTrainedTokenizerFast,
        Wav2Vec2FeatureExtractor,
        WavLMForXVector,
        WhisperFeatureExtractor,
        WhisperForAudioClassification,
    )

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(**config)
    mt = config["model_type"]
    archs = config.get("architectures") or []
    if mt == "whisper":
        model, kind = WhisperForAudioClassification(cfg), "whisper"  # the encoder alone: no decoder to build
        WhisperFeatureExtractor(feature_size=cfg.num_mel_bins).save_pretrained(out)
    elif mt == "wavlm" and any(a.endswith("ForXVector") for a in archs):
        model, kind = WavLMForXVector(cfg), "xvector"
        Wav2Vec2FeatureExtractor(do_normalize=False, return_attention_mask=True).save_pretrained(out)
    elif mt == "wavlm":
        model, kind = AutoModel.from_config(cfg), "wavlm"
        Wav2Vec2FeatureExtractor(do_normalize=True,
                                 return_attention_mask=cfg.feat_extract_norm == "layer").save_pretrained(out)
    else:
        from tokenizers import Tokenizer, models, pre_tokenizers

        model, kind = AutoModel.from_config(cfg), "text"
        vocab = {"<pad>": cfg.pad_token_id or 0, "<unk>": 3}
        for w in sorted(set(WORDS)):
            vocab.setdefault(w, len(vocab) + 3)
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                model_max_length=512).save_pretrained(out)
    from ser_cache.encoders.base import quiet_loading

    with quiet_loading():
        model.save_pretrained(out)
    return kind


def synthetic_durations(n: int, seed: int) -> np.ndarray:
    """MSP-Podcast-like clip lengths: a gamma distribution with mean 5.5 s, clipped to 1.5–15 s."""
    rng = np.random.default_rng(seed)
    shape = 2.5
    d = rng.gamma(shape, (MEAN_SECONDS - MIN_SECONDS) / shape, size=n) + MIN_SECONDS
    return np.clip(d, MIN_SECONDS, MAX_SECONDS)


def write_corpus(root: Path, durations: np.ndarray, seed: int) -> Path:
    """WAV files (16-bit, 16 kHz) of noisy harmonic tones and a manifest with short transcripts.

    Each file has its own random stream (seed, index), so the files can be written in parallel
    threads (numpy and libsndfile release the GIL) and still be the same every time.
    """
    import soundfile as sf

    (root / "audio").mkdir(parents=True, exist_ok=True)

    def one(i: int) -> str:
        rng = np.random.default_rng([seed, i])
        n = int(durations[i] * SAMPLE_RATE)
        t = np.arange(n) / SAMPLE_RATE
        f0 = rng.uniform(90, 260)
        x = 0.1 * np.sin(2 * np.pi * f0 * t) + 0.02 * rng.standard_normal(n)
        name = f"utt{i:06d}.wav"
        sf.write(str(root / "audio" / name), x.astype(np.float32), SAMPLE_RATE, subtype="PCM_16")
        words = " ".join(rng.choice(WORDS, size=int(rng.integers(5, 30))))
        return f"audio/{name},{name},{words}"

    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        lines = ["path,id,text", *pool.map(one, range(len(durations)))]
    with atomic_path(root / "manifest.csv") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return root / "manifest.csv"


def matmul_peak_tflops(device, dtype, n: int | None = None, iters: int = 10, trials: int = 3) -> float:
    """The device's measured dense matrix-multiply rate: n³ products (2·n³ FLOPs each), best of `trials`.

    Best, not mean: a peak is what the hardware can do, and on a shared machine a mean would
    fold other processes' load into it (and could put the model's own rate above "peak").
    """
    import torch

    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    best = 0.0
    for _ in range(trials):
        t = time.perf_counter()
        for _ in range(iters):
            a @ b
        _sync(device)
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - t) / 1e12)
    return best


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_decode_rate(paths: list[Path], limit: int = 200) -> dict:
    """Decode + mix + resample + crop in this one process: the per-core rate for sizing loaders."""
    from ser_cache.data import audio

    sample = paths[:limit]
    t = time.perf_counter()
    secs = sum(len(audio.load(p)) for p in sample) / SAMPLE_RATE
    dt = time.perf_counter() - t
    return {"utterances_per_second": len(sample) / dt, "audio_seconds_per_second": secs / dt}


# --------------------------------------------------------------------------- the run


def bench_extract(cfg: BenchConfig) -> BenchReport:
    import torch

    from ser_cache.encoders.base import FRAME_KINDS, FRAMES, POOLINGS, RuntimeOptions
    from ser_cache.features.extract import ExtractConfig, extract

    if not cfg.random_init:
        raise BenchError("bench needs --random-init (a full-size architecture with random weights; no hub)")
    if cfg.utterances < 1:
        raise BenchError(f"--utterances {cfg.utterances}: expected 1 or more")
    if cfg.pooling not in POOLINGS:
        raise BenchError(f"--pooling {cfg.pooling}: expected one of {', '.join(POOLINGS)}")
    config = json.loads(Path(cfg.config).read_text()) if cfg.config else shipped_config(cfg.model)
    runtime = RuntimeOptions(device=cfg.device, precision=cfg.precision)
    device = runtime.torch_device()
    autocast = runtime.autocast_dtype(device)
    if cfg.workdir is not None:
        claim_workdir(Path(cfg.workdir))
    tmp = tempfile.TemporaryDirectory(prefix="ser-cache-bench-") if cfg.workdir is None else None
    root = Path(tmp.name) if tmp else Path(cfg.workdir)
    try:
        kind, model_dir, durations, manifest = prepare(root, config, cfg.utterances, cfg.seed)
        if cfg.pooling == FRAMES and kind not in FRAME_KINDS:  # before the minutes of measuring
            raise BenchError(f"--pooling frames: {kind} encoders keep no frames; only {', '.join(FRAME_KINDS)} do")
        paths = sorted((manifest.parent / "audio").glob("*.wav"))
        decode = cpu_decode_rate(paths)
        peak = matmul_peak_tflops(device, autocast or torch.float32)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        shutil.rmtree(root / "out", ignore_errors=True)  # a kept store would make every row "already done"
        result = extract(ExtractConfig(model=str(model_dir), data=manifest, out=root / "out", kind=kind,
                                       window=cfg.window if kind == "whisper" else None, pooling=cfg.pooling,
                                       device=cfg.device,
                                       precision=cfg.precision, batch_seconds=cfg.batch_seconds,
                                       workers=cfg.workers, progress=True, overwrite=True))
        _sync(device)
        counts = _units(kind, manifest, durations, model_dir)
        flops = sum(encoder_flops(kind, config, n, cfg.window) for n in counts)
        params = _parameters(model_dir)
        loop = result.loop_seconds
        naive = _naive(kind, model_dir, paths[: cfg.naive_utterances], device,
                       result.computed / loop) if cfg.naive else None
        return BenchReport(
            model=cfg.config.name if cfg.config else cfg.model, kind=kind, parameters=params,
            device=_device_name(device),
            precision=str(autocast or torch.float32).replace("torch.", ""), window=cfg.window,
            utterances=result.computed, audio_seconds=result.audio_seconds, wall_seconds=result.wall_seconds,
            setup_seconds=result.setup_seconds, loop_seconds=loop,
            utterances_per_second=result.computed / loop, audio_seconds_per_second=result.audio_seconds / loop,
            end_to_end_utterances_per_second=result.computed / result.wall_seconds,
            tflop_per_utterance_mean=flops / len(counts) / 1e12, model_tflops=flops / loop / 1e12,
            peak_tflops=peak, utilisation=flops / loop / 1e12 / peak,
            peak_gpu_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            time_split={k: round(v, 3) for k, v in result.timings.items()},
            cpu_decode_per_core=decode, naive=naive,
        )
    finally:
        if tmp:
            tmp.cleanup()


def prepare(root: Path, config: dict, utterances: int, seed: int) -> tuple[str, Path, np.ndarray, Path]:
    """The random-weight model and the synthetic corpus under `root`, built once and reused.

    Returns (kind, model folder, durations, manifest). The model lives in `model-<digest>`, named
    by its configuration and seed, so one working folder (--workdir) holds every benchmarked
    architecture beside one corpus. Each is marked as built (a small JSON file, written last)
    with what it was built from: a folder is reused only for the same configuration, size and
    seed, and a build that was interrupted is redone rather than trusted.
    """
    model_key = {"config": config, "seed": seed}
    digest = hashlib.sha256(json.dumps(model_key, sort_keys=True).encode()).hexdigest()[:12]
    model_dir = root / f"model-{digest}"
    mark = _built_once(model_dir, model_key, lambda d: {"kind": build_random_model(config, d, seed)})
    durations, manifest = prepare_corpus(root, utterances, seed)
    return mark["kind"], model_dir, durations, manifest


def prepare_corpus(root: Path, utterances: int, seed: int) -> tuple[np.ndarray, Path]:
    """The synthetic corpus in `root/corpus`, written once and reused (see `prepare`): (durations, manifest)."""
    durations = synthetic_durations(utterances, seed)
    corpus = root / "corpus"

    def write(folder: Path) -> dict:
        write_corpus(folder, durations, seed)
        return {}

    _built_once(corpus, {"utterances": utterances, "seed": seed}, write)
    return durations, corpus / "manifest.csv"


BUILT_MARK = "bench-built.json"
WORKDIR_MARK = ".ser-cache-bench"  # marks a --workdir the benchmark made, as demo.MARKER does the demo's


def claim_workdir(root: Path) -> None:
    """Use `root` if it is new, empty or the benchmark's own: it replaces root/out, and root/corpus and
    root/model-* folders that lack its marks, so a folder holding anything else is refused."""
    own = (root / WORKDIR_MARK).is_file() or (root / "corpus" / BUILT_MARK).is_file()  # the latter: before the mark
    if root.is_dir() and any(root.iterdir()) and not own:
        raise BenchError(f"--workdir {root}: not empty and not made by `ser-cache bench extract`; "
                         "give a new or empty folder")
    root.mkdir(parents=True, exist_ok=True)
    (root / WORKDIR_MARK).write_text("made by `ser-cache bench extract`; a rerun replaces out/, and corpus/ and "
                                     "model-*/ when they were built from other settings\n")


def _built_once(folder: Path, key: dict, build) -> dict:
    """The mark of `folder` if it was built from `key`; otherwise empty it, run `build(folder)` and
    mark it (the key plus what `build` returns), the mark written last and atomically."""
    try:
        mark = json.loads((folder / BUILT_MARK).read_text())
        if all(mark.get(k) == v for k, v in key.items()):
            return mark
    except (OSError, json.JSONDecodeError):
        pass
    shutil.rmtree(folder, ignore_errors=True)
    mark = {**key, **build(folder)}
    with atomic_path(folder / BUILT_MARK) as tmp:
        tmp.write_text(json.dumps(mark))
    return mark


def _units(kind: str, manifest: Path, durations: np.ndarray, model_dir: Path) -> list[int]:
    """Per utterance: samples after cropping (audio) or tokens (text)."""
    if kind != "text":
        return [int(min(d, MAX_SECONDS) * SAMPLE_RATE) for d in durations]
    import csv

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    with open(manifest, newline="") as f:
        return [len(tok(r["text"], truncation=True, max_length=512)["input_ids"]) for r in csv.DictReader(f)]


def _parameters(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), "np") as st:
            for k in st.keys():
                total += int(np.prod(st.get_slice(k).get_shape()))
    return total


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _naive(kind: str, model_dir: Path, paths: list[Path], device, ours_rate: float) -> dict:
    """One utterance at a time, fp32, the stock preprocessing (Whisper: padded to 30 s), stock forward.

    Timed like our loop (after loading, after one warm-up utterance), so the speed-up compares
    the two ways of encoding, not model loading.
    """
    import torch

    from ser_cache.data import audio
    from ser_cache.encoders.base import quiet_loading

    if kind == "text":
        return {"skipped": "text encoders have no naive audio path"}
    with quiet_loading():
        run = _naive_forward(kind, model_dir, device)
    waves = [audio.load(p) for p in paths]
    with torch.inference_mode():
        run(waves[0])  # warm-up
        _sync(device)
        t = time.perf_counter()
        for w in waves:
            run(w)
        _sync(device)
    rate = len(waves) / (time.perf_counter() - t)
    return {"utterances": len(waves), "utterances_per_second": rate,
            "speedup": ours_rate / rate if rate else None}


def _naive_forward(kind: str, model_dir: Path, device):
    """The stock model and preprocessing, as a function of one waveform."""
    import torch

    if kind == "whisper":
        from transformers import WhisperFeatureExtractor, WhisperForAudioClassification

        fe = WhisperFeatureExtractor.from_pretrained(model_dir)
        encoder = WhisperForAudioClassification.from_pretrained(model_dir).encoder.to(device).eval()

        def run(x):
            feats = fe(x, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features.to(device)
            return encoder(feats).last_hidden_state.mean(1)

        return run
    from transformers import AutoModel, WavLMForXVector

    model = (WavLMForXVector if kind == "xvector" else AutoModel).from_pretrained(model_dir).to(device).eval()

    def run(x):
        inputs = torch.from_numpy(x)[None].to(device)
        if kind == "xvector":
            return model(inputs).embeddings
        return torch.stack([h.mean(1) for h in model(inputs, output_hidden_states=True).hidden_states], 1)

    return run
