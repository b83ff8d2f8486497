"""The bench's FLOP formulas against torch's own counter, and a tiny end-to-end bench run."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from ser_cache.bench import BENCH_MODELS, encoder_flops, shipped_config, synthetic_durations
from ser_cache.cli import app


def counted(model, *args, **kwargs) -> int:
    with FlopCounterMode(display=False) as fc:
        model(*args, **kwargs)
    return fc.get_total_flops()


@pytest.mark.parametrize("name,n", [("wavlm-large", 88_000), ("wavlm-base-plus-sv", 40_000), ("roberta-large", 37)])
def test_flop_formulas_match_the_counter_on_full_size_configs(name, n):
    from transformers import AutoConfig, AutoModel, WavLMForXVector

    c = shipped_config(name)
    kind = {"wavlm-large": "wavlm", "wavlm-base-plus-sv": "xvector", "roberta-large": "text"}[name]
    with torch.device("meta"):
        cfg = AutoConfig.for_model(**c)
        m = WavLMForXVector(cfg) if kind == "xvector" else AutoModel.from_config(cfg)
        x = torch.empty(1, n) if kind != "text" else torch.zeros(1, n, dtype=torch.long)
    m.eval()
    ref = counted(m, x) if kind != "text" else counted(m, input_ids=x)
    assert encoder_flops(kind, c, n) == pytest.approx(ref, rel=2e-3)


def test_whisper_large_v3_window_is_about_1_04_tflop_and_635m_parameters():
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    c = shipped_config("whisper-large-v3")
    cfg = WhisperConfig(**c)
    for positions, window, samples in [(750, "window", 88_000), (-(-88_000 // 320), "trimmed", 88_000)]:
        cfg.max_source_positions = positions
        with torch.device("meta"):
            enc = WhisperEncoder(cfg)
            x = torch.empty(1, c["num_mel_bins"], 2 * positions)
        assert encoder_flops("whisper", c, samples, window) == pytest.approx(counted(enc, x), rel=1e-3)
    assert encoder_flops("whisper", c, 88_000, "window") == pytest.approx(1.04e12, rel=0.01)
    assert sum(p.numel() for p in enc.parameters()) == pytest.approx(635e6, rel=0.01)


def test_durations_look_like_msp_podcast():
    d = synthetic_durations(20_000, seed=0)
    assert d.min() >= 1.5 and d.max() <= 15.0 and d.mean() == pytest.approx(5.5, abs=0.15)


def test_shipped_configs_exist():
    for name in BENCH_MODELS:
        assert shipped_config(name)["model_type"]


TINY_WHISPER = {"architectures": ["WhisperForConditionalGeneration"], "model_type": "whisper", "d_model": 32,
                "encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_layers": 1,
                "decoder_attention_heads": 2, "decoder_ffn_dim": 64, "num_mel_bins": 80, "max_source_positions": 1500,
                "max_target_positions": 32, "vocab_size": 64, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                "decoder_start_token_id": 1}


def test_tiny_bench_run_reports_every_figure(tmp_path):
    config = TINY_WHISPER
    cfile = tmp_path / "tiny.json"
    cfile.write_text(json.dumps(config))
    report = tmp_path / "r.json"
    r = CliRunner().invoke(app, ["bench", "extract", "--config", str(cfile), "--random-init", "--utterances", "6",
                                 "--device", "cpu", "--workers", "0", "--naive", "--naive-utterances", "2",
                                 "--json", str(report)])
    assert r.exit_code == 0, r.output
    rep = json.loads(report.read_text())
    assert rep["utterances"] == 6 and rep["kind"] == "whisper" and rep["precision"] == "float32"
    assert rep["wall_seconds"] > 0 and rep["peak_tflops"] > 0 and 0 < rep["utilisation"]
    # Rates are over the encoding loop; model loading is reported apart and not counted in them.
    assert 0 < rep["loop_seconds"] and 0 < rep["setup_seconds"]
    assert rep["setup_seconds"] + rep["loop_seconds"] <= rep["wall_seconds"]
    assert rep["utterances_per_second"] == pytest.approx(6 / rep["loop_seconds"])
    assert rep["end_to_end_utterances_per_second"] == pytest.approx(6 / rep["wall_seconds"])
    assert rep["tflop_per_utterance_mean"] * 1e12 == pytest.approx(encoder_flops("whisper", config, 0, "window"))
    assert rep["naive"]["utterances"] == 2 and rep["naive"]["speedup"] > 0
    assert rep["cpu_decode_per_core"]["audio_seconds_per_second"] > 0
    assert set(rep["time_split"]) >= {"decode_wait", "encode", "write"}


def test_bench_needs_random_init():
    r = CliRunner().invoke(app, ["bench", "extract", "--model", "whisper-large-v3"])
    assert r.exit_code == 2 and "--random-init" in r.output


def test_workdir_reuses_the_model_and_corpus_only_when_they_match(tmp_path):
    from ser_cache.bench import BUILT_MARK, BenchConfig, bench_extract

    cfile = tmp_path / "tiny.json"
    cfile.write_text(json.dumps(TINY_WHISPER))
    work = tmp_path / "work"

    def run(**kw):
        cfg = BenchConfig(config=cfile, utterances=kw.pop("utterances", 4), device="cpu", workers=0, workdir=work, **kw)
        return bench_extract(cfg)

    first = run()
    (model,) = work.glob("model-*")
    weights = next(model.glob("*.safetensors"))
    wav = work / "corpus" / "audio" / "utt000000.wav"
    stamps = weights.stat().st_mtime_ns, wav.stat().st_mtime_ns
    second = run()
    assert (weights.stat().st_mtime_ns, wav.stat().st_mtime_ns) == stamps  # reused, not rebuilt
    # The kept store from the first run must not make the second one a no-op.
    assert first.utterances == second.utterances == 4

    third = run(utterances=3)  # another corpus size: the corpus is rebuilt, the model kept
    assert third.utterances == 3 and len(list((work / "corpus" / "audio").glob("*.wav"))) == 3
    assert weights.stat().st_mtime_ns == stamps[0]

    (model / BUILT_MARK).unlink()  # as if a build had been interrupted
    run(utterances=3)
    assert weights.stat().st_mtime_ns != stamps[0]
    fourth = run(utterances=3, seed=1)  # another seed: another model beside the first, and other audio
    assert fourth.utterances == 3 and len(list(work.glob("model-*"))) == 2
