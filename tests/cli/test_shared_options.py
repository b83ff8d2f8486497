"""cli.shared_options: the options every training recipe shares, spliced once into each command."""

from __future__ import annotations

import typer
from typer.testing import CliRunner

from ser_cache.cli import shared_options as shared
from ser_cache.cli.app import app
from ser_cache.system.options import TrainingOptions


def test_the_groups_stand_where_their_placeholder_stood_and_arrive_as_dicts():
    seen = {}

    @shared.training_options
    def command(first: int = typer.Option(1), objective: dict | None = None, middle: int = typer.Option(2),
                task_options: dict | None = None, last: int = typer.Option(3)):
        seen.update(first=first, objective=objective, middle=middle, task_options=task_options, last=last)

    names = [p.name for p in typer.main.get_command(_one(command)).params]
    objective = [n for n, _, _ in shared.OBJECTIVE_OPTIONS]
    task = [n for n, _, _ in shared.TASK_OPTIONS]
    assert names == ["first", *objective, "middle", *task, "last"]

    result = CliRunner().invoke(_one(command), ["--gender-weight", "0.5", "--task", "both", "--middle", "7"])
    assert result.exit_code == 0, result.output
    assert seen["objective"]["gender_weight"] == 0.5 and seen["task_options"]["task"] == "both"
    assert seen["objective"]["hidden"] == TrainingOptions.hidden and seen["middle"] == 7
    assert set(seen["objective"]) == set(objective) and set(seen["task_options"]) == set(task)


def test_the_three_recipes_take_both_groups_in_one_order():
    commands = {c.name: c for c in typer.main.get_command(app).commands.values()}
    wavlm = commands["finetune"].commands["wavlm"]
    for cmd in (commands["train-heads"], commands["sweep"], wavlm):
        names = [p.name for p in cmd.params]
        for group in shared.OPTION_GROUPS.values():
            members = [n for n, _, _ in group]
            start = names.index(members[0])
            assert names[start:start + len(members)] == members, cmd.name
        assert not {"objective", "task_options"} & set(names)


def test_recipe_config_reads_the_groups():
    options = {"features": ["a.zarr"], "data": "d", "out_dir": "o", "memory_budget": None,
               "objective": {n: d for n, _, d in shared.OBJECTIVE_OPTIONS} | {"gender_weight": 0.25},
               "task_options": {n: d for n, _, d in shared.TASK_OPTIONS} | {"task": "categorical"}}
    cfg = shared.heads_config(options)
    assert cfg.gender_weight == 0.25 and cfg.task == "categorical" and cfg.undersample == TrainingOptions.undersample


def _one(command):
    one = typer.Typer(add_completion=False)
    one.command()(command)
    return one
