"""A newcomer's rough edges (issue 17): a quick `--help`, help texts that say what an option takes,
one default for the auxiliary heads, the demo's last words, readable logs and tables, and a run's
provenance with `train-heads --config` to rerun it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ser_cache.cli import shared_options as shared
from ser_cache.cli.app import app

from synthetic import make_corpus, make_store

SRC = Path(__file__).resolve().parents[2] / "src"
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def commands(group=None, prefix=()):
    """Every command of the app as (words, click command), sub-commands included."""
    import typer

    group = group or typer.main.get_command(app)
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from commands(cmd, (*prefix, name))
        else:
            yield (*prefix, name), cmd


# --------------------------------------------------------------------------- --version and --help without torch


LOADED = """
import json, sys
from ser_cache.cli.app import main
for args in json.loads(sys.argv[1]):
    sys.argv = ["ser-cache", *args]
    try:
        main()
    except SystemExit:
        pass
heavy = [m for m in ("torch", "numpy", "transformers", "zarr", "matplotlib") if m in sys.modules]
print("LOADED " + json.dumps(heavy))
"""


def heavy_modules_after(*argvs: list[str]) -> list[str]:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "COLUMNS": "80"}
    p = subprocess.run([sys.executable, "-c", LOADED, json.dumps(argvs)], capture_output=True, text=True,
                       timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    line = [x for x in p.stdout.splitlines() if x.startswith("LOADED ")][-1]
    return json.loads(line.removeprefix("LOADED "))


def test_version_imports_no_torch():
    assert heavy_modules_after(["--version"]) == []


def test_help_of_every_command_imports_no_torch():
    argvs = [["--help"]] + [[*words, "--help"] for words, _ in commands()]
    assert len(argvs) > 15
    assert heavy_modules_after(*argvs) == []


# --------------------------------------------------------------------------- help texts


def test_no_help_shows_a_python_type_and_every_option_is_described():
    for words, cmd in commands():
        r = invoke(*words, "--help")
        assert r.exit_code == 0, r.output
        for python_type in ("<list[", "<tuple", "list[Path]", "list[str]"):
            assert python_type not in r.output, (words, r.output)
        for param in cmd.params:
            if param.param_type_name == "option" and param.name != "help":
                assert (param.help or "").strip(), f"{' '.join(words)} {param.opts[0]} has no help"


FIXED_CHOICES = {
    "OxMode": ("ser_cache.system.sampling", "OX_MODES"),
    "SelectMode": ("ser_cache.system.options", "SELECT_MODES"),
    "TaskMode": ("ser_cache.system.tasks", "TASKS"),
    "ClassWeightMode": ("ser_cache.system.options", "CLASS_WEIGHT_MODES"),
    "HeadsPrecisionMode": ("ser_cache.infra.runtime", "HEADS_PRECISIONS"),
    "EncoderPrecisionMode": ("ser_cache.infra.runtime", "ENCODER_PRECISIONS"),
    "TranscribePrecisionMode": ("ser_cache.infra.runtime", "TRANSCRIBE_PRECISIONS"),
    "PoolingMode": ("ser_cache.encoders.base", "POOLINGS"),
    "WindowMode": ("ser_cache.encoders.whisper", "WINDOWS"),
    "KindName": ("ser_cache.encoders", "SHOWN_KINDS"),
    "OnErrorMode": ("ser_cache.features.extract", "ON_ERROR"),
}


def test_the_clis_fixed_choices_are_the_librarys():
    import importlib

    for alias, (module, constant) in FIXED_CHOICES.items():
        choices = tuple(getattr(importlib.import_module(module), constant))
        assert typing.get_args(getattr(shared, alias)) == choices, alias
    from ser_cache.features.transcribe import DEFAULT_MODEL

    assert shared.TRANSCRIBE_MODEL == DEFAULT_MODEL


def test_fixed_choices_are_shown_and_checked_before_any_work(tmp_path):
    r = invoke("train-heads", "--help")
    assert "--ox <keep|drop|only|train+dev|train+dev-nonox>" in r.output
    assert "--select <balanced|ccc>" in r.output and "--precision <auto|fp32|bf16>" in r.output
    r = invoke("extract", "--help")
    assert "<mean|mean+std|frames>" in r.output
    assert "<whisper|ssl|wavlm|xvector|text>" in r.output
    assert "<skip|fail>" in r.output and "<window|trimmed>" in r.output
    r = invoke("extract", "--model", "whisper-large-v3", "--data", tmp_path, "--out", tmp_path / "f",
               "--pooling", "max")
    assert r.exit_code == 2 and "'max' is not one of 'mean', 'mean+std', 'frames'" in r.output
    assert not (tmp_path / "f").exists()


def test_undersampling_help_says_what_m_is():
    r = invoke("train-heads", "--help")
    text = " ".join(r.output.split())
    assert "m rows of every emotion class, m the size of the smallest class" in text


# --------------------------------------------------------------------------- one default for the auxiliary heads


def test_train_heads_sweep_and_finetune_share_the_heads_defaults():
    from ser_cache.finetune.options import FinetuneConfig
    from ser_cache.train.options import TrainHeadsConfig

    defaults = {}
    for words, cmd in commands():
        if words in (("train-heads",), ("sweep",), ("finetune", "wavlm")):
            params = {p.name: p.default for p in cmd.params}
            defaults[words] = (params["gender_weight"], params["speaker_weight"])
    assert set(defaults.values()) == {(1.0, 0.1)}, defaults
    for config in (TrainHeadsConfig, FinetuneConfig):
        fields = config.__dataclass_fields__
        assert (fields["gender_weight"].default, fields["speaker_weight"].default) == (1.0, 0.1), config


def test_the_recipes_share_one_declaration_of_their_common_options():
    """TrainHeadsConfig and FinetuneConfig are TrainingOptions; each command's default of a shared option
    is its config's; config.json lists every option (RECORD_ORDER names each field once)."""
    import dataclasses

    from ser_cache.finetune.options import FinetuneConfig
    from ser_cache.system.options import TrainingOptions
    from ser_cache.train.options import TrainHeadsConfig

    shared_fields = [f.name for f in dataclasses.fields(TrainingOptions)]
    configs = {("train-heads",): TrainHeadsConfig, ("sweep",): TrainHeadsConfig, ("finetune", "wavlm"): FinetuneConfig}
    for words, cmd in commands():
        if words not in configs:
            continue
        config = configs[words]
        assert issubclass(config, TrainingOptions)
        assert sorted(config.RECORD_ORDER) == sorted(f.name for f in dataclasses.fields(config)), config
        params = {p.name: p.default for p in cmd.params}
        params["undersample"] = not params.pop("no_undersample")
        for name in shared_fields:
            assert params[name] == getattr(config, name), (words, name)


# --------------------------------------------------------------------------- a run: logs, titles, provenance, --config

TRAIN = ("--epochs", 2, "--lr", 3e-3, "--batch-size", 16, "--no-undersample", "--ox", "drop", "--seed", 5,
         "--gender-weight", 0.5, "--speaker-weight", 0, "--select", "ccc", "--hidden", 16, "--device", "cpu",
         "--threads", 1, "--no-progress")


@pytest.fixture(scope="module")
def heads_run(tmp_path_factory):
    """A corpus, a store and a train-heads run made through the command, from relative paths."""
    root = tmp_path_factory.mktemp("trust")
    manifest, ids, feats = make_corpus(root / "corpus", 90)
    make_store(root / "features" / "audio.zarr", ids, feats["audio"])
    cwd = os.getcwd()
    os.chdir(root)
    try:
        r = invoke("train-heads", "--features", "features/audio.zarr", "--data", "corpus/manifest.csv",
                   "--out", "runs/a-run-whose-path-makes-a-long-title", *TRAIN)
    finally:
        os.chdir(cwd)
    assert r.exit_code == 0, r.output
    return {"root": root, "manifest": manifest, "run": root / "runs" / "a-run-whose-path-makes-a-long-title",
            "output": r.output}


def test_the_memory_log_reads_in_plain_units(heads_run):
    import re

    text = " ".join(heads_run["output"].split())  # the log wraps at 80 columns
    line = re.search(r"inputs: audio held on cpu \([^)]*\)", text)
    assert line, text
    assert re.fullmatch(r"inputs: audio held on cpu \([\d.]+ kB on cpu, of up to [\d.]+ GB allowed: 50% of its "
                        r"[\d.]+ GB free\)", line.group(0)), line.group(0)


def test_the_scores_table_title_is_one_line_at_80_columns(heads_run):
    title = "runs/a-run-whose-path-makes-a-long-title — Development, epoch"
    lines = heads_run["output"].splitlines()
    assert any(title in x for x in lines), heads_run["output"]
    assert all(len(x) <= 80 for x in lines if "─" in x or "━" in x)  # the table itself fits too


def test_a_runs_config_records_its_provenance(heads_run):
    import hashlib
    import platform
    from importlib import metadata

    config = json.loads((heads_run["run"] / "config.json").read_text())
    manifest = str(heads_run["manifest"])
    assert config["train"]["data"] == manifest  # typed relative, recorded absolute
    assert config["train"]["features"] == [str(heads_run["root"] / "features" / "audio.zarr")]
    p = config["provenance"]
    assert p["python"] == platform.python_version()
    assert p["torch"] == metadata.version("torch") and p["transformers"] == metadata.version("transformers")
    assert p["data"] == manifest and p["label_file"] == manifest
    assert p["label_file_sha256"] == hashlib.sha256(heads_run["manifest"].read_bytes()).hexdigest()
    from ser_cache.runs import provenance

    module = Path(provenance.__file__)
    git = subprocess.run(["git", "-C", str(module.parent), "rev-parse", "HEAD"], capture_output=True, text=True)
    tracked = subprocess.run(["git", "-C", str(module.parent), "ls-files", "--error-unmatch", module.name],
                             capture_output=True)
    expected = git.stdout.strip() if git.returncode == 0 and tracked.returncode == 0 else None
    assert p["git_commit"] == expected and (p["git_dirty"] is None) == (expected is None)


def test_an_msp_podcast_runs_label_file_is_labels_consensus(tmp_path):
    from ser_cache.data.msp_podcast import MSP_LABEL_FILE
    from ser_cache.runs import provenance

    from factories import msp_corpus

    corpus = msp_corpus(tmp_path / "corpus")
    p = provenance.record(corpus)
    assert p["label_file"] == str(corpus / MSP_LABEL_FILE) and len(p["label_file_sha256"]) == 64


def test_config_reruns_a_runs_settings_and_the_command_line_wins(heads_run, tmp_path):
    a = heads_run["run"]
    r = invoke("train-heads", "--config", a / "config.json", "--out", tmp_path / "b", "--no-progress")
    assert r.exit_code == 0, r.output
    first, again = (json.loads((d / "config.json").read_text()) for d in (a, tmp_path / "b"))
    for key in ("out", "progress"):
        first["train"].pop(key), again["train"].pop(key)
    assert again["train"] == first["train"]
    # The same settings on the same data: the same epochs and scores (CPU, one thread).
    assert json.loads((tmp_path / "b" / "metrics.json").read_text()) == json.loads((a / "metrics.json").read_text())

    r = invoke("train-heads", "--config", a, "--out", tmp_path / "c", "--epochs", 1, "--ox", "keep", "--no-progress")
    assert r.exit_code == 0, r.output
    c = json.loads((tmp_path / "c" / "config.json").read_text())["train"]
    assert (c["epochs"], c["ox"], c["seed"], c["gender_weight"], c["hidden"]) == (1, "keep", 5, 0.5, 16)


def test_config_of_a_run_written_before_provenance_still_works(heads_run, tmp_path, monkeypatch):
    from ser_cache.runs import rundir

    old = tmp_path / "old"
    old.mkdir()
    config = json.loads((heads_run["run"] / "config.json").read_text())
    del config["provenance"]
    config["train"]["data"] = "corpus/manifest.csv"  # as typed, relative to where it was trained
    (old / "config.json").write_text(json.dumps(config))
    assert rundir.read_config(old)["train"]["data"] == "corpus/manifest.csv"
    monkeypatch.chdir(heads_run["root"])
    r = invoke("train-heads", "--config", old / "config.json", "--out", tmp_path / "again", "--no-progress")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "again" / "config.json").read_text())["train"]["data"] == str(heads_run["manifest"])


def test_config_refuses_what_is_not_a_train_heads_runs_settings(heads_run, tmp_path):
    base = json.loads((heads_run["run"] / "config.json").read_text())

    def refused(config, *expected):
        path = tmp_path / "config.json"
        path.write_text(config if isinstance(config, str) else json.dumps(config))
        r = invoke("train-heads", "--config", path, "--out", tmp_path / "out", "--no-progress")
        assert r.exit_code == 2, r.output
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: --config ") and str(path) in lines[0], r.output
        for word in expected:
            assert word in lines[0], r.output
        assert not (tmp_path / "out").exists()

    refused({**base, "train": {**base["train"], "lrr": 0.1}}, "unknown option(s)", "lrr")
    refused({**base, "train": {**base["train"], "ox": "sometimes"}}, "\"train\".ox = 'sometimes'", "not one of")
    refused({**base, "train": {**base["train"], "epochs": "many"}}, "\"train\".epochs = 'many'")
    refused({**base, "system": "finetuned-wavlm"}, "finetune wavlm")
    refused({**base, "imported": {"source": "x"}}, "import vox-profile")
    refused({"format": "ser-cache-sweep", "variants": {}}, "not a ser-cache run config")
    refused("not json at all", "not valid JSON")
    r = invoke("train-heads", "--config", tmp_path / "nothing-here", "--out", tmp_path / "out")
    assert r.exit_code == 2 and "no such file" in r.output


# --------------------------------------------------------------------------- evaluate, several splits


def test_evaluate_scores_each_repeated_split_on_its_own(heads_run, tmp_path):
    run = heads_run["run"]
    r = invoke("evaluate", run, "--data", heads_run["manifest"], "--split", "Development", "--split", "Test1",
               "--device", "cpu", "--plots", tmp_path / "figs")
    assert r.exit_code == 0, r.output
    dev, test = (json.loads((run / f"eval_{s}.json").read_text()) for s in ("Development", "Test1"))
    assert (dev["split"], test["split"]) == ("Development", "Test1") and dev["ccc"] != test["ccc"]
    # A title longer than 80 columns wraps (inside the path too, where the path alone is longer).
    text = "".join(r.output.split())
    for title in (f"{run} — Development (22 utterances)", f"{run} — Test1 (14 utterances)"):
        assert "".join(title.split()) in text
    assert (tmp_path / "figs" / "Development" / "scatter.png").is_file()
    assert (tmp_path / "figs" / "Test1" / "scatter.png").is_file()
    r = invoke("evaluate", run, "--data", heads_run["manifest"], "--split", "Development", "--split", "Test1",
               "--out", tmp_path / "one.json")
    assert r.exit_code == 2 and "one JSON file for 2 splits" in r.output and not (tmp_path / "one.json").exists()


# --------------------------------------------------------------------------- plot --out: one rule


def test_plot_out_is_a_folder_or_a_png_for_both_plot_commands(tmp_path):
    from ser_cache.runs import plots
    from ser_cache.runs.plots import PlotError

    from synthetic import make_run, speaker_corpus, speaker_store

    run = make_run(tmp_path / "run")
    for out, written in ((tmp_path / "figs", tmp_path / "figs" / "curves.png"),
                         (tmp_path / "mine.png", tmp_path / "mine.png")):
        r = invoke("plot", "run", run, "--out", out)
        assert r.exit_code == 0 and written.is_file(), r.output
    manifest, ids, labels = speaker_corpus(tmp_path / "corpus")
    store = speaker_store(tmp_path / "s.zarr", ids, labels, separated=True)
    result = plots.speaker_tsne(store, manifest, speakers=3, per_speaker=4, out=tmp_path / "figs")
    assert result.paths == [tmp_path / "figs" / "s-speakers.png"]
    with pytest.raises(PlotError, match="ending in .png"):
        plots.training_curves(run, tmp_path / "curves.svg")
    r = invoke("plot", "run", "--help")
    assert "A folder for curves.png, or the figure's own name" in " ".join(r.output.split())


# --------------------------------------------------------------------------- sweeps and fine-tuning share the writer


def test_sweep_members_record_provenance_and_are_reused_from_relative_paths(heads_run, tmp_path, monkeypatch):
    monkeypatch.chdir(heads_run["root"])
    args = ("sweep", "--features", "features/audio.zarr", "--data", "corpus/manifest.csv", "--out", tmp_path / "sw",
            "--seeds", 1, "--variant", "wide: hidden=24", "--resamples", 10, *TRAIN)
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert f"{tmp_path / 'sw'}: Development CCC over 1 seed(s); Δ against base variant rows" in text, r.output
    member = json.loads((tmp_path / "sw" / "wide" / "seed-5" / "config.json").read_text())
    assert member["train"]["data"] == str(heads_run["manifest"]) and member["provenance"]["label_file_sha256"]
    r = invoke(*args)  # the members recorded the absolute path; the same relative one reuses them
    assert r.exit_code == 0, r.output
    assert "2 already written, 0 to train" in " ".join(r.output.split())


@pytest.mark.slow
def test_a_finetuned_run_records_provenance(models, tmp_path):
    from ser_cache.finetune.loop import finetune_wavlm
    from ser_cache.finetune.options import FinetuneConfig

    from finetune_support import learnable_corpus

    corpus = learnable_corpus(tmp_path / "corpus", n_train=8, n_dev=6, n_test=0)
    finetune_wavlm(FinetuneConfig(data=corpus, out=tmp_path / "ft", model=str(models["wavlm"]), epochs=1,
                                  batch_seconds=6, select="ccc", device="cpu", threads=1, progress=False))
    config = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert config["system"] == "finetuned-wavlm" and config["train"]["data"] == str(corpus)
    assert config["provenance"]["label_file"] == str(corpus / "Labels" / "labels_consensus.csv")
    assert config["provenance"]["torch"] and config["provenance"]["python"]
    r = invoke("train-heads", "--config", tmp_path / "ft", "--out", tmp_path / "no")
    assert r.exit_code == 2 and "a run made by `finetune wavlm`" in r.output


# --------------------------------------------------------------------------- the demo's last words


@pytest.mark.slow
def test_demo_names_workdir_and_prints_a_command_that_fits_and_runs(tmp_path, monkeypatch):
    import shlex

    from ser_cache import demo

    real = demo.run_demo
    monkeypatch.setattr(demo, "run_demo", lambda workdir=None, **kw: real(workdir, **{**kw, "n": 60, "epochs": 3}))
    r = invoke("demo", "--no-progress")
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "temporary folder" in text and "ser-cache demo --workdir DIR" in text

    monkeypatch.chdir(tmp_path)  # the paths are printed as typed: short enough to fit, long enough to break
    workdir = Path("a-folder-with-a-name-long-enough-to-need-two-lines")
    r = invoke("demo", "--workdir", workdir, "--no-progress")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith("  ser-cache evaluate "))
    command = []
    for line in lines[start:]:
        assert len(line) <= 80, line
        command.append(line.removesuffix(" \\").strip())
        if not line.endswith(" \\"):
            break
    words = shlex.split(" ".join(command))
    assert len(command) > 1 and words == ["ser-cache", "evaluate", str(workdir / "run"), "--data",
                                          str(workdir / "corpus"), "--split", "Test1"]
    r = invoke(*words[1:], "--device", "cpu")
    assert r.exit_code == 0 and "Test1" in r.output, r.output
