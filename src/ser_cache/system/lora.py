"""LoRA on a fine-tuned encoder, through peft: which layers and modules, the adapters added, checked.

The challenge winner's Whisper models (vox-profile-release, whisper_emotion_dim.py) replace `fc1`
and `fc2` of the encoder layers with index > L // 2 by loralib's `lora.Linear(in, out, r=16)`:
loralib's lora_alpha defaults to 1, so the update is W x + (B A x) · (1 / 16); A starts
Kaiming-uniform, B at zero; everything else of the encoder is frozen. peft's LoraConfig(r=16,
lora_alpha=1, lora_dropout=0, use_rslora=False) computes the same (peft/tuners/lora/layer.py:
scaling = lora_alpha / r; lora_B zeros; lora_A kaiming_uniform_(a=√5)), so `--lora 16` with the
defaults below is their model. The spec is recorded in a run's config.json (`"lora"`) and rebuilt
from it alone.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import nn

from ser_cache.system.errors import TrainError

LORA_EXTRA = "lora"  # pip install 'ser-cache[lora]'
ADAPTER = "default"  # peft's adapter name: keys "...fc1.lora_A.default.weight"
UPPER_HALF, ALL_LAYERS = "upper-half", "all"
# The modules LoRA goes on by default, per encoder kind: the feed-forward block of each layer.
DEFAULT_TARGETS = {"whisper": ("fc1", "fc2"),
                   "wavlm": ("feed_forward.intermediate_dense", "feed_forward.output_dense")}
DEFAULT_ALPHA = 1.0  # loralib's default, the authors' (scaling 1/16 at rank 16)


def require_peft():
    """The peft package, or one clear line naming the extra that installs it."""
    try:
        import peft
    except ImportError:
        raise TrainError(f"--lora needs the peft package: pip install 'ser-cache[{LORA_EXTRA}]'") from None
    return peft


def layer_indices(spec: str, n_layers: int) -> list[int]:
    """--lora-layers: `upper-half` (index > L // 2, the authors': layers 17..31 of 32), `all`, or a
    comma-separated list of indices and ranges (`0,4-7`). Raises ValueError naming the bad part."""
    spec = spec.strip()
    if spec == UPPER_HALF:
        return [i for i in range(n_layers) if i > n_layers // 2]
    if spec == ALL_LAYERS:
        return list(range(n_layers))
    out: set[int] = set()
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise ValueError(f"'{part}' is not an index or a range (e.g. 0,4-7)")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if lo > hi or hi >= n_layers:
            raise ValueError(f"'{part.strip()}' is outside the encoder's layers 0-{n_layers - 1}")
        out.update(range(lo, hi + 1))
    return sorted(out)


def lora_spec(kind: str, encoder: nn.Module, n_layers: int, *, rank: int, alpha: float | None = None,
              dropout: float = 0.0, targets: tuple[str, ...] | None = None, layers: str = UPPER_HALF) -> dict:
    """The recorded spec (config.json "lora"): rank, alpha, dropout and the full module names, each
    checked to be an nn.Linear of `encoder`."""
    try:
        indices = layer_indices(layers, n_layers)
    except ValueError as exc:
        raise TrainError(f"--lora-layers {layers}: {exc}") from None
    if not indices:
        raise TrainError(f"--lora-layers {layers}: no layer of the {kind} encoder's {n_layers} (upper-half takes "
                         f"those with index > {n_layers // 2}); give all or a list")
    targets = tuple(targets or DEFAULT_TARGETS[kind])
    linear = {name for name, m in encoder.named_modules() if isinstance(m, nn.Linear)}
    names = []
    for t in targets:
        found = [f"layers.{i}.{t}" for i in indices]
        missing = [n for n in found if not any(x == n or x.endswith("." + n) for x in linear)]
        if missing:
            raise TrainError(f"--lora-targets {t}: no linear layer {missing[0]} in the {kind} encoder "
                             f"(e.g. {', '.join(DEFAULT_TARGETS[kind])})")
        names += found
    return {"rank": int(rank), "alpha": float(DEFAULT_ALPHA if alpha is None else alpha), "dropout": float(dropout),
            "targets": names, "layers": indices}


def add_lora(encoder: nn.Module, spec: Mapping) -> None:
    """Put LoRA adapters on `encoder` in place as `spec` says (lora_spec); only the adapters train."""
    peft = require_peft()
    config = peft.LoraConfig(r=int(spec["rank"]), lora_alpha=float(spec["alpha"]), lora_dropout=float(spec["dropout"]),
                             target_modules=list(spec["targets"]), use_rslora=False, bias="none",
                             init_lora_weights=True)
    peft.inject_adapter_in_model(config, encoder, adapter_name=ADAPTER)
    for name, p in encoder.named_parameters():
        p.requires_grad_(".lora_" in name)


def trainable_count(encoder: nn.Module) -> int:
    return sum(p.numel() for p in encoder.parameters() if p.requires_grad)


def adapter_count(spec: Mapping, linear_shapes: Mapping[str, tuple[int, int]]) -> int:
    """The adapters' parameter count from the spec and each target's (in, out) features: r · (in + out)."""
    return sum(int(spec["rank"]) * (i + o) for name, (i, o) in linear_shapes.items()
               if any(name == t or name.endswith("." + t) for t in spec["targets"]))


def merge_lora(encoder: nn.Module, spec: Mapping) -> None:
    """Fold every adapter of `spec` into its dense layer (W + B A · alpha / r, peft's merge) and put the plain
    nn.Linear back in its place: the encoder is then the stock model with merged weights."""
    require_peft()
    modules = dict(encoder.named_modules())
    for name, module in list(modules.items()):
        if not hasattr(module, "base_layer") or not hasattr(module, "lora_A"):
            continue
        if not any(name == t or name.endswith("." + t) for t in spec["targets"]):
            continue
        module.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else encoder, child, module.get_base_layer())
