"""The package's shape (docs/architecture.md): stage packages import only downward, and no module
imports itself back through others. Every import counts, top-level and inside functions alike.
And every module has tests: a file of its own name, or test files named in COVERED_BY."""

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


# --------------------------------------------------------------------------- every module has tests

TESTS = Path(__file__).resolve().parent

# The modules without a test file of their own name (tests/<package>/test_<module>.py, or
# tests/test_<module>.py for a top-level module): the test files that cover them, and how.
COVERED_BY: dict[str, tuple[tuple[str, ...], str]] = {
    "ser_cache.features.size_estimate": (("features/test_frames_extract.py", "features/test_extract.py"),
                                        "the size extract prints before a layered or frame store"),
    "ser_cache.features.store_lock": (("features/test_trust_stores.py", "features/test_damaged.py",
                                      "features/test_extract_shards.py"),
                                     "one writer per store, a stale lock taken over, shards side by side"),
    "ser_cache.features.shard_progress": (("features/test_extract_shards.py",),
                                         "shards partition the chunks; per-shard progress in info"),
    "ser_cache.features.text_record": (("data/test_trust_text.py", "features/test_extract.py"),
                                      "which text feeds which row, refused when a written row would change"),
    "ser_cache.system.layer_choice": (("train/test_probe.py", "features/test_frames_extract.py"),
                                      "--layer K checked against the held layers, pooled and frame inputs"),
    "ser_cache.api": (("test_python_api.py",), "docs/python.md's examples, run as written"),
    "ser_cache.cli.app": (("cli/test_stage_one.py", "cli/test_stage_two.py", "e2e/test_faults.py"),
                          "the commands through the app, one-line errors and exit codes, python -m"),
    "ser_cache.cli.bench": (("features/test_bench.py",), "a tiny bench run through the CLI"),
    "ser_cache.cli.slurm": (("cli/test_slurm_cli.py",), "the script of each command, its options checked first"),
    "ser_cache.cli.demo": (("test_demo.py",), "`ser-cache demo` end to end"),
    "ser_cache.cli.finetune": (("finetune/test_loop.py", "cli/test_rough_edges.py"),
                               "finetune wavlm's arguments in a subprocess (resume), --lr"),
    "ser_cache.finetune.build": (("finetune/test_online.py",), "the model of every encoder component, LoRA, frozen"),
    "ser_cache.finetune.init_vox": (("finetune/test_online.py",), "--init-from the authors' imported Whisper"),
    "ser_cache.system.online": (("finetune/test_online.py", "finetune/test_loop.py"),
                                "the online model's interface, what trains and what a run keeps"),
    "ser_cache.system.online_kinds": (("finetune/test_online.py",), "WavLM and Whisper runs built and loaded"),
    "ser_cache.system.whisper_finetuned": (("finetune/test_online.py",), "a Whisper run trained and predicted"),
    "ser_cache.runs.finetuned_export": (("finetune/test_online.py",), "export RUN --merged against the adapter run"),
    "ser_cache.system.lora": (("finetune/test_online.py",), "peft's LoRA against loralib's formula"),
    "ser_cache.cli.imports": (("runs/test_vox_profile.py",), "`import vox-profile` through the app"),
    "ser_cache.cli.probe": (("train/test_probe.py",), "the probe-layers command end to end"),
    "ser_cache.cli.plot": (("runs/test_plots.py", "features/test_trust_stores.py"), "the plot commands"),
    "ser_cache.cli.rerun": (("cli/test_trust_cli.py",), "train-heads --config reruns a run's settings"),
    "ser_cache.cli.submission": (("runs/test_submission.py",), "check-submission through the app"),
    "ser_cache.cli.sweep": (("train/test_sweep.py",), "the sweep command"),
    "ser_cache.cli.transcribe": (("features/test_transcribe.py",), "the transcribe command, its summary"),
    "ser_cache.data.batching": (("finetune/test_loop.py", "e2e/test_faults.py"),
                                "the batch plan and each rank's share; the loader's workers killed"),
    "ser_cache.encoders.base": (("encoders/test_encoders.py", "features/test_extract.py"),
                                "what every encoder kind shares, through each kind"),
    "ser_cache.encoders.text": (("encoders/test_encoders.py",), "the text kind against the stock model"),
    "ser_cache.encoders.wavlm": (("encoders/test_encoders.py",), "the WavLM kinds against the stock model"),
    "ser_cache.encoders.whisper": (("encoders/test_encoders.py",), "the Whisper kind against the stock model"),
    "ser_cache.finetune.checkpoint": (("finetune/test_loop.py", "finetune/test_trust_checkpoints.py"),
                                      "resume after kill -9, checkpoints refused in one line, --init-from"),
    "ser_cache.infra.environment": (("cli/test_stage_one.py",), "the torchaudio mismatch in one line"),
    "ser_cache.infra.locks": (("finetune/test_trust_checkpoints.py",), "one writer per run and store"),
    "ser_cache.infra.outputs": (("e2e/test_trust_outputs.py",), "no command writes over an input or a file"),
    "ser_cache.infra.progress": (("cli/test_rough_edges.py",), "progress lines at 80 columns, the rates"),
    "ser_cache.infra.statefile": (("finetune/test_trust_checkpoints.py",), "the checkpoint that cannot run code"),
    "ser_cache.infra.workers": (("features/test_extract.py", "e2e/test_faults.py"),
                                "decoding workers that die, killed runs leave no worker"),
    "ser_cache.runs.checkpoint_file": (("finetune/test_trust_checkpoints.py", "runs/test_plots.py"),
                                       "reading a checkpoint, checked; the curves of an unfinished run"),
    "ser_cache.runs.finetuned_run": (("finetune/test_loop.py", "features/test_damaged.py"),
                                     "predict/evaluate on a fine-tuned run; its damaged files named"),
    "ser_cache.runs.provenance": (("cli/test_trust_cli.py",), "a run's config records its provenance"),
    "ser_cache.runs.record": (("train/test_recipe.py",), "a complete run directory and its config.json"),
    "ser_cache.runs.rundir": (("train/test_recipe.py", "e2e/test_trust_outputs.py"),
                              "the run directory, loading a run, an interrupted --overwrite undone"),
    "ser_cache.runs.score_plots": (("runs/test_plots.py",), "the evaluation and ensemble plots"),
    "ser_cache.system.epoch_log": (("cli/test_rough_edges.py", "train/test_recipe.py"),
                                   "the epoch line, tensorboard, the history"),
    "ser_cache.system.finetuned": (("finetune/test_loop.py",), "the fine-tuned WavLM against transformers"),
    "ser_cache.system.model": (("train/test_frame_heads.py",), "ConvPool and FeatureModel against a re-statement"),
    "ser_cache.system.rows": (("system/test_device_data.py", "train/test_frame_heads.py"),
                              "rows placed on the device, frame rows read once per chunk"),
    "ser_cache.system.scoring": (("system/test_device_data.py",), "inference over placed rows"),
    "ser_cache.system.setup": (("system/test_device_data.py", "train/test_recipe.py"), "a run's set-up"),
    "ser_cache.train.fit": (("train/test_recipe.py", "system/test_device_data.py"), "heads learn; one epoch's index"),
    "ser_cache.train.options": (("train/test_recipe.py", "cli/test_trust_cli.py"), "options checked, shared defaults"),
    "ser_cache.train.peaks": (("features/test_bench.py",), "peak shapes, matmul rates, utilisation"),
    "ser_cache.train.stack": (("train/test_sweep.py",), "the stack of sweep members"),
    "ser_cache.train.sweep_summary": (("train/test_sweep.py",), "the sweep's summary"),
    "ser_cache.train.sweep_plan": (("train/test_sweep_shards.py",), "the plan file the shards of a sweep agree on"),
    "ser_cache.train.sweep_members": (("train/test_sweep.py", "train/test_sweep_shards.py"),
                                      "members reused or refused, stacked, a diverged member's record"),
    "ser_cache.data.manifest": (("data/test_corpus.py",), "the CSV manifest reader, its refusals"),
    "ser_cache.data.msp_podcast": (("data/test_corpus.py", "data/test_synth.py"), "the MSP-Podcast layout, Test3"),
    "ser_cache.data.records": (("data/test_corpus.py", "data/test_trust_text.py"),
                               "the checks both readers share: UTF-8, headers, scales, paths leaving the folder"),
    "ser_cache.features.decoding": (("features/test_extract.py", "features/test_trust_stores.py"),
                                    "the decoding pool: crashing decoders, Ctrl-C within a slice"),
    "ser_cache.features.encode": (("features/test_extract.py", "runs/test_predict.py"),
                                  "batching and compute_features, equal to what extract stores"),
    "ser_cache.features.errors": (("features/test_extract.py",), "ExtractError: a class, raised through extract"),
    "ser_cache.features.export": (("features/test_store.py", "features/test_damaged.py"), "export to HDF5"),
    "ser_cache.features.integrity": (("features/test_damaged.py", "features/test_trust_stores.py"),
                                     "damaged chunks and frame counts found and named"),
    "ser_cache.features.report": (("features/test_extract.py", "features/test_frames_extract.py"),
                                  "the errors table of a run with failures"),
    "ser_cache.features.transcriber": (("features/test_transcribe.py",), "Whisper's generate on a tiny model"),
    "ser_cache.features.transcript_table": (("features/test_transcribe.py", "data/test_trust_text.py",
                                            "features/test_transcribe_shards.py"),
                                           "the table, the journals (a cut record dropped), the sidecar; damaged "
                                           "ones refused in one line"),
    "ser_cache.features.transcribe_plan": (("features/test_transcribe.py", "infra/test_runtime.py"),
                                           "options checked, utterances selected, packing restarted at a batch"),
    "ser_cache.finetune.options": (("finetune/test_loop.py", "cli/test_trust_cli.py"), "finetune's options checked"),
    "ser_cache.runs.errors": (("runs/test_predict.py",), "PredictError: a class, raised through predict"),
    "ser_cache.runs.gather": (("runs/test_predict.py", "test_python_api.py"),
                              "a run's inputs from its stores or its encoders, encoders loaded once"),
    "ser_cache.runs.layout": (("train/test_recipe.py", "finetune/test_loop.py"), "what a run directory holds"),
    "ser_cache.runs.prediction_file": (("runs/test_predict.py", "runs/test_trust_predictions.py"),
                                       "the challenge's CSV written and read, bad values refused"),
    "ser_cache.runs.staging": (("e2e/test_trust_outputs.py",), "an interrupted --overwrite undone or reported"),
    "ser_cache.system.errors": (("train/test_recipe.py",), "TrainError: a class, raised through training"),
    "ser_cache.system.inputs": (("system/test_device_data.py", "train/test_frame_heads.py"),
                                "batches gathered from pooled and frame inputs, packed frames"),
    "ser_cache.system.options": (("cli/test_trust_cli.py", "train/test_recipe.py"),
                                 "the shared training options and their checks, the CLI's defaults"),
    "ser_cache.runs.vox_profile_checkpoint": (("runs/test_vox_profile.py",),
                                              "checkpoints in the authors' layout read, mapped and refused"),
    "ser_cache.version": (("cli/test_rough_edges.py",), "--version"),
}


def own_test_file(module: str) -> Path:
    """ser_cache.features.store -> tests/features/test_store.py; ser_cache.api -> tests/test_api.py."""
    *packages, name = module.split(".")[1:]
    return TESTS.joinpath(*packages, f"test_{name}.py")


def modules_to_cover() -> list[str]:
    """Every module but the packages' __init__ (re-exports) and __main__."""
    return [m for m, p in modules().items() if p.stem not in ("__init__", "__main__")]


def test_every_module_has_tests_of_its_own_or_is_named_in_one():
    untested = [m for m in modules_to_cover() if not own_test_file(m).is_file() and m not in COVERED_BY]
    assert untested == [], "add tests/<package>/test_<module>.py, or name the covering test files in COVERED_BY"
    missing = [f"{m}: {f}" for m, (files, _) in COVERED_BY.items() for f in files if not (TESTS / f).is_file()]
    assert missing == []
    stale = sorted(set(COVERED_BY) - set(modules_to_cover()))
    assert stale == [], "COVERED_BY names modules that no longer exist"


def private_uses(path: Path, known: set[str]) -> list[str]:
    """`from ser_cache.x import _name` and `module._name` where `module` is a ser_cache module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "ser_cache":
            for a in node.names:
                if f"{node.module}.{a.name}" in known:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
                elif a.name.startswith("_") and not a.name.startswith("__"):
                    found.append(f"line {node.lineno}: from {node.module} import {a.name}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name in known and a.asname:
                    aliases[a.asname] = a.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"line {node.lineno}: {aliases[node.value.id]}.{node.attr}")
    return found


def test_no_private_name_is_used_outside_its_module():
    mods = modules()
    uses = {m: private_uses(p, set(mods)) for m, p in mods.items()}
    assert {m: u for m, u in uses.items() if u} == {}


def test_private_uses_are_found(tmp_path):
    src = tmp_path / "x.py"
    src.write_text("from ser_cache.infra import atomic\nfrom ser_cache.infra.atomic import _hidden\natomic._other()\n")
    assert private_uses(src, {"ser_cache.infra.atomic"}) == ["line 2: from ser_cache.infra.atomic import _hidden",
                                                             "line 3: ser_cache.infra.atomic._other"]
