"""Benchmark fine-tuning WavLM: training throughput (audio-seconds/s) and model FLOP utilisation (MFU).

    python benchmarks/finetune_bench.py                                  # WavLM Large, on CUDA if present
    python benchmarks/finetune_bench.py --steps 50 --batch-seconds 320 --precision bf16
    python benchmarks/finetune_bench.py --config tiny.json --steps 3 --device cpu   # a smoke check

WavLM Large is built from its configuration (`src/ser_cache/configs/wavlm-large.json`) with
random weights: no hub, and the speed of random weights is the speed of trained ones. The model is
the one `finetune wavlm` trains (system.finetuned.WavLMEmotionModel: all hidden states weighted,
point-wise convolutions, masked mean pooling, the stage-two heads) and each step is the loop's:
autocast forward, loss of paper Eq. 1, backward, AdamW step. Clips are synthetic audio with
MSP-Podcast-like lengths (bench.synthetic_durations: mean 5.5 s, 1.5-15 s), batched by total
seconds with the loop's length bucketing (data.batching.plan_batches). Audio decoding is not
timed: in training it runs in DataLoader workers, beside the GPU work.

FLOPs of one clip of n samples, counted on its real (unpadded) length:
    3 · (F(n) − F_cnn(n)) + F_cnn(n)     with F = bench.encoder_flops("wavlm", config, n)
The transformer, feature projection and positional convolution run forward (1×) and backward
(2×: gradients of the activations and of the weights). The CNN feature encoder is frozen (the
default): forward only, and no gradient flows into it. Padding, the point-wise convolutions and
the heads (< 0.2 % of the total) are not counted; with --gradient-checkpointing the recomputed
forward is not counted either (MFU counts the model's FLOPs, not the work done to get them).
MFU = FLOPs per second / the device's measured dense bf16 matmul rate (bench.matmul_peak_tflops).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def cnn_flops(config: dict, n: int) -> float:
    """The CNN feature encoder's share of bench.encoder_flops (same formula)."""
    from ser_cache.features.bench import conv_lengths

    dims = config["conv_dim"]
    lengths = conv_lengths(n, config["conv_kernel"], config["conv_stride"])
    return float(sum(2 * k * c_in * c_out * t for k, c_in, c_out, t in
                     zip(config["conv_kernel"], [1, *dims[:-1]], dims, lengths)))


def training_flops(config: dict, n: int, freeze_cnn: bool = True) -> float:
    from ser_cache.features.bench import encoder_flops

    total = encoder_flops("wavlm", config, n)
    cnn = cnn_flops(config, n)
    return 3 * (total - cnn) + (cnn if freeze_cnn else 3 * cnn)


def build(config: dict, device, gradient_checkpointing: bool, freeze_cnn: bool):
    import torch
    from transformers import WavLMConfig, WavLMModel

    from ser_cache.system.finetuned import AUDIO_INPUT, WavLMEmotionModel, freeze_unused
    from ser_cache.system.heads import MultitaskHeads

    cfg = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "transformers_version")}
    torch.manual_seed(0)
    wavlm = WavLMModel(WavLMConfig(**{**cfg, "layerdrop": 0.0}))
    if freeze_cnn:
        wavlm.freeze_feature_encoder()
    if gradient_checkpointing:
        wavlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    heads = MultitaskHeads({AUDIO_INPUT: (256,)}, label_min=[1, 1, 1], label_max=[7, 7, 7], n_genders=2)
    model = WavLMEmotionModel(wavlm, heads).to(device)
    freeze_unused(model)
    return model


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, help="a WavLM config.json (default: the shipped WavLM Large)")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, kernels)")
    p.add_argument("--batch-seconds", type=float, default=160.0, help="audio seconds per batch")
    p.add_argument("--max-seconds", type=float, default=15.0)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--train-cnn", action="store_true", help="train the CNN feature encoder too")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the report here")
    args = p.parse_args(argv)

    import torch

    from ser_cache.data.audio import SAMPLE_RATE
    from ser_cache.data.batching import plan_batches
    from ser_cache.encoders.base import RuntimeOptions
    from ser_cache.features import bench
    from ser_cache.infra.runtime import autocast, resolve_device
    from ser_cache.system.losses import multitask_loss

    config = json.loads(args.config.read_text()) if args.config else bench.shipped_config("wavlm-large")
    device = resolve_device(args.device)
    amp = RuntimeOptions(device=str(device), precision=args.precision).autocast_dtype(device)
    model = build(config, device, args.gradient_checkpointing, not args.train_cnn)
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=5e-5)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)

    steps = args.warmup + args.steps
    rng = np.random.default_rng(args.seed)
    seconds = np.empty(0)
    batches: list[np.ndarray] = []
    while len(batches) < steps:  # enough clips for the steps, batched as the training loop does
        more = bench.synthetic_durations(4096, args.seed + len(seconds))
        seconds = np.minimum(np.concatenate([seconds, more]), args.max_seconds)
        batches = plan_batches(rng.permutation(seconds.size), seconds, args.batch_seconds, rng)
    batches = batches[:steps]
    samples = np.round(seconds * SAMPLE_RATE).astype(np.int64)

    def step(batch):
        lengths = torch.from_numpy(samples[batch])
        t = torch.arange(int(lengths.max()))
        audio = torch.sin(t[None, :] * (0.05 + 0.01 * torch.arange(len(batch)))[:, None])
        audio = (audio * (t[None, :] < lengths[:, None])).to(device, non_blocking=True)
        with autocast(device, amp):
            out = model(audio, lengths.to(device))
        target = torch.rand(len(batch), 3, device=device) * 6 + 1
        loss, _ = multitask_loss(out["avd"], target, gender_logits=out["gender_logits"],
                                 gender_target=torch.randint(0, 2, (len(batch),), device=device))
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    for batch in batches[:args.warmup]:
        step(batch)
    bench._sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for batch in batches[args.warmup:]:
        step(batch)
    bench._sync(device)
    wall = time.perf_counter() - t0

    timed = batches[args.warmup:]
    audio_seconds = float(sum(seconds[b].sum() for b in timed))
    flops = sum(training_flops(config, int(samples[i]), not args.train_cnn) for b in timed for i in b)
    peak = bench.matmul_peak_tflops(device, torch.bfloat16)
    achieved = flops / wall / 1e12
    report = {
        "device": bench._device_name(device),
        "model": "wavlm-large" if args.config is None else str(args.config),
        "precision": str(amp).replace("torch.", "") if amp is not None else "fp32",
        "gradient_checkpointing": args.gradient_checkpointing,
        "cnn": "trained" if args.train_cnn else "frozen",
        "steps": len(timed),
        "clips": int(sum(b.size for b in timed)),
        "batch_seconds": args.batch_seconds,
        "audio_seconds": round(audio_seconds, 1),
        "wall_seconds": round(wall, 3),
        "audio_seconds_per_second": round(audio_seconds / wall, 2),
        "model_tflops_per_second": round(achieved, 4),
        "bf16_matmul_peak_tflops": round(peak, 3),
        "mfu": round(achieved / peak, 4),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
