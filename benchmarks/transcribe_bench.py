"""How fast `ser-cache transcribe` turns audio into text: utterances per second and real-time factor.

    python benchmarks/transcribe_bench.py                                   # tiny random Whisper, CPU
    python benchmarks/transcribe_bench.py --random-init --config whisper-large-v3 --device cuda \\
        --utterances 640 --max-new-tokens 64                                 # large-v3's architecture, GPU
    python benchmarks/transcribe_bench.py --model /models/whisper-large-v3 --device cuda   # real weights

The clips are `ser-cache bench extract`'s synthetic corpus (16-kHz WAV, MSP-Podcast-like lengths:
mean 5.5 s). The whole command runs (`transcribe` with --all over a manifest): header reads, length
sorting, decoding in a helper thread, log-mel, generation, the journal and the table. A first pass
over a few clips warms the model and is not timed.

With random weights (the tiny model, or --random-init --config NAME|FILE) no clip ever ends on its
own, so the end-of-text token is suppressed and every clip generates exactly --max-new-tokens
tokens, greedily: a fixed amount of work, comparable between machines. A real checkpoint stops
where its text stops, so its figures depend on the audio (synthetic tones give short texts).
Prints one JSON line: utterances, audio seconds, wall seconds, utterances/s, real-time factor
(wall seconds per audio second; below 1 is faster than real time), and the settings.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

TINY = {  # the tests' size: a figure for the pipeline's overhead more than for the model
    "d_model": 32, "encoder_layers": 1, "encoder_attention_heads": 2, "decoder_layers": 1,
    "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "num_mel_bins": 80,
    "max_source_positions": 1500, "max_target_positions": 448, "vocab_size": 300,
    "pad_token_id": 256, "bos_token_id": 256, "eos_token_id": 256, "decoder_start_token_id": 257,
}


def random_transcriber(config: dict, *, seed: int, **options):
    """A WhisperTranscriber over random weights of the architecture `config`, with a tokenizer that
    covers its vocabulary (byte tokens, then numbered fillers; the config's special ids as specials)."""
    import torch
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizer

    from ser_cache.features.transcriber import WhisperTranscriber

    config = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    n = config["vocab_size"]
    eot, sot = config["eos_token_id"], config["decoder_start_token_id"]
    specials = {eot: "<|endoftext|>", sot: "<|startoftranscript|>"}
    alphabet = sorted(ByteLevel.alphabet())
    vocab = {specials.get(i, alphabet[i] if i < len(alphabet) else f"tok{i}"): i for i in range(n)}
    tokenizer = WhisperTokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": [specials[sot]]})
    torch.manual_seed(seed)
    wc = WhisperConfig(**config, begin_suppress_tokens=[eot], suppress_tokens=[eot])
    model = WhisperForConditionalGeneration(wc)
    model.generation_config.suppress_tokens = [eot]  # random weights: every clip runs to max_new_tokens
    model.generation_config.begin_suppress_tokens = [eot]
    filters = WhisperFeatureExtractor(feature_size=config["num_mel_bins"]).mel_filters
    return WhisperTranscriber(model, tokenizer, model_id=f"random-init:{config.get('d_model')}d",
                              revision=f"seed{seed}",
                              filters=filters, **options)


def load_config(name: str) -> dict:
    if name == "tiny":
        return dict(TINY)
    path = Path(name)
    if path.is_file():
        return json.loads(path.read_text())
    from importlib import resources

    try:
        return json.loads(resources.files("ser_cache.configs").joinpath(f"{name}.json").read_text())
    except FileNotFoundError:
        raise SystemExit(f"--config {name}: neither 'tiny', a JSON file, nor a config shipped in "
                         "ser_cache/configs") from None


def main(argv=None) -> dict:
    from ser_cache.features.bench import prepare_corpus
    from ser_cache.features.transcribe import TranscribeConfig, transcribe
    from ser_cache.features.transcriber import WhisperTranscriber

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model",
                   help="a real checkpoint (directory, cached hub id or short name); default: random weights")
    p.add_argument("--random-init", action="store_true",
                   help="random weights of --config (the default without --model)")
    p.add_argument("--config", default="tiny",
                   help="'tiny', a name in ser_cache/configs (whisper-large-v3) or a JSON file")
    p.add_argument("--utterances", type=int, default=200)
    p.add_argument("--warmup", type=int, default=8, help="clips of the untimed first pass")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--beams", type=int, default=1)
    p.add_argument("--batch-seconds", type=float, default=300.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="auto")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--workdir", type=Path, help="keep (and reuse) the synthetic corpus here")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    options = dict(beams=args.beams, max_new_tokens=args.max_new_tokens, device=args.device, precision=args.precision)
    t = time.perf_counter()
    if args.model and not args.random_init:
        transcriber = WhisperTranscriber.load(args.model, **options)
    else:
        transcriber = random_transcriber(load_config(args.config), seed=args.seed, **options)
    setup = time.perf_counter() - t

    tmp = tempfile.TemporaryDirectory(prefix="ser-cache-asr-") if args.workdir is None else None
    root = Path(tmp.name) if tmp else args.workdir
    try:
        durations, manifest = prepare_corpus(root, args.utterances, args.seed)
        cfg = TranscribeConfig(out=root / "warmup.csv", data=manifest, all=True, batch_seconds=args.batch_seconds,
                               overwrite=True, progress=False)
        # Warm up on the shortest clips' manifest rows: a manifest of the first few files.
        lines = manifest.read_text().splitlines()
        warm = root / "corpus" / "warmup.csv"
        warm.write_text("\n".join(lines[: args.warmup + 1]) + "\n")
        transcribe(replace(cfg, data=warm), transcriber=transcriber)
        if transcriber.device.type == "cuda":
            torch.cuda.synchronize()
        r = transcribe(replace(cfg, out=root / "asr.csv"), transcriber=transcriber)
    finally:
        if tmp:
            tmp.cleanup()
    row = {
        "model": args.model if args.model and not args.random_init else f"random-init {args.config}",
        "device": str(transcriber.device), "precision": transcriber.precision, "beams": args.beams,
        "max_new_tokens": transcriber.max_new_tokens, "threads": torch.get_num_threads(),
        "utterances": r.transcribed, "audio_seconds": round(r.audio_seconds, 1),
        "mean_clip_seconds": round(float(durations.mean()), 2), "wall_seconds": round(r.wall_seconds, 2),
        "utterances_per_second": round(r.utterances_per_second, 2), "real_time_factor": round(r.real_time_factor, 5),
        "setup_seconds": round(setup, 1),
    }
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    main()
