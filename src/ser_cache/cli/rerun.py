"""`train-heads --config RUN/config.json`: a run's settings as the defaults of a new run.

The file's "train" options become the command's defaults (click's default_map), so an option
given on the command line wins and every value goes through the same conversion and checks as
one typed. What is no setting of the run is not taken: where it goes (--out), how this
invocation behaves (--overwrite, --progress, --tensorboard), what the run derived
("compute_dtype"), and its provenance (provenance.py; `provenance_notes` only says what differs).
"""

from __future__ import annotations

from pathlib import Path

from ser_cache.cli.app import fail

NOT_TAKEN = ("out", "overwrite", "progress", "tensorboard")
DERIVED = ("compute_dtype",)  # what the run computed from its options, recorded beside them
# The config's names that are not the command's parameter names (heads_config maps them the other way).
PARAM_NAMES = {"memory_budget_gb": "memory_budget", "undersample": "no_undersample"}


def run_config_file(path: Path) -> tuple[Path, dict]:
    """The checked config.json of a train-heads run (`path`: the file or its run directory)."""
    from ser_cache.runs import layout, rundir

    file = path / layout.CONFIG if path.is_dir() else path
    if not file.is_file():
        fail(f"--config {path}: no such file; give a train-heads run's config.json or its run directory")
    try:
        config = rundir.read_config_file(file)
    except layout.RunError as exc:
        fail(f"--config {exc}")
    if config.get("system") or "imported" in config:
        made_by = "finetune wavlm" if config.get("system") else "import vox-profile"
        fail(f"--config {file}: a run made by `{made_by}`, not by train-heads; give a train-heads run's config.json")
    if not isinstance(config.get("train"), dict):
        fail(f"--config {file}: has no \"train\" options; give a train-heads run's config.json")
    return file, config


def defaults_from_run(ctx, param, value: Path | None) -> Path | None:
    """The eager --config callback: the run's options as ctx.default_map, checked one by one."""
    import dataclasses

    from ser_cache.train.options import TrainHeadsConfig

    if value is None or ctx.resilient_parsing:
        return value
    file, config = run_config_file(Path(value))
    known = {f.name for f in dataclasses.fields(TrainHeadsConfig)}
    unknown = sorted(k for k in config["train"] if k not in known and k not in DERIVED)
    if unknown:
        fail(f"--config {file}: unknown option(s) in \"train\": {', '.join(unknown)}; the file was edited, or "
             "written by another version of ser-cache")
    params = {p.name: p for p in ctx.command.params}
    defaults = {}
    for key, setting in config["train"].items():
        if key in NOT_TAKEN or key in DERIVED or setting is None:
            continue
        name = PARAM_NAMES.get(key, key)
        if key == "undersample":
            setting = not setting if isinstance(setting, bool) else setting
        try:
            params[name].process_value(ctx, setting)
        except Exception as exc:  # click's BadParameter, or pydantic's error under typer's coercion
            message = getattr(exc, "message", None) or str(exc).splitlines()[0]
            fail(f"--config {file}: \"train\".{key} = {setting!r}: {message}")
        defaults[name] = setting
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def provenance_notes(path: Path, data: Path) -> list[str]:
    """What differs between the run's provenance and this rerun on `data`: the label file's digest,
    the git commit and the versions. The rerun goes ahead; these say why its numbers may not be the run's."""
    from ser_cache.runs import layout, provenance, rundir

    file = path / layout.CONFIG if path.is_dir() else path
    recorded = rundir.read_config_file(file).get("provenance")
    if not isinstance(recorded, dict):
        return []
    now = provenance.record(None)
    notes = [f"{key} {recorded.get(key)} then, {now[key]} now"
             for key in ("python", "torch", "transformers", "git_commit")
             if recorded.get(key) and now[key] and recorded.get(key) != now[key]]
    labels = provenance.label_file(data)
    if recorded.get("label_file_sha256") and labels.is_file() and \
            provenance.file_sha256(labels) != recorded["label_file_sha256"]:
        notes.insert(0, f"the label file {labels} differs from the one the run was trained on (sha256 "
                        f"{recorded['label_file_sha256'][:12]}…)")
    return notes
