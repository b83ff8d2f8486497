"""Benchmark fine-tuning WavLM or Whisper (full, LoRA, frozen): throughput (audio-seconds/s), MFU, peak memory.

    python benchmarks/finetune_bench.py                                  # WavLM Large, on CUDA if present
    python benchmarks/finetune_bench.py --encoder whisper --mode lora    # Whisper large-v3 as the authors trained it
    python benchmarks/finetune_bench.py --encoder wavlm --mode frozen    # --freeze-encoder
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
MFU = FLOPs per second / the device's measured dense matmul rate in the precision the steps ran in
(bench.matmul_peak_tflops: bf16 under autocast, fp32 on a CPU without it).

Whisper (`--encoder whisper`, large-v3 from `configs/whisper-large-v3.json`): the model of
`finetune whisper` (system.whisper_finetuned), F = bench.encoder_flops("whisper", config, n, window):
750 positions per clip in the 15-s window whatever its length, the real frames when trimmed; its
two input convolutions count as the frozen front (like WavLM's CNN).
`--mode`: full (3F as above), lora (rank --lora-rank on the feed-forward linears of the upper half,
peft, as `--lora`: the forward F, plus the activation gradients of the layers from the first adapted
one up, (L - first) / L of the transformer's F; the adapters' own weight gradients, 2·r·(in + out)
per frame and target, are left out: < 0.5 % at rank 16), frozen (`--freeze-encoder`: F, no backward
through the encoder at all; it runs under no_grad).
"""

from __future__ import annotations

import argparse
import json
import resource
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


def front_flops(encoder: str, config: dict, n: int, window: str) -> float:
    """The input front: WavLM's CNN feature encoder, or Whisper's two input convolutions."""
    if encoder == "wavlm":
        return cnn_flops(config, n)
    t = 750 if window == "window" else -(-n // 320)
    d, mels = config["d_model"], config["num_mel_bins"]
    return float(2 * 3 * mels * d * 2 * t + 2 * 3 * d * d * t)


def training_flops(config: dict, n: int, freeze_cnn: bool = True, *, encoder: str = "wavlm", mode: str = "full",
                   window: str = "window", first_lora_layer: int = 0) -> float:
    from ser_cache.features.bench import encoder_flops

    total = encoder_flops(encoder, config, n, window) if encoder == "whisper" else encoder_flops("wavlm", config, n)
    front = front_flops(encoder, config, n, window)
    if mode == "frozen":
        return total
    if mode == "lora":
        layers = config["encoder_layers" if encoder == "whisper" else "num_hidden_layers"]
        return total + (total - front) * (layers - first_lora_layer) / layers
    return 3 * (total - front) + (front if freeze_cnn else 3 * front)


def build(config: dict, device, gradient_checkpointing: bool, freeze_cnn: bool, *, encoder: str = "wavlm",
          mode: str = "full", window: str = "window", lora_rank: int = 16):
    """The online model of `finetune wavlm|whisper` with random weights; returns (model, first LoRA layer)."""
    import torch

    from ser_cache.system import lora, online
    from ser_cache.system.heads import MultitaskHeads

    cfg = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "transformers_version")}
    torch.manual_seed(0)
    if encoder == "whisper":
        from transformers import WhisperConfig, WhisperFeatureExtractor
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        from ser_cache.system.whisper_finetuned import AUDIO_INPUT, WhisperEmotionModel

        wc = WhisperConfig(**cfg)
        wc._attn_implementation = "sdpa"
        enc = WhisperEncoder(wc)
        if freeze_cnn:
            enc.conv1.requires_grad_(False)
            enc.conv2.requires_grad_(False)
        filters = torch.from_numpy(WhisperFeatureExtractor(feature_size=wc.num_mel_bins).mel_filters).float()
        heads = MultitaskHeads({AUDIO_INPUT: (256,)}, label_min=[1, 1, 1], label_max=[7, 7, 7], n_genders=2)
        model = WhisperEmotionModel(enc, heads, filters, window=window)
        n_layers = wc.encoder_layers
    else:
        from transformers import WavLMConfig, WavLMModel

        from ser_cache.system.finetuned import AUDIO_INPUT, WavLMEmotionModel

        enc = WavLMModel(WavLMConfig(**{**cfg, "layerdrop": 0.0}))
        if freeze_cnn:
            enc.freeze_feature_encoder()
        heads = MultitaskHeads({AUDIO_INPUT: (256,)}, label_min=[1, 1, 1], label_max=[7, 7, 7], n_genders=2)
        model = WavLMEmotionModel(enc, heads)
        n_layers = enc.config.num_hidden_layers
    if gradient_checkpointing:
        enc.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    first = 0
    if mode == "lora":
        spec = lora.lora_spec(encoder, enc, n_layers, rank=lora_rank)
        lora.add_lora(enc, spec)
        first = min(spec["layers"])
    elif mode == "frozen":
        online.freeze_encoder(model)
    model = model.to(device)
    online.freeze_unused(model)
    return model, first


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, help="the encoder's config.json (default: the shipped WavLM Large or "
                                               "Whisper large-v3)")
    p.add_argument("--encoder", default="wavlm", choices=["wavlm", "whisper"])
    p.add_argument("--mode", default="full", choices=["full", "lora", "frozen"])
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--window", default="window", choices=["window", "trimmed"], help="Whisper's input")
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

    default = "whisper-large-v3" if args.encoder == "whisper" else "wavlm-large"
    config = json.loads(args.config.read_text()) if args.config else bench.shipped_config(default)
    device = resolve_device(args.device)
    amp = RuntimeOptions(device=str(device), precision=args.precision).autocast_dtype(device)
    model, first = build(config, device, args.gradient_checkpointing, not args.train_cnn, encoder=args.encoder,
                         mode=args.mode, window=args.window, lora_rank=args.lora_rank)
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
    flops = sum(training_flops(config, int(samples[i]), not args.train_cnn, encoder=args.encoder, mode=args.mode,
                               window=args.window, first_lora_layer=first) for b in timed for i in b)
    # The peak of the precision the steps ran in: bf16 (or fp16) under autocast; fp32 on a CPU without
    # autocast, where a bf16 peak would be an emulated rate the steps never use.
    peak_dtype = amp if amp is not None else torch.float32
    peak = bench.matmul_peak_tflops(device, peak_dtype)
    achieved = flops / wall / 1e12
    report = {
        "device": bench._device_name(device),
        "model": default if args.config is None else str(args.config),
        "encoder": args.encoder,
        "mode": args.mode,
        "trainable_parameters": sum(q.numel() for q in model.parameters() if q.requires_grad),
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
        "matmul_peak_dtype": str(peak_dtype).replace("torch.", ""),
        "matmul_peak_tflops": round(peak, 3),
        "mfu": round(achieved / peak, 4),
        "step_seconds": round(wall / max(len(timed), 1), 3),
        # On a GPU the allocator's peak; on a CPU the process's peak resident memory (model, data and all).
        "peak_memory_gib": round((torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                                  else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30, 2),
        "peak_memory_of": "cuda allocator" if device.type == "cuda" else "process RSS",
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
