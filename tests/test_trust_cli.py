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

from ser_cache.cli import app
from ser_cache.cli import shared_options as shared
from test_training import make_corpus, make_store

SRC = Path(__file__).resolve().parents[1] / "src"
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
from ser_cache.cli import main
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
    "OxMode": ("ser_cache.sampling", "OX_MODES"),
    "SelectMode": ("ser_cache.training", "SELECT_MODES"),
    "HeadsPrecisionMode": ("ser_cache.training", "PRECISIONS"),
    "EncoderPrecisionMode": ("ser_cache.encoders.base", "PRECISIONS"),
    "TranscribePrecisionMode": ("ser_cache.transcribe", "PRECISIONS"),
    "PoolingMode": ("ser_cache.encoders.base", "POOLINGS"),
    "WindowMode": ("ser_cache.encoders.whisper", "WINDOWS"),
    "KindName": ("ser_cache.encoders", "KINDS"),
    "OnErrorMode": ("ser_cache.extract", "ON_ERROR"),
}


def test_the_clis_fixed_choices_are_the_librarys():
    import importlib

    for alias, (module, constant) in FIXED_CHOICES.items():
        assert typing.get_args(getattr(shared, alias)) == tuple(getattr(importlib.import_module(module), constant)), alias
    from ser_cache.transcribe import DEFAULT_MODEL

    assert shared.TRANSCRIBE_MODEL == DEFAULT_MODEL


def test_fixed_choices_are_shown_and_checked_before_any_work(tmp_path):
    r = invoke("train-heads", "--help")
    assert "--ox <keep|drop|only|train+dev|train+dev-nonox>" in r.output
    assert "--select <balanced|ccc>" in r.output and "--precision <auto|fp32|bf16>" in r.output
    r = invoke("extract", "--help")
    assert "<mean|mean+std|frames>" in r.output and "<whisper|wavlm|xvector|text>" in r.output
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
    from ser_cache.finetune import FinetuneConfig
    from ser_cache.training import TrainHeadsConfig

    defaults = {}
    for words, cmd in commands():
        if words in (("train-heads",), ("sweep",), ("finetune", "wavlm")):
            params = {p.name: p.default for p in cmd.params}
            defaults[words] = (params["gender_weight"], params["speaker_weight"])
    assert set(defaults.values()) == {(1.0, 0.1)}, defaults
    for config in (TrainHeadsConfig, FinetuneConfig):
        fields = config.__dataclass_fields__
        assert (fields["gender_weight"].default, fields["speaker_weight"].default) == (1.0, 0.1), config
