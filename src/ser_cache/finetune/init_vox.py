"""`finetune whisper --init-from` a run imported from the authors' Whisper checkpoint (`import vox-profile`):
continue their model, adapters included.

The import makes a frozen-feature run (its own encoder with the adapters merged, `encoder/`; the
convolutions and heads in model.safetensors) and keeps the loralib pairs unmerged beside it
(`lora_adapters.safetensors`, their keys). Here the online Whisper model takes:
- the encoder's weights from `encoder/`, each dense layer that carries an adapter put back to its
  base, W = W_merged − B A · alpha / r (the import merged W + B A · alpha / r; float rounding apart,
  this is their W), and the first 750 rows of the positional table (their 15-s window);
- the adapters as peft's lora_A / lora_B, at the authors' scaling (alpha 1 / r);
- the convolutions (`pools.0.convs.*` → `pool.convs.*`) and heads; the heads' label range stays
  this run's (as for every --init-from), a gender head only where both have one of the same size.
So the first step starts from their predictions, and only their adapters, convolutions and heads train.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from ser_cache.system.errors import TrainError

log = logging.getLogger(__name__)


def imported_whisper(run_dir: Path) -> dict | None:
    """config.json of a run imported from the authors' Whisper checkpoint, else None."""
    from ser_cache.runs import rundir

    config = rundir.read_config(run_dir)
    imported = config.get("imported")
    if not isinstance(imported, dict):
        return None
    wrapper = imported.get("wrapper") or {}
    return config if str(wrapper.get("pretrain_model", "")).startswith("whisper") else None


def their_lora_spec(config: dict, n_layers: int) -> dict | None:
    """The authors' LoRA as system.lora records it (rank from their pairs, alpha 1, fc1/fc2 of the upper half)."""
    block = config["imported"].get("lora_adapters")
    if not block:
        return None
    layers = [i for i in range(n_layers) if i > n_layers // 2]
    return {"rank": int(block["rank"]), "alpha": float(block["alpha"]), "dropout": 0.0,
            "targets": [f"layers.{i}.{fc}" for fc in ("fc1", "fc2") for i in layers], "layers": layers}


def check_lora_matches(cfg, spec: dict | None, run_dir: Path) -> None:
    """The options must build the authors' adapters (or none, for their models without LoRA)."""
    if spec is None:
        if cfg.lora:
            return  # fresh adapters on their fully fine-tuned encoder
        return
    if not cfg.lora or cfg.lora != spec["rank"] or (cfg.lora_layers or "upper-half") != "upper-half" \
            or (cfg.lora_targets and tuple(cfg.lora_targets) != ("fc1", "fc2")) \
            or (cfg.lora_alpha is not None and cfg.lora_alpha != spec["alpha"]):
        raise TrainError(f"--init-from {run_dir}: the run holds the authors' LoRA adapters (rank {spec['rank']}, "
                         f"alpha {spec['alpha']:g}, fc1/fc2 of the upper half); continue them with --lora "
                         f"{spec['rank']} and the default --lora-alpha, --lora-targets and --lora-layers")


def init_from_imported(model, run_dir: Path, config: dict, spec: dict | None) -> None:
    """Load the imported run into `model` (a WhisperEmotionModel, adapters already added as `spec`)."""
    import torch
    from safetensors.torch import load_file

    from ser_cache.runs import layout
    from ser_cache.runs.vox_profile import ENCODER_DIR, LORA_ADAPTERS

    run_dir = Path(run_dir)
    encoder_file = run_dir / ENCODER_DIR / "model.safetensors"
    if not encoder_file.is_file():
        raise TrainError(f"--init-from {run_dir}: {ENCODER_DIR}/model.safetensors is missing")
    theirs = {k.removeprefix("encoder."): v for k, v in load_file(str(encoder_file)).items()
              if k.startswith("encoder.")}
    ours = model.whisper.state_dict()
    take, problems = {}, []
    adapters = load_file(str(run_dir / LORA_ADAPTERS)) if spec is not None else {}
    scale = spec["alpha"] / spec["rank"] if spec is not None else 0.0
    for key, value in ours.items():
        if ".lora_" in key:
            m = re.fullmatch(r"(.+)\.lora_([AB])\.default\.weight", key)
            src = f"backbone_model.encoder.{m.group(1)}.lora_{m.group(2)}" if m else None
            if src not in adapters or adapters[src].shape != value.shape:
                problems.append(key)
                continue
            take[key] = adapters[src]
            continue
        name = key.replace(".base_layer.", ".")
        if name not in theirs:
            problems.append(key)
            continue
        w = theirs[name]
        if name == "embed_positions.weight" and w.shape[0] <= value.shape[0]:
            w = torch.cat([w, value[w.shape[0]:]])  # their 750-row window; the rest is never read in it
        if ".base_layer.weight" in key:  # un-merge: W = W_merged - B A · alpha / r
            stem = "backbone_model.encoder." + key.removesuffix(".base_layer.weight")
            a, b = adapters[stem + ".lora_A"].double(), adapters[stem + ".lora_B"].double()
            w = (w.double() - (b @ a) * scale).to(w.dtype)
        if w.shape != value.shape:
            problems.append(key)
            continue
        take[key] = w
    if problems:
        raise TrainError(f"--init-from {run_dir}: its encoder does not fit --model's ({', '.join(problems[:4])}); "
                         "give --model the backbone it was trained from (e.g. whisper-large-v3)")
    model.whisper.load_state_dict(take, strict=True)

    rest = load_file(str(run_dir / layout.WEIGHTS))
    state = {}
    for key, value in rest.items():
        if key.startswith("pools.0.convs."):
            state["pool." + key.removeprefix("pools.0.")] = value
        elif key.startswith("heads.") and not key.endswith((".lo", ".hi")):
            state[key] = value
    mine = model.state_dict()
    skipped = [k for k, v in state.items() if k not in mine or mine[k].shape != v.shape]
    wanted = [k for k in mine if k.startswith(("pool.", "heads.regressors.")) and not k.endswith((".lo", ".hi"))]
    missing = [k for k in wanted if k not in state]
    if missing or [k for k in skipped if not k.startswith(("heads.gender.", "heads.classifier.", "heads.speaker."))]:
        raise TrainError(f"--init-from {run_dir}: its convolutions and heads do not fit this model "
                         f"({', '.join((missing + skipped)[:4])}); give --conv-dim and --hidden as the run has them")
    model.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=False)
    if skipped:
        log.info("--init-from %s: %s start afresh", run_dir, ", ".join(sorted({k.split(".")[1] for k in skipped})))
