"""Every `ser-cache ...` command written in the README and docs names a command that exists, with
options that command has: documentation that drifts from the code sends users into errors."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _command_lines(text: str) -> list[str]:
    """`ser-cache ...` invocations: lines of fenced code blocks and inline code spans, continuations joined."""
    found = []
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
    prose = re.sub(r"```[a-z]*\n.*?```", "", text, flags=re.S)
    command = r"(?:torchrun [^`\n]*?-m ser_cache|ser-cache)\s+([^`\n]*)"
    for block in blocks:
        for m in re.finditer(r"^\s*" + command, block.replace("\\\n", " "), re.M):
            found.append(m.group(1))
    for m in re.finditer(r"`" + command + r"`", prose):
        found.append(m.group(1))
    return [f.split("#")[0].split("|")[0].strip() for f in found if f.strip()]


def _click_app():
    import typer

    from ser_cache.cli.app import app

    return typer.main.get_command(app)


def _context(cmd):
    import typer

    return typer.Context(cmd)


def _resolve(group, words: list[str]):
    """(click command, the words after its name) for the longest command path in `words`."""
    cmd, rest = group, list(words)
    while hasattr(cmd, "get_command") and rest:  # a group (typer vendors its own click classes)
        sub = cmd.get_command(_context(cmd), rest[0])
        if sub is None:
            break
        cmd, rest = sub, rest[1:]
    return cmd, rest


def _documented():
    for doc in DOCS:
        for line in _command_lines(doc.read_text(encoding="utf-8")):
            yield doc.relative_to(ROOT), line


def test_docs_name_commands():
    assert sum(1 for _ in _documented()) > 50  # the parser still finds the commands


@pytest.mark.parametrize(("doc", "line"), sorted(set(_documented())), ids=lambda v: str(v)[:60])
def test_documented_command_has_its_options(doc, line):
    try:
        words = shlex.split(line)
    except ValueError:
        words = line.split()
    cmd, rest = _resolve(_click_app(), words)
    assert not hasattr(cmd, "get_command") or not rest or rest[0].startswith("-"), \
        f"{doc}: `ser-cache {line}`: no command {rest[0]!r}"
    known = {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)} | {"--help"}
    if words[:1] == ["slurm"] and len(words) > 1:
        # `slurm extract [Slurm options] [--] [extract's options]`: after `--`, only extract's options.
        target, _ = _resolve(_click_app(), words[1:2])
        forwarded = {opt for p in target.params for opt in (*p.opts, *p.secondary_opts)}
        if "--" in rest:
            cut = rest.index("--")
            flags = [w.split("=")[0] for w in rest[cut + 1:] if w.startswith("--")]
            unknown = [f for f in flags if f not in forwarded]
            assert not unknown, f"{doc}: `ser-cache {line}`: {target.name} has no option(s) {', '.join(unknown)}"
            rest = rest[:cut]
        known |= forwarded
    flags = [w.split("=")[0] for w in rest if w.startswith("--")]
    unknown = [f for f in flags if f not in known]
    assert not unknown, f"{doc}: `ser-cache {line}`: {cmd.name} has no option(s) {', '.join(unknown)}"


# --------------------------------------------------------------------------- module paths the docs name

# `ser_cache.runs.rundir.load_run`, `ser_cache.features.store`: a dotted path in the README or a doc
# page (benchmarks' README too) names a module, or a module and attributes of it.
MODULE_PATH = re.compile(r"\bser_cache(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
PATH_DOCS = DOCS + [ROOT / "benchmarks" / "README.md"]


def _named_paths():
    for doc in PATH_DOCS:
        for path in sorted(set(MODULE_PATH.findall(doc.read_text(encoding="utf-8")))):
            yield doc.relative_to(ROOT), path


def resolve_path(path: str):
    """Import the longest module prefix of `path`, then look the rest up as attributes; raise if either fails."""
    import importlib

    parts = path.split(".")
    for k in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:k]))
        except ModuleNotFoundError:
            continue
        for name in parts[k:]:
            obj = getattr(obj, name)
        return obj
    raise ModuleNotFoundError(path)


def test_docs_name_module_paths():
    assert len(list(_named_paths())) > 5  # the pattern finds what the docs write


@pytest.mark.parametrize("doc, path", list(_named_paths()), ids=lambda v: str(v))
def test_every_module_path_the_docs_name_exists(doc, path):
    try:
        resolve_path(path)
    except (ModuleNotFoundError, AttributeError) as exc:
        pytest.fail(f"{doc} names {path}, which does not exist ({exc})")


def test_a_path_that_does_not_exist_is_caught():
    for wrong in ("ser_cache.training", "ser_cache.runs.rundir.no_such_function"):
        with pytest.raises((ModuleNotFoundError, AttributeError)):
            resolve_path(wrong)


# --------------------------------------------------------------------------- docs/architecture.md

ARCHITECTURE = ROOT / "docs" / "architecture.md"
PACKAGES = ("infra", "data", "encoders", "features", "system", "runs", "train", "finetune", "cli")


def _architecture_table() -> dict[str, set[str]]:
    """{package: the modules its row of the table lists}."""
    rows = re.findall(r"^\| `(\w+)/` \| ([^|]+) \|", ARCHITECTURE.read_text(encoding="utf-8"), re.M)
    return {package: set(re.findall(r"`(\w+)`", modules)) for package, modules in rows}


def test_the_architecture_page_lists_every_module_of_every_package():
    src = ROOT / "src" / "ser_cache"
    table = _architecture_table()
    assert set(table) == set(PACKAGES)
    for package, listed in table.items():
        modules = {p.stem for p in (src / package).glob("*.py")} - {"__init__"}
        assert listed - {"__init__"} == modules, f"docs/architecture.md's row of {package}/"


def test_the_module_paths_the_architecture_page_writes_short_exist():
    """`system.rows`, `runs.gather`, ...: written without the ser_cache prefix in the prose."""
    text = ARCHITECTURE.read_text(encoding="utf-8")
    packages = "|".join(PACKAGES)
    short = set(re.findall(rf"`((?:{packages})\.[\w.]+)", text))
    assert len(short) > 5
    for path in sorted(short):
        try:
            resolve_path(f"ser_cache.{path}")
        except (ModuleNotFoundError, AttributeError) as exc:
            pytest.fail(f"docs/architecture.md names {path}, which does not exist ({exc})")
