"""Fine-tuning material shared by the tests: a corpus whose labels follow its audio, a small
`finetune wavlm` configuration, the same as command-line arguments, and a subprocess environment."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from ser_cache.finetune.loop import FinetuneConfig

import factories

SRC = Path(__file__).resolve().parents[1] / "src"


def learnable_corpus(root: Path, n_train: int = 24, n_dev: int = 12, n_test: int = 4, seed: int = 0, *,
                     learnable_classes: bool = False) -> Path:
    """MSP-Podcast layout whose labels follow the pitch of the tone (arousal and dominance up,
    valence down) and whose gender follows it too. Not loudness: WavLM's input normalisation
    erases it. The emotion codes cycle N H S A; with `learnable_classes` they follow the pitch too
    (S, N, A from low to high) and every ninth row is X (no class target)."""
    rng = np.random.default_rng(seed)
    rows = ["FileName,EmoClass,EmoAct,EmoVal,EmoDom,SpkrID,Gender,Split_Set"]
    words = ("an awful sad day", "a plain day", "a wonderful happy day")
    splits = ["Train"] * n_train + ["Development"] * n_dev + ["Test1"] * n_test
    for i, split in enumerate(splits):
        name = f"MSP-PODCAST_{1000 + i // 4:04d}_{i % 4 + 1:04d}.wav"
        level = float(rng.uniform(0, 1))
        factories.write_wav(root / "Audios" / name,
                            factories.tone(float(rng.uniform(0.6, 1.2)), freq=110 + 300 * level, seed=i))
        (root / "Transcripts").mkdir(parents=True, exist_ok=True)
        (root / "Transcripts" / name.replace(".wav", ".txt")).write_text(words[i % 3] + "\n")
        a = np.clip(1 + 6 * level + rng.normal(0, 0.3), 1, 7)
        v = np.clip(6 - 4 * level + rng.normal(0, 0.5), 1, 7)
        d = np.clip(2 + 4 * level + rng.normal(0, 0.5), 1, 7)
        code = ("X" if i % 9 == 8 else "SNA"[min(int(level * 3), 2)]) if learnable_classes else "NHSA"[i % 4]
        rows.append(f"{name},{code},{a:.1f},{v:.1f},{d:.1f},{100 + i % 6},"
                    f"{'Male' if level < 0.5 else 'Female'},{split}")
    (root / "Labels").mkdir(parents=True, exist_ok=True)
    (root / "Labels" / "labels_consensus.csv").write_text("\n".join(rows) + "\n")
    return root


def base_config(corpus: Path, model: Path, out: Path, **changes) -> FinetuneConfig:
    cfg = FinetuneConfig(data=corpus, out=out, model=str(model), epochs=6, lr_encoder=1e-3, lr_heads=1e-3,
                         batch_seconds=6, select="ccc", gender_weight=1.0, device="cpu", threads=1, progress=False)
    return replace(cfg, **changes)


class Stop(Exception):
    """Stands for a crash right after a checkpoint was written."""


def interrupted_run(cfg: FinetuneConfig, after_epoch: int) -> Path:
    """Fine-tune until the checkpoint of `after_epoch` is written, then stop as a crash would."""
    import pytest

    import ser_cache.finetune.loop as ft
    from ser_cache.finetune.loop import finetune_wavlm
    from ser_cache.runs import layout

    save, saves = ft.save_checkpoint, []

    def save_then_stop(*args, **kwargs):
        save(*args, **kwargs)
        saves.append(1)
        if len(saves) == after_epoch:
            raise Stop

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ft, "save_checkpoint", save_then_stop)
        with pytest.raises(Stop):
            finetune_wavlm(cfg)
    assert layout.is_unfinished_run(cfg.out)
    return Path(cfg.out)


def cli_args(cfg: FinetuneConfig) -> list[str]:
    """`cfg` as `finetune wavlm` arguments, or `finetune whisper` ones for a Whisper configuration (with
    its window, LoRA rank and the head sizes, which the Whisper tests set away from the defaults)."""
    if cfg.encoder == "whisper":
        whisper = ["--window", cfg.window or "window", "--lora", str(cfg.lora or 0), "--conv-dim", str(cfg.conv_dim),
                   "--hidden", str(cfg.hidden)]
        return ["finetune", "whisper", *cli_args(replace(cfg, encoder="wavlm"))[2:], *whisper]
    return ["finetune", "wavlm", "--data", str(cfg.data), "--out", str(cfg.out), "--model", cfg.model,
            "--epochs", str(cfg.epochs), "--lr-encoder", str(cfg.lr_encoder), "--lr-heads", str(cfg.lr_heads),
            "--batch-seconds", str(cfg.batch_seconds), "--select", cfg.select, "--gender-weight",
            str(cfg.gender_weight), "--dropout", str(cfg.dropout), "--conv-dropout", str(cfg.conv_dropout),
            *(["--layerdrop", str(cfg.layerdrop)] if cfg.layerdrop is not None else []), "--device", "cpu", "--threads",
            "1",
            "--no-progress"]


def subprocess_env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.update(extra)
    return env


def tiny_whisper_layers(path: Path, *, layers: int = 4, init_std: float = 0.5, seed: int = 0) -> Path:
    """A Whisper of `layers` encoder layers (so that the authors' upper half, index > L // 2, is not
    empty) with a larger init than transformers' 0.02: at 0.02 a 32-wide encoder's output is all
    positional table, the same for every clip, and nothing can learn from it."""
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    torch.manual_seed(seed)
    config = WhisperConfig(vocab_size=64, num_mel_bins=80, d_model=32, encoder_layers=layers,
                           encoder_attention_heads=2, decoder_layers=1, decoder_attention_heads=2, encoder_ffn_dim=64,
                           decoder_ffn_dim=64, max_source_positions=1500, max_target_positions=32, pad_token_id=0,
                           bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, init_std=init_std)
    WhisperForConditionalGeneration(config).save_pretrained(path)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(path)
    return path


KILLER = """
import os, signal, sys
import ser_cache.finetune.loop as ft
import ser_cache.system.setup as tr
saves_before, state = int(os.environ["KILL_AFTER_SAVES"]), {"saves": 0, "losses": 0}
save, loss = ft.save_checkpoint, tr.batch_loss
def save_checkpoint(*args, **kwargs):
    save(*args, **kwargs)
    state["saves"] += 1
def batch_loss(*args, **kwargs):
    if state["saves"] >= saves_before:
        state["losses"] += 1
        if state["losses"] == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    return loss(*args, **kwargs)
ft.save_checkpoint, tr.batch_loss = save_checkpoint, batch_loss
from ser_cache.cli.app import main
sys.argv = ["ser-cache", *sys.argv[1:]]
main()
"""


def killed_run(cfg: FinetuneConfig, tmp_path: Path, after_saves: int) -> Path:
    """The command line of `cfg` in a subprocess that SIGKILLs itself on the second loss computation
    after its `after_saves`-th checkpoint (mid-epoch `after_saves + 1`): that epoch's progress must be
    thrown away and redone by --resume. Returns the unfinished run directory."""
    import signal
    import subprocess
    import sys

    from ser_cache.runs import layout
    from ser_cache.runs.checkpoint_file import read_checkpoint

    wrapper = tmp_path / "killer.py"
    wrapper.write_text(KILLER)
    proc = subprocess.run([sys.executable, str(wrapper), *cli_args(cfg)],
                          env=subprocess_env(KILL_AFTER_SAVES=str(after_saves)), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = Path(cfg.out)
    assert read_checkpoint(out, tensors=False)["epoch"] == after_saves
    assert layout.is_unfinished_run(out) and not (out / layout.HISTORY).exists()
    return out
