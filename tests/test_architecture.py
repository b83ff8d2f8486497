"""The package's shape (docs/architecture.md): stage packages import only downward, and no module
imports itself back through others. Every import counts, top-level and inside functions alike."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# The allowed order, lowest first: a module may import modules of its own layer or of lower ones.
# version.py and infra/ stand under everything; api.py and demo.py use the whole library; the CLI
# and the package's root (which offers the Python API) sit on top.
LAYERS = ["version", "infra", "data", "encoders", "features", "system", "runs", "train", "finetune",
          "api", "demo", "cli", "__main__", "__init__"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / "ser_cache").rglob("*.py"))}


def layer(module: str) -> str:
    """ser_cache.features.store -> "features"; ser_cache.api -> "api"; ser_cache -> "__init__"."""
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def imports(path: Path, known: set[str]) -> set[str]:
    """The ser_cache modules `path` imports, wherever the import statement stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "ser_cache"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "ser_cache":
            for a in node.names:  # `from ser_cache.runs import rundir` imports the module ser_cache.runs.rundir
                found.add(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module)
    return {m for m in found if m in known}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(p, set(mods)) - {m} for m, p in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_every_module_belongs_to_a_layer():
    assert {layer(m) for m in modules()} <= set(LAYERS), sorted({layer(m) for m in modules()} - set(LAYERS))


def test_no_module_imports_upward():
    upward = sorted(f"{m} -> {t}" for m, targets in graph().items() for t in targets
                    if LAYERS.index(layer(t)) > LAYERS.index(layer(m)))
    assert upward == []


def test_no_import_circles():
    assert cycles(graph()) == []


def test_the_checks_see_what_they_check():
    # The finders themselves: a lazy import inside a function is an edge; a circle of three is one component.
    edges = graph()
    assert "ser_cache.runs.predict" in edges["ser_cache.cli.stage_two"]  # imported inside the command only
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
