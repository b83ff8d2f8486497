"""`finetune wavlm` and `finetune whisper --lora` under torchrun: two CPU processes (gloo) take the
very steps of one process.

Why a tolerance at all: the two runs compute the same global batches and the same loss over them,
but not in the same order — each rank pads its half of a batch to its own longest clip, and DDP
sums the two halves' gradients where one process sums over the whole batch — so gradients differ
in the last bits of float32 (~1e-7 relative). AdamW turns a gradient g into a step of about
lr · m/sqrt(v), which changes by the same relative amount, so after S steps a weight may differ
by roughly S · lr · 1e-6 — with 3 epochs of ~4 steps at lr 1e-3, about 1e-8; measured: 3e-6
(a few parameters whose gradient is near zero have a noisier m/sqrt(v)). We allow 1e-4. A real
mistake is far above that: computing CCC on each rank's half instead of the gathered batch moved
the weights by 1.6e-2 and the Development CCC by 2.6e-3 in the same setting.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ser_cache.finetune.loop import finetune_wavlm
from ser_cache.runs import layout, rundir

import factories
from finetune_support import base_config, cli_args, learnable_corpus, subprocess_env, tiny_whisper_layers

WEIGHT_TOLERANCE = 1e-4
SCORE_TOLERANCE = 1e-5


def dropout_free_wavlm(path: Path) -> Path:
    """The tiny WavLM without dropout and masking: the two runs then draw no random numbers that
    depend on how a batch is split over ranks."""
    from transformers import Wav2Vec2FeatureExtractor, WavLMModel

    torch.manual_seed(0)
    config = factories._wavlm_config(feat_extract_norm="layer", do_stable_layer_norm=True, hidden_dropout=0.0,
                                     attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
                                     mask_time_prob=0.0)
    WavLMModel(config).save_pretrained(path)
    Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True).save_pretrained(path)
    return path


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(tmp_path):
    """--task both, undersampled: the class targets (X rows: -1) travel with the others, the class
    loss is the global batch's, the Development class predictions are gathered from both ranks, and
    both ranks draw the same undersampled epochs. One pair of runs serves the attribute and the
    class checks: starting the two ranks costs most of this test's time."""
    corpus = learnable_corpus(tmp_path / "corpus", learnable_classes=True)
    model = dropout_free_wavlm(tmp_path / "wavlm")
    # Both auxiliary heads on, so the gathered gender logits and speaker embeddings are covered too.
    # conv_dropout 0: dropout draws depend on how a batch is split over ranks. LayerDrop on, and often
    # (0.5): its draws are shared by the ranks and skipped layers get no gradient on either side.
    cfg = base_config(corpus, model, tmp_path / "one", epochs=3, dropout=0.0, conv_dropout=0.0, layerdrop=0.5,
                      speaker_weight=0.1, task="both")
    one, two_dir = _one_and_two_ranks(cfg, ["--speaker-weight", "0.1", "--task", "both"])
    metrics = json.loads((two_dir / layout.METRICS).read_text())
    assert metrics["ccc"] == pytest.approx(one.metrics["ccc"], abs=SCORE_TOLERANCE)
    assert metrics["categorical"]["rows"] == one.metrics["categorical"]["rows"] == 10
    assert metrics["categorical"]["macro_f1"] == pytest.approx(one.metrics["categorical"]["macro_f1"],
                                                               abs=SCORE_TOLERANCE)
    with open(two_dir / layout.HISTORY) as f:
        history = list(csv.DictReader(f))
    assert [float(h["loss_class"]) for h in history] == pytest.approx([h["loss_class"] for h in one.history],
                                                                       abs=SCORE_TOLERANCE)


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process_for_a_lora_whisper_run(tmp_path):
    """`finetune whisper --lora` (trimmed input: each rank pads its half of a batch to its own longest
    clip): the adapters, convolutions and heads of two ranks are those of one process, and the base
    weights are not in the run at all."""
    corpus = learnable_corpus(tmp_path / "corpus", n_train=12, n_dev=6, n_test=2)
    model = tiny_whisper_layers(tmp_path / "whisper4")
    cfg = base_config(corpus, model, tmp_path / "one", epochs=2, encoder="whisper", window="trimmed", lora=16,
                      conv_dim=32, hidden=16, conv_dropout=0.0, speaker_weight=0.1)
    one, two_dir = _one_and_two_ranks(cfg, ["--speaker-weight", "0.1"])
    weights = load_file(str(two_dir / layout.WEIGHTS))
    encoder = [k for k in weights if k.startswith("whisper.")]
    assert encoder and all(".lora_" in k for k in encoder)
    assert all(weights[k].abs().max() > 1e-3 for k in encoder if ".lora_B" in k)  # they trained (B starts at 0)


def _one_and_two_ranks(cfg, extra_args: list[str]):
    """The run of `cfg` in this process, and the same through torchrun on two gloo ranks (CLI `cli_args`
    plus `extra_args`); checks that they agree in their files, weights, kept epoch and losses."""
    one = finetune_wavlm(cfg)
    two_dir = Path(cfg.out).parent / "two"
    args = cli_args(replace(cfg, out=two_dir)) + extra_args
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "ser_cache", *args], env=subprocess_env(SER_CACHE_BACKEND="gloo"),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert layout.is_run_dir(two_dir)
    assert sorted(p.name for p in two_dir.iterdir()) == sorted(p.name for p in one.run_dir.iterdir())

    a, b = load_file(str(one.run_dir / layout.WEIGHTS)), load_file(str(two_dir / layout.WEIGHTS))
    assert a.keys() == b.keys() and any(k.startswith("aam.") for k in a)
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= WEIGHT_TOLERANCE

    metrics = json.loads((two_dir / layout.METRICS).read_text())
    assert metrics["best_epoch"] == one.best_epoch
    with open(two_dir / layout.HISTORY) as f:
        history = list(csv.DictReader(f))
    assert [float(h["loss_total"]) for h in history] == pytest.approx([h["loss_total"] for h in one.history],
                                                                       abs=SCORE_TOLERANCE)
    assert json.loads((two_dir / layout.CONFIG).read_text())["heads"] == rundir.read_config(one.run_dir)["heads"]
    return one, two_dir
