"""The authors' released checkpoints as they come (vox-profile-release's layout): their files, wrapper
config and weights, the LoRA merge, and how their tensors map onto a ser-cache run's heads and classes.
runs/vox_profile.py builds the run from them (its docstring describes the layout and the forward)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from ser_cache.system.tasks import class_codes

log = logging.getLogger(__name__)

BACKBONES = {  # the authors' pretrain_model → the encoder it was built from
    "wavlm_large": "microsoft/wavlm-large",
    "wavlm": "microsoft/wavlm-base-plus",
    "whisper_large": "openai/whisper-large-v3",
    "whisper_medium": "openai/whisper-medium",
    "whisper_small": "openai/whisper-small",
    "whisper_base": "openai/whisper-base",
    "whisper_tiny": "openai/whisper-tiny",
}

HEADS = {"arousal": "arousal_layer", "valence": "valence_layer", "dominance": "dominance_layer"}

IGNORED_PREFIXES = ("emotion_layer.", "detailed_out_layer.", "backbone_model.decoder.")

IGNORED_KEYS = ("embed_positions",)

LORA_ALPHA = 1.0  # loralib's default; lora.Linear(..., r=lora_rank) is how the authors build them

# The categorical models' 9-way emotion_layer, in the authors' order (src/example/categorized_emotion*.py).
AUTHORS_CLASSES = ("Anger", "Contempt", "Disgust", "Fear", "Happiness", "Neutral", "Sadness", "Surprise", "Other")

# authors' emotion_layer output index -> the corpus code (EmoClass) it is; the run's order is class_codes(9)
CLASS_MAP = {0: "A", 1: "C", 2: "D", 3: "F", 4: "H", 5: "N", 6: "S", 7: "U", 8: "O"}

CLASS_LAYER = "emotion_layer"

DETAILED_LAYER = "detailed_out_layer"


class ImportError_(Exception):
    """A checkpoint cannot be imported; the message names the file, key or option."""


def checkpoint_files(source: str) -> tuple[Path, Path, str]:
    """(config.json, model.safetensors, revision) of a local directory or a hub id (cache first)."""
    from ser_cache.encoders.base import EncoderError, resolve_model

    p = Path(source).expanduser()
    if p.is_dir():
        files = (p / "config.json", p / "model.safetensors")
        for f in files:
            if not f.is_file():
                raise ImportError_(f"{source}: no {f.name}; expected the authors' layout (config.json and "
                                   "model.safetensors saved by their WavLMWrapper/WhisperWrapper)")
        return files[0], files[1], _digest(files)
    if source.startswith(("/", "./", "../", "~")) or p.exists():
        raise ImportError_(f"{source}: no such directory (a local checkpoint is a directory holding "
                           "config.json and model.safetensors)")
    try:
        resolved = resolve_model(source, {})
    except EncoderError as exc:
        raise ImportError_(str(exc)) from None
    from huggingface_hub import hf_hub_download

    try:
        paths = [Path(hf_hub_download(resolved.source, name, local_files_only=resolved.local_only))
                 for name in ("config.json", "model.safetensors")]
    except Exception as exc:  # the hub client raises many kinds; one message for all
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ImportError_(f"{source}: the checkpoint could not be had ({reason}); on a machine with internet run "
                           f"`hf download {source} --local-dir DIR`, copy DIR here and pass it instead") from None
    revision = paths[0].parent.name if "snapshots" in paths[0].parts else _digest(paths)
    return paths[0], paths[1], revision


def _digest(files: Sequence[Path]) -> str:
    import hashlib

    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return "sha256:" + h.hexdigest()[:16]


def read_wrapper_config(path: Path) -> dict:
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ImportError_(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(config, dict) or "pretrain_model" not in config:
        raise ImportError_(f"{path}: no 'pretrain_model'; expected the authors' wrapper arguments "
                           f"(pretrain_model, hidden_dim, finetune_method, ...)")
    if config["pretrain_model"] not in BACKBONES:
        raise ImportError_(f"{path}: pretrain_model {config['pretrain_model']!r} is not one of "
                           f"{', '.join(BACKBONES)}")
    return config


def read_weights(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error type for a damaged file
        raise ImportError_(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0]})") from None


def lora_adapters(tensors: Mapping[str, Tensor], n_layers: int) -> dict[str, Tensor]:
    """The loralib pairs the authors' model uses (encoder layers > n_layers // 2), unmerged, under their
    own keys: what `finetune whisper --init-from` an imported run continues (finetune.init_vox)."""
    import re

    keep = {}
    for key, value in tensors.items():
        layer = re.search(r"\.layers\.(\d+)\.", key)
        if key.endswith((".lora_A", ".lora_B")) and layer is not None and int(layer.group(1)) > n_layers // 2:
            keep[key] = value.detach().clone().contiguous()
    return keep


def merge_lora(tensors: dict[str, Tensor], rank: int, n_layers: int,
               alpha: float = LORA_ALPHA) -> tuple[dict[str, Tensor], int]:
    """Fold loralib's lora_A/lora_B pairs into their dense weights: W + (B @ A) · alpha / r.

    That is what loralib's Linear computes (and, in eval mode, merges in place), so the merged
    dense layer gives the authors' outputs. The authors' code builds LoRA layers only in encoder
    layers i > n_layers // 2 and loads checkpoints non-strictly, so pairs found elsewhere have no
    effect there; they are dropped here too (with a warning). Returns the tensors and the pairs merged.
    """
    import re

    out = dict(tensors)
    merged = 0
    for key in [k for k in tensors if k.endswith(".lora_A")]:
        base = key.removesuffix(".lora_A")
        b_key, w_key = base + ".lora_B", base + ".weight"
        if b_key not in tensors or w_key not in tensors:
            raise ImportError_(f"LoRA weights {key} come without {b_key} or {w_key}")
        layer = re.search(r"\.layers\.(\d+)\.", key)
        if layer is None or int(layer.group(1)) <= n_layers // 2:
            log.warning("LoRA weights %s lie where the authors' model has no LoRA layer (encoder layers > %d "
                        "only); their code ignores them, and so does this import", base, n_layers // 2)
            del out[key], out[b_key]
            continue
        a, b = tensors[key].float(), tensors[b_key].float()
        r = a.shape[0]
        if rank and r != rank:
            log.warning("LoRA %s has rank %d, the config says %d; merging with the weights' rank", base, r, rank)
        w = tensors[w_key]
        out[w_key] = (w.float() + (b @ a) * (alpha / r)).to(w.dtype)
        del out[key], out[b_key]
        merged += 1
    return out, merged


def _weight_norm_names(key: str) -> str:
    """Older torch saved the WavLM positional convolution's weight norm as weight_g/weight_v."""
    return key.replace("conv.weight_g", "conv.parametrizations.weight.original0").replace(
        "conv.weight_v", "conv.parametrizations.weight.original1")


def split_weights(tensors: Mapping[str, Tensor], backbone_keys: set[str], *, predict_gender: bool,
                  whisper: bool) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(backbone state, head-side tensors by the authors' names); unknown or missing keys are errors."""
    backbone, rest, unknown = {}, {}, []
    for key, value in tensors.items():
        if key.startswith(IGNORED_PREFIXES) or key in IGNORED_KEYS:
            continue
        if key.startswith("backbone_model."):
            name = _weight_norm_names(key.removeprefix("backbone_model."))
            if whisper:
                if not name.startswith("encoder."):
                    unknown.append(key)
                    continue
            if name in backbone_keys:
                backbone[name] = value
            else:
                unknown.append(key)
            continue
        rest[key] = value
    expected = {f"model_seq.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")}
    expected |= {f"{layer}.{i}.{p}" for layer in HEADS.values() for i in (0, 2) for p in ("weight", "bias")}
    if predict_gender:
        expected |= {f"gender_layer.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    if not whisper:
        expected.add("weights")
    unknown += sorted(k for k in rest if k not in expected and k != "weights")
    missing = sorted(expected - set(rest)) + sorted(k for k in backbone_keys if k not in backbone
                                                     and not rebuilt(k))
    problems = []
    if unknown:
        problems.append(f"unknown key(s) {', '.join(sorted(unknown)[:8])}{' …' if len(unknown) > 8 else ''}")
    if missing:
        problems.append(f"missing key(s) {', '.join(missing[:8])}{' …' if len(missing) > 8 else ''}")
    if problems:
        raise ImportError_("; ".join(problems))
    return backbone, {k: v for k, v in rest.items() if k in expected}


def rebuilt(key: str) -> bool:
    """Parts of the backbone a checkpoint may omit: buffers transformers rebuilds, pre-training-only tables."""
    return key.endswith(("position_ids", "masked_spec_embed")) or key.startswith(("quantizer.", "project_"))


def head_state(rest: Mapping[str, Tensor], *, lo: float, hi: float, predict_gender: bool) -> dict[str, Tensor]:
    """The authors' heads and convolutions under ser-cache's names (heads.*, and the conv stack's convs.*)."""
    out: dict[str, Tensor] = {}
    for attr, layer in HEADS.items():
        for i, j in ((0, 0), (2, 3)):  # Linear–ReLU–Linear → ser-cache's Linear, ReLU, Dropout(0), Linear
            for p in ("weight", "bias"):
                out[f"heads.regressors.{attr}.mlp.{j}.{p}"] = rest[f"{layer}.{i}.{p}"]
        out[f"heads.regressors.{attr}.lo"] = torch.tensor(float(lo))
        out[f"heads.regressors.{attr}.hi"] = torch.tensor(float(hi))
    if predict_gender:
        for i, j in ((0, 0), (2, 3)):
            for p in ("weight", "bias"):
                out[f"heads.gender.{j}.{p}"] = rest[f"gender_layer.{i}.{p}"]
    for i in (0, 3, 6):
        for p in ("weight", "bias"):
            out[f"convs.{i}.{p}"] = rest[f"model_seq.{i}.{p}"]
    return out


def is_categorical(wrapper: Mapping, tensors: Mapping[str, Tensor]) -> bool:
    """A categorical checkpoint: its emotion_layer has one output per class of AUTHORS_CLASSES (9).
    (The dimensional checkpoints carry an untrained 4-way emotion_layer.)"""
    weight = tensors.get(f"{CLASS_LAYER}.2.weight")
    rows = int(weight.shape[0]) if weight is not None and weight.ndim == 2 else None
    declared = wrapper.get("output_class_num")
    if declared == len(AUTHORS_CLASSES) and rows != len(AUTHORS_CLASSES):
        raise ImportError_(f"{CLASS_LAYER}.2.weight: expected {len(AUTHORS_CLASSES)} rows (config.json "
                           f"output_class_num {declared}), got {None if weight is None else tuple(weight.shape)}")
    return rows == len(AUTHORS_CLASSES)


def run_class_order() -> list[int]:
    """For each class of the run, in class_codes(9)'s order, the authors' emotion_layer index it comes from."""
    index = {code: i for i, code in CLASS_MAP.items()}
    return [index[code] for code in class_codes(len(AUTHORS_CLASSES))]


def class_heads(tensors: Mapping[str, Tensor], hidden: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(the emotion_layer as ser-cache's class head, heads.classifier.*, its last layer's rows permuted
    onto the run's class order; the detailed_out_layer's tensors under the authors' names)."""
    names = {f"{layer}.{i}.{p}" for layer in (CLASS_LAYER, DETAILED_LAYER) for i in (0, 2) for p in ("weight", "bias")}
    present = {k for k in tensors if k.startswith((CLASS_LAYER + ".", DETAILED_LAYER + "."))}
    problems = []
    if present - names:
        problems.append(f"unknown key(s) {', '.join(sorted(present - names))}")
    if names - present:
        problems.append(f"missing key(s) {', '.join(sorted(names - present))}")
    else:
        first, last = tensors[f"{DETAILED_LAYER}.0.weight"], tensors[f"{DETAILED_LAYER}.2.weight"]
        if first.ndim != 2 or first.shape[1] != hidden or last.ndim != 2 or last.shape[1] != first.shape[0]:
            problems.append(f"{DETAILED_LAYER}: expected Linear({hidden}, h)–ReLU–Linear(h, n), got weights "
                            f"{tuple(first.shape)} and {tuple(last.shape)}")
    if problems:
        raise ImportError_("; ".join(problems))
    order = torch.tensor(run_class_order())
    state = {"heads.classifier.0.weight": tensors[f"{CLASS_LAYER}.0.weight"],
             "heads.classifier.0.bias": tensors[f"{CLASS_LAYER}.0.bias"],
             "heads.classifier.3.weight": tensors[f"{CLASS_LAYER}.2.weight"][order].clone(),
             "heads.classifier.3.bias": tensors[f"{CLASS_LAYER}.2.bias"][order].clone()}
    detailed = {k: tensors[k].contiguous() for k in sorted(names) if k.startswith(DETAILED_LAYER + ".")}
    return state, detailed
