"""What only a CUDA GPU can check: bf16 autocast, pinned copies, and every stage on the device.

Skipped where torch sees no CUDA device (as in CI). On a GPU machine: `python -m pytest -q tests/e2e/test_cuda.py`
(benchmarks/gpu_session.sh runs it first).
"""

import json

import numpy as np
import pytest
import torch

from ser_cache.encoders.base import RuntimeOptions, pad_waves
from ser_cache.features.extract import ExtractConfig, extract
from ser_cache.features.store import FeatureStore

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

KINDS = [("whisper", {}), ("whisper", {"window": "trimmed"}), ("wavlm", {}), ("xvector", {}), ("text", {})]


def rows(models, corpus, out, kind, kw, **run) -> np.ndarray:
    cfg = ExtractConfig(model=str(models[kind]), data=corpus, out=out, progress=False, workers=0, **kw, **run)
    r = extract(cfg)
    ids, feats, written = FeatureStore.open(r.store).read()
    assert written.all()
    return feats.astype(np.float32).reshape(len(ids), -1)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_auto_precision_on_cuda_is_a_half_type_and_waves_are_pinned():
    dtype = RuntimeOptions(device="cuda").autocast_dtype(torch.device("cuda"))
    assert dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    x, lengths = pad_waves([np.ones(10, np.float32), np.ones(4, np.float32)], pin=True)
    assert x.is_pinned() and lengths.is_pinned() and lengths.tolist() == [10, 4]


@pytest.mark.parametrize("kind,kw", KINDS, ids=["whisper", "whisper-trimmed", "wavlm", "xvector", "text"])
def test_cuda_bf16_rows_agree_with_cpu_fp32(models, corpus, tmp_path, kind, kw):
    cpu = rows(models, corpus, tmp_path / "cpu", kind, kw, device="cpu", precision="fp32")
    gpu = rows(models, corpus, tmp_path / "gpu", kind, kw, device="cuda", precision="auto")
    assert cosines(cpu, gpu).min() > 0.999, kind


def test_cuda_rows_do_not_depend_on_the_batch(models, corpus, tmp_path):
    """One utterance per batch against everything in one batch: equal up to bf16 kernel differences."""
    for i, (kind, kw) in enumerate(KINDS[:3]):
        alone = rows(models, corpus, tmp_path / f"alone{i}", kind, kw, device="cuda", batch_seconds=0.01)
        together = rows(models, corpus, tmp_path / f"together{i}", kind, kw, device="cuda", batch_seconds=10_000)
        assert cosines(alone, together).min() > 0.9999, kind


def test_bench_on_cuda_reports_half_precision_and_gpu_memory(tmp_path):
    from ser_cache.features.bench import BenchConfig, bench_extract

    from factories import TINY_WHISPER

    cfile = tmp_path / "tiny.json"
    cfile.write_text(json.dumps(TINY_WHISPER))
    rep = bench_extract(BenchConfig(config=cfile, utterances=64, device="cuda", naive=True, naive_utterances=4,
                                    workdir=tmp_path / "work"))
    assert rep.precision in ("bfloat16", "float16") and rep.peak_gpu_memory_gib > 0
    assert rep.utterances == 64 and rep.peak_tflops > 1 and rep.naive["speedup"] > 0
    assert not rep.device.startswith("cpu")


def test_train_heads_on_cuda_learns(tmp_path):
    from synthetic import make_corpus, make_store, train

    manifest, ids, feats = make_corpus(tmp_path / "corpus")
    stores = [make_store(tmp_path / "features" / f"{n}.zarr", ids, x, kind="text" if n == "text" else "whisper",
                         modality="text" if n == "text" else "audio") for n, x in feats.items()]
    result, _ = train(tmp_path, manifest, stores, device="cuda")
    assert result.metrics["ccc"]["mean"] > 0.5, result.metrics["ccc"]


def test_sweep_on_cuda_equals_the_cpu_sweep_in_fp32(tmp_path):
    """Members stacked on the GPU (vmap, StackedAdamW on device, device-placed inputs) end where the
    CPU's do; a GPU's products round differently, hence the tolerance."""
    from ser_cache.train.options import TrainHeadsConfig
    from ser_cache.train.sweep import SweepConfig, parse_variant, sweep

    from synthetic import make_corpus, make_store

    manifest, ids, feats = make_corpus(tmp_path / "corpus")
    stores = tuple(make_store(tmp_path / "features" / f"{n}.zarr", ids, x, kind="text" if n == "text" else "whisper",
                              modality="text" if n == "text" else "audio") for n, x in feats.items())
    results = {}
    for device in ("cpu", "cuda"):
        base = TrainHeadsConfig(features=stores, data=manifest, out=tmp_path / device, epochs=4, lr=3e-3,
                                batch_size=32, undersample=False, progress=False, device=device, precision="fp32")
        results[device] = sweep(SweepConfig(base, seeds=2, variants=(parse_variant("drop: ox=drop"),),
                                            resamples=20)).summary
    for name in ("base", "drop"):
        for cpu, gpu in zip(results["cpu"]["variants"][name]["members"], results["cuda"]["variants"][name]["members"]):
            assert gpu["ccc"]["mean"] == pytest.approx(cpu["ccc"]["mean"], abs=2e-3)


def test_finetune_on_cuda_in_half_precision_lowers_the_loss(models, tmp_path):
    from ser_cache.finetune.loop import finetune_wavlm

    from finetune_support import base_config, learnable_corpus

    corpus = learnable_corpus(tmp_path / "corpus")
    cfg = base_config(corpus, models["wavlm"], tmp_path / "run", device="cuda", epochs=6, precision="auto")
    result = finetune_wavlm(cfg)
    history = result.history
    assert len(history) == 6 and history[-1]["loss_total"] < history[0]["loss_total"]
    assert all(np.isfinite(h["dev_ccc_mean"]) for h in history)
