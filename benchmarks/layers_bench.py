"""All-layers pooled extraction against last-layer pooled, for WavLM- and Whisper-shaped encoders.

    python benchmarks/layers_bench.py                          # tiny and base-size models, CPU
    python benchmarks/layers_bench.py --sizes base large --batches 3 --device cuda

The encoder runs once either way; keeping every hidden state adds only the pooling of each one on
the device (L + 1 masked means instead of one) and a larger copy to the host. For each architecture
(random weights, built from its config and saved like a checkpoint) and each choice (`--layers
last`, `--layers all`) the script encodes the same batches of MSP-Podcast-like clips (durations
drawn as `ser-cache bench` draws them, mean 5.5 s) with `Encoder.encode` — the path `extract` takes
— after one warm-up batch, and prints the median seconds per batch, the audio seconds per wall
second and the ratio all/last. Figures: docs/performance.md ("Every layer against the last").
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

SIZES = {
    # name: (WavLM layers, hidden, heads, ffn, conv channels), (Whisper layers, d_model, heads, ffn)
    "tiny": ((2, 32, 2, 64, 16), (2, 32, 2, 64)),
    "base": ((12, 768, 12, 3072, 512), (6, 512, 8, 2048)),  # WavLM Base+; Whisper base
    "large": ((24, 1024, 16, 4096, 512), (32, 1280, 20, 5120)),  # WavLM Large; Whisper large-v3
}


def build(arch: str, size: str, out: Path) -> Path:
    import torch
    from transformers import (
        Wav2Vec2FeatureExtractor,
        WavLMConfig,
        WavLMModel,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForAudioClassification,
    )

    torch.manual_seed(0)
    (wl, wd, wh, wf, wc), (sl, sd, sh, sf) = SIZES[size]
    if arch == "wavlm":
        large = size == "large"
        cfg = WavLMConfig(hidden_size=wd, num_hidden_layers=wl, num_attention_heads=wh, intermediate_size=wf,
                          conv_dim=(wc,) * 7, feat_extract_norm="layer" if large else "group",
                          do_stable_layer_norm=large, num_conv_pos_embeddings=128 if size != "tiny" else 16,
                          num_conv_pos_embedding_groups=16 if size != "tiny" else 2)
        WavLMModel(cfg).save_pretrained(out)
        Wav2Vec2FeatureExtractor(do_normalize=large, return_attention_mask=True).save_pretrained(out)
    else:
        mels = 128 if size == "large" else 80
        cfg = WhisperConfig(num_mel_bins=mels, d_model=sd, encoder_layers=sl, encoder_attention_heads=sh,
                            encoder_ffn_dim=sf, decoder_layers=1, decoder_attention_heads=sh, decoder_ffn_dim=sf,
                            vocab_size=64, max_target_positions=32, pad_token_id=0, bos_token_id=1,
                            eos_token_id=2, decoder_start_token_id=1)
        WhisperForAudioClassification(cfg).save_pretrained(out)
        WhisperFeatureExtractor(feature_size=mels).save_pretrained(out)
    return out


def clips(n: int, seed: int) -> list[np.ndarray]:
    from ser_cache.features.bench import synthetic_durations

    rng = np.random.default_rng(seed)
    return [(0.1 * rng.standard_normal(int(d * 16_000))).astype(np.float32) for d in synthetic_durations(n, seed)]


def measure(path: Path, batches: list[list[np.ndarray]], device: str, window: str | None,
            rounds: int) -> dict[str, dict]:
    """Both choices on the same batches, interleaved (last, all, all, last, ...) so that a machine
    shared with other jobs slows both alike; median seconds per batch of each."""
    import torch

    from ser_cache.encoders import load_encoder

    encoders = {layers: load_encoder(str(path), device=device, precision="fp32", layers=layers, window=window)
                for layers in ("last", "all")}
    for enc in encoders.values():
        enc.encode(batches[0])  # warm-up
    times: dict[str, list[float]] = {layers: [] for layers in encoders}
    for r in range(rounds):
        for b in batches:
            # Which goes first alternates: neither always finds the other's memory and caches warm.
            for layers, enc in (list(encoders.items()) if r % 2 == 0 else list(encoders.items())[::-1]):
                if enc.device.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                enc.encode(b)
                times[layers].append(time.perf_counter() - t)
    audio = sum(len(w) for b in batches for w in b) / 16_000 * rounds
    return {layers: {"feature_shape": list(encoders[layers].feature_shape),
                     "median_s": statistics.median(ts), "audio_per_wall": audio / sum(ts)}
            for layers, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "base"], choices=list(SIZES))
    ap.add_argument("--archs", nargs="+", default=["wavlm", "whisper"], choices=["wavlm", "whisper"])
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="times each batch is encoded by each choice")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    waves = clips(args.batches * args.batch_size, 0)
    batches = [waves[i:i + args.batch_size] for i in range(0, len(waves), args.batch_size)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            for arch in args.archs:
                path = build(arch, size, Path(tmp) / f"{arch}-{size}")
                for window in (("window", "trimmed") if arch == "whisper" else (None,)):
                    m = measure(path, batches, args.device, window, args.rounds)
                    last, every = m["last"], m["all"]
                    row = {"arch": arch, "size": size, "window": window, "last": last, "all": every,
                           "ratio": every["median_s"] / last["median_s"]}
                    rows.append(row)
                    name = f"{arch} {size}" + (f" ({window})" if window else "")
                    print(f"{name:24s} last {last['median_s']:7.3f} s/batch {last['feature_shape']}  "
                          f"all {every['median_s']:7.3f} s/batch {every['feature_shape']}  "
                          f"all/last {row['ratio']:.3f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"device": args.device, "threads": torch.get_num_threads(),
                                         "batch_size": args.batch_size, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
