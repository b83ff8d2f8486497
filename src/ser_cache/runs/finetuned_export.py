"""`ser-cache export RUN --merged`: a run of adapters and heads (`--lora`, `--freeze-encoder`) written as a
run that holds its whole encoder, the adapters merged into the dense weights (W + B A · alpha / r).

The merged run needs no base model to load (its config.json says "weights": "run" and has no "lora"),
predicts what the adapter run predicts (to float rounding), and can travel without the hub. It records
what it was merged from ("merged_from": the source run, its base model id and revision, the LoRA spec).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ser_cache.runs import layout

# Files of a finished run that the merged run carries over unchanged (the weights and config are new).
CARRIED = (layout.METRICS, layout.HISTORY, layout.DEV_PREDICTIONS, layout.DEV_CLASS_PREDICTIONS, "curves.png")


def export_merged(run_dir: Path, out: Path, *, overwrite: bool = False) -> Path:
    """Write the merged run of `run_dir` at `out`; returns `out`. RunError when the run is not an adapter run."""
    from ser_cache.infra import atomic
    from ser_cache.runs import rundir, staging
    from ser_cache.runs.finetuned_run import load_finetuned
    from ser_cache.system.online import WEIGHTS_FROM_BASE, encoder_weights_kept
    from ser_cache.system.online_kinds import kind_of

    run_dir = Path(run_dir)
    config = rundir.read_config(run_dir)
    kind = kind_of(config)
    if kind is None:
        raise layout.RunError(f"{run_dir}: --merged takes a fine-tuned run (finetune wavlm|whisper); this one is "
                              f"{config.get('system', 'heads on cached features')!r}")
    arch = dict(config[kind.name])
    if encoder_weights_kept(arch) != WEIGHTS_FROM_BASE:
        raise layout.RunError(f"{run_dir}: the run holds its whole encoder already (no adapters to merge)")
    model = load_finetuned(run_dir, config)
    spec = arch.pop("lora", None)
    if spec is not None:
        from ser_cache.system.lora import merge_lora

        merge_lora(model.encoder, spec)
    arch.pop("weights", None)
    arch["merged_from"] = {"run": str(run_dir.resolve()), "model_id": arch["model_id"], "revision": arch["revision"],
                           "lora": spec}
    tensors = rundir.read_weights(run_dir / layout.WEIGHTS)
    state = {**model.state_dict(), **{k: v for k, v in tensors.items() if k.startswith("aam.")}}
    merged = {**config, kind.name: arch}
    with staging.staged_run_dir(out, overwrite) as tmp:
        rundir.write_weights(Path(tmp) / layout.WEIGHTS, state)
        for name in CARRIED:
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, Path(tmp) / name)
        atomic.write_json_atomic(Path(tmp) / layout.CONFIG, merged)
    return Path(out)
