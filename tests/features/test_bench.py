"""The bench's FLOP formulas against torch's own counter, and a tiny end-to-end bench run."""

import json
import math
import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from ser_cache.cli.app import app
from ser_cache.features.bench import (
    BENCH_MODELS,
    encoder_flops,
    shipped_config,
    synthetic_durations,
)

from factories import TINY_WHISPER


def counted(model, *args, **kwargs) -> int:
    with FlopCounterMode(display=False) as fc:
        model(*args, **kwargs)
    return fc.get_total_flops()


@pytest.mark.parametrize("name,n",
                         [pytest.param("wavlm-large", 88_000, marks=pytest.mark.slow), ("wavlm-base-plus-sv", 40_000),
                                    pytest.param("roberta-large", 37, marks=pytest.mark.slow)])
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_workdir_reuses_the_model_and_corpus_only_when_they_match(tmp_path, monkeypatch):
    from ser_cache.features import bench
    from ser_cache.features.bench import BUILT_MARK, BenchConfig, bench_extract

    # The matmul peak (4-5 s a run on 2 cores) is test_tiny_bench_run_reports_every_figure's; here: the workdir.
    monkeypatch.setattr(bench, "matmul_peak_tflops", lambda *a, **k: 1.0)

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


# --------------------------------------------------------------------------- train-heads bench (peaks.py)


def tiny_heads(input_dims=None, **kw):
    from ser_cache.system.heads import MultitaskHeads

    return MultitaskHeads(input_dims or {"a": (5,), "b": (3,)}, hidden=4, label_min=[1.0] * 3, label_max=[7.0] * 3,
                          n_genders=2, **kw)


def test_flops_of_tiny_heads_counted_by_hand():
    from ser_cache.train import peaks

    # in_dim 8 (5 + 3), hidden 4: four first layers 8→4 (arousal, valence, dominance, gender),
    # second layers 4→1 three times and 4→2 for gender. Per row, 2·k·n each:
    # first 4 × 2·8·4 = 256, second 3 × 2·4·1 + 2·4·2 = 24 + 16 = 40: forward 296.
    prods = peaks.products(tiny_heads())
    assert sorted((p.k, p.n) for p in prods) == [(4, 1)] * 3 + [(4, 2)] + [(8, 4)] * 4
    assert peaks.forward_flops(prods, 10) == 2960
    assert peaks.train_flops(prods, 10) == 3 * 2960
    # The first layers see the data: backward computes their weight gradient only (2 × forward).
    assert [p.input_grad for p in prods if p.k == 8] == [False] * 4
    assert peaks.executed_train_flops(prods, 10) == 10 * (2 * 256 + 3 * 40)
    # With the speaker head: one more first layer 8→4 and a 4→16 embedding (speaker_embedding_dim).
    with_speaker = peaks.products(tiny_heads(n_speakers=3, speaker_embedding_dim=16))
    assert peaks.forward_flops(with_speaker, 1) == 296 + 2 * 8 * 4 + 2 * 4 * 16


def test_executed_flops_match_torchs_counter_for_a_training_step():
    from ser_cache.train import peaks

    heads = tiny_heads(n_speakers=3, speaker_embedding_dim=16)
    x = {"a": torch.randn(6, 5), "b": torch.randn(6, 3)}
    with FlopCounterMode(display=False) as fc:
        out = heads(x)
        (out["avd"].sum() + out["gender_logits"].sum() + out["speaker_embedding"].sum()).backward()
    assert peaks.executed_train_flops(peaks.products(heads), 6) == fc.get_total_flops()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        heads(x)
    assert peaks.forward_flops(peaks.products(heads), 6) == fc.get_total_flops()


def test_first_layers_need_their_input_gradient_behind_a_layer_weighting_or_a_convpool():
    from ser_cache.system.model import FeatureModel
    from ser_cache.train import peaks

    layered = peaks.products(tiny_heads({"a": (2, 5), "b": (3,)}))
    assert all(p.input_grad for p in layered)
    model = FeatureModel(tiny_heads({"f": (6,), "b": (3,)}), {"f": {"in_dim": 10, "dim": 6}})
    prods = {p.name: p for p in peaks.products(model, {"f": 7.5})}
    conv = [prods[f"pools.0.convs.{i}"] for i in (0, 3, 6)]
    assert [(p.k, p.n, p.per_row, p.input_grad) for p in conv] == [(10, 6, 7.5, False), (6, 6, 7.5, True),
                                                                   (6, 6, 7.5, True)]
    assert all(p.input_grad for p in prods.values() if p.name.startswith("heads."))
    # Per row: 7.5 frames × (2·10·6 + 2 × 2·6·6) through the convolutions, then the heads on 6 + 3 inputs.
    heads_fwd = 4 * 2 * 9 * 4 + 3 * 2 * 4 + 2 * 4 * 2
    assert peaks.forward_flops(prods.values(), 2) == pytest.approx(2 * (7.5 * (120 + 144) + heads_fwd))
    with pytest.raises(ValueError, match="frames_per_row"):
        peaks.products(model)


def test_peak_shapes_are_the_heads_fused_first_layer():
    from ser_cache.train import peaks

    shapes = peaks.peak_shapes(tiny_heads(n_speakers=3), train_batch=64, eval_batch=4096, square=32)
    assert shapes == {"square": (32, 32, 32), "train_fused": (64, 8, 5 * 4), "train_per_head": (64, 8, 4),
                      "eval_fused": (4096, 8, 5 * 4)}


def test_matmul_tflops_is_a_positive_rate_for_both_dtypes():
    from ser_cache.train import peaks

    for dtype in (torch.float32, torch.bfloat16):
        rate = peaks.matmul_tflops(16, 32, 24, dtype, trials=2, min_seconds=0.001, warmup=1)
        assert 0 < rate < 1e4


PEAKS = {"fp32": {"square": 0.2, "train_fused": 0.1, "train_per_head": 0.08, "eval_fused": 0.25},
         "bf16": {"square": 0.05, "train_fused": 0.04, "train_per_head": 0.03, "eval_fused": 0.05}}
RUNS = {"fp32": {"wall_s": 20.0, "epoch_s": 2.0, "train_s": 1.5, "eval_s": 0.5, "mean_ccc": 0.8000, "peak_mb": 900},
        "bf16": {"wall_s": 50.0, "epoch_s": 5.0, "train_s": 4.0, "eval_s": 1.0, "mean_ccc": 0.8031, "peak_mb": 950}}
FLOPS = {"train": 90e9, "executed": 60e9, "eval": 50e9}


def test_utilisation_is_achieved_over_the_peak_of_the_same_dtype():
    from ser_cache.train import peaks

    assert peaks.utilisation(3e12, 10.0, 0.6) == pytest.approx(0.5)
    assert math.isnan(peaks.utilisation(1e9, 0.0, 0.1)) and math.isnan(peaks.utilisation(1e9, 1.0, 0.0))
    r = peaks.compare(RUNS, PEAKS, FLOPS)
    fp32, bf16 = r["per_precision"]["fp32"], r["per_precision"]["bf16"]
    assert fp32["train_tflops"] == pytest.approx(0.06)  # 90 GFLOP in 1.5 s
    assert fp32["train_util_train_shape"] == pytest.approx(0.6)  # 0.06 of 0.1
    assert fp32["train_util_square"] == pytest.approx(0.3)  # 0.06 of 0.2
    assert fp32["train_executed_util_train_shape"] == pytest.approx(0.4)  # 60 GFLOP in 1.5 s of 0.1
    assert fp32["eval_util_eval_shape"] == pytest.approx(0.4)  # 0.1 TFLOP/s of 0.25
    assert bf16["train_tflops"] == pytest.approx(0.0225)
    assert bf16["train_util_train_shape"] == pytest.approx(0.5625)  # of bf16's own 0.04, not fp32's
    assert bf16["eval_util_square"] == pytest.approx(1.0)
    ratios = r["ratios"]
    assert ratios["wall_speedup"] == pytest.approx(0.4) and ratios["epoch_speedup"] == pytest.approx(0.4)
    assert ratios["train_speedup"] == pytest.approx(0.375) and ratios["eval_speedup"] == pytest.approx(0.5)
    assert ratios["peak_square"] == pytest.approx(0.25) and ratios["peak_train_fused"] == pytest.approx(0.4)
    assert r["ccc_delta"] == pytest.approx(0.0031) and r["ccc_target_met"]


def test_ccc_target_and_table():
    from ser_cache.train import peaks

    worse = {**RUNS, "bf16": {**RUNS["bf16"], "mean_ccc": 0.7940}}
    r = peaks.compare(worse, PEAKS, FLOPS)
    assert r["ccc_delta"] == pytest.approx(-0.006) and not r["ccc_target_met"]
    shapes = {"square": (2048,) * 3, "train_fused": (64, 2816, 1024), "train_per_head": (64, 2816, 256),
              "eval_fused": (4096, 2816, 1024)}
    table = peaks.format_table(worse, PEAKS, shapes, FLOPS, r)
    lines = table.splitlines()
    assert lines[0].split() == ["fp32", "bf16", "bf16", "vs", "fp32"]
    row = {}
    for line in lines[2:]:
        label, *cells = re.split(r"\s{2,}", line.strip())
        row.setdefault(label, cells)  # the first of two same-named rows: training's
    assert row["matmul peak 2048³ (TFLOP/s)"] == ["0.200", "0.050", "0.25 ratio"]
    assert row["matmul peak, train fused 64×2816×1024 (TFLOP/s)"] == ["0.100", "0.040", "0.40 ratio"]
    assert row["train_heads wall (s)"] == ["20.000", "50.000", "0.40× speed-up"]
    assert row["train GFLOP/epoch, 3 × forward"][0] == "90.00"
    assert row["utilisation vs train fused peak"] == ["60.0 %", "56.2 %"]
    assert row["utilisation vs 2048³ peak"] == ["30.0 %", "45.0 %"]
    assert row["Dev mean CCC (kept epoch)"] == ["0.8000", "0.7940", "Δ -0.0060 (|Δ| ≤ 0.005: missed)"]


def train_heads_bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "train_heads_bench.py"
    spec = importlib.util.spec_from_file_location("train_heads_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_refuses_a_precision():
    with pytest.raises(SystemExit) as e:
        train_heads_bench().main(["--compare", "--precision", "bf16"])
    assert e.value.code == 2


@pytest.mark.slow  # about 2 s in a session that has run train_heads before, 6 s alone (imports)
def test_compare_run_reports_both_precisions_against_their_peaks(tmp_path, monkeypatch, capsys):
    bench = train_heads_bench()
    # The paper's 1280/1024/512 dims would make this a benchmark; a few dims keep it a test.
    monkeypatch.setattr(bench, "STORES", tuple((n, k, d, s) for (n, k, _, s), d in zip(bench.STORES, (12, 8, 4))))
    out = tmp_path / "cmp.json"
    figures = bench.main(["--compare", "--rows", "400", "--epochs", "2", "--threads", "1", "--no-warmup",
                          "--peak-size", "32", "--peak-trials", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(figures))
    assert {r["compute_dtype"] for r in figures["runs"].values()} == {"float32", "bfloat16"}
    assert figures["peak_shapes"] == {"square": [32, 32, 32], "train_fused": [64, 24, 1024],
                                      "train_per_head": [64, 24, 256], "eval_fused": [4096, 24, 1024]}
    # 24 inputs; four heads (three attributes, gender) 24→256→{1, 1, 1, 2}: forward 2·(24·1024 + 256·5) a row.
    per_row = 2 * (24 * 1024 + 256 * 5)
    run = figures["runs"]["fp32"]
    assert figures["flops_per_epoch"]["eval"] == run["dev_rows"] * per_row
    assert figures["flops_per_epoch"]["train"] == 3 * run["rows_per_epoch"] * per_row
    for p in ("fp32", "bf16"):
        pp = figures["per_precision"][p]
        assert pp["train_util_train_shape"] == pytest.approx(
            pp["train_tflops"] / figures["peak_tflops"][p]["train_fused"], rel=2e-3)
        assert pp["eval_util_square"] == pytest.approx(pp["eval_tflops"] / figures["peak_tflops"][p]["square"],
                                                       rel=2e-3)
    assert figures["ccc_delta"] == pytest.approx(
        figures["runs"]["bf16"]["dev_ccc"]["mean"] - run["dev_ccc"]["mean"], abs=1e-4)
    printed = capsys.readouterr().out
    assert "bf16 vs fp32" in printed and "Dev mean CCC" in printed and figures["table"] in printed
