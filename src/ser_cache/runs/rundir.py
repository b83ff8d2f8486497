"""A run's config.json and weights: config.json read and checked (format, version, the types of its
entries), model.safetensors written (the one writer of every run's weights) and read, and a heads
run loaded as a model (load_run). What a run directory holds: runs.layout; writing one into place:
runs.staging; a fine-tuned run's model: runs.finetuned_run."""

from __future__ import annotations

import json
from pathlib import Path

from ser_cache.infra.atomic import atomic_path
from ser_cache.runs.layout import CONFIG, RUN_FORMAT, RUN_FORMAT_VERSION, WEIGHTS, RunError
from ser_cache.runs.staging import recover_staging


def save_weights(directory: Path, model, aam=None) -> Path:
    """A FeatureModel's weights ('heads.*', 'pools.*', 'frame_weightings.*'; bare MultitaskHeads are saved as 'heads.*')
    and the AAM-softmax's ('aam.*'), in one safetensors file."""
    from ser_cache.system.model import FeatureModel

    state = model.state_dict()
    if not isinstance(model, FeatureModel):
        state = {f"heads.{k}": v for k, v in state.items()}
    return write_weights(Path(directory) / WEIGHTS, state, aam)


def write_weights(path: Path, state, aam=None) -> Path:
    """`state` (name → tensor) and the AAM-softmax's weights ('aam.*') as one safetensors file, atomically:
    the one writer of every run's weights (heads runs, fine-tuned runs, imported runs, checkpoints' best)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    if aam is not None:
        tensors.update({f"aam.{k}": v.detach().cpu().contiguous() for k, v in aam.state_dict().items()})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
    return Path(path)


def read_config(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    cfg_path = run_dir / CONFIG
    if not cfg_path.is_file():
        recover_staging(run_dir)
    if not cfg_path.is_file():
        raise RunError(f"{run_dir}: not a run directory (no {CONFIG}); train one with `ser-cache train-heads`")
    return read_config_file(cfg_path)


def read_config_file(cfg_path: Path) -> dict:
    """A run's config.json, checked: JSON, a run's format, a version this reader knows, entries' types."""
    try:
        config = json.loads(cfg_path.read_text())
    except (ValueError, OSError) as exc:
        raise RunError(f"{cfg_path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise RunError(f"{cfg_path}: expected a JSON object, found {type(config).__name__}")
    if config.get("format") != RUN_FORMAT:
        raise RunError(f"{cfg_path}: not a ser-cache run config (format={config.get('format')!r})")
    try:
        version = int(config.get("format_version", 0))
    except (TypeError, ValueError):
        raise RunError(f"{cfg_path}: \"format_version\" must be a whole number, found "
                       f"{config.get('format_version')!r}") from None
    if version > RUN_FORMAT_VERSION:
        raise RunError(f"{cfg_path}: run format version {config.get('format_version')} is newer than this "
                       f"ser-cache understands ({RUN_FORMAT_VERSION}); upgrade ser-cache")
    _check_config_types(cfg_path, config)
    return config


# What the readers of config.json take each entry to be, when present: a hand-edited value of
# another type must be refused here, naming the file, not fail as a TypeError deep in a reader.
CONFIG_TYPES: dict[str, tuple[type, ...]] = {
    "heads": (dict,),
    "train": (dict,),
    "inputs": (list,),
    "frame_inputs": (dict, type(None)),
    "gender_labels": (list, type(None)),
    "speakers": (list, dict, type(None)),
    "wavlm": (dict,),
    "whisper": (dict,),
}


def _check_config_types(cfg_path: Path, config: dict) -> None:
    names = {dict: "an object", list: "a list", type(None): "null"}
    for key, types in CONFIG_TYPES.items():
        if key in config and not isinstance(config[key], types):
            expected = " or ".join(names[t] for t in types)
            raise RunError(f"{cfg_path}: \"{key}\" must be {expected}, found {config[key]!r:.60}; "
                           "the file was edited or damaged: restore it, or train the run again")
    if isinstance(config.get("inputs"), list) and not all(isinstance(i, dict) for i in config["inputs"]):
        raise RunError(f"{cfg_path}: every entry of \"inputs\" must be an object; the file was edited or damaged")


def read_weights(weights: Path) -> dict:
    """The tensors of a run's model.safetensors; a RunError naming the file when it is truncated or damaged."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise RunError(f"{weights}: not a readable safetensors file "
                       f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                       "it is truncated or damaged: copy it again from where the run was trained, or train the run "
                       "again") from None


def load_run(run_dir: str | Path, *, device: str = "cpu"):
    """(model, config): the trained model.FeatureModel in eval mode on `device`, and config.json as a dict.

    The model takes {name: tensor} for pooled inputs and {name: (frames, lengths)} for frame
    inputs; a run without "frame_inputs" (every run before them) has no ConvPool, and its
    "heads.*" weights load as they always did. `model.heads` is the MultitaskHeads.
    """
    import torch

    from ser_cache.system.model import FeatureModel

    run_dir = Path(run_dir)
    config = read_config(run_dir)
    weights = run_dir / WEIGHTS
    if not weights.is_file():
        raise RunError(f"{run_dir}: {WEIGHTS} is missing; the run is incomplete")
    if "heads" not in config:
        raise RunError(f"{run_dir / CONFIG}: no \"heads\" entry; the file was edited or damaged: restore it, "
                       "or train the run again")
    try:
        model = FeatureModel.from_config(config["heads"], config.get("frame_inputs") or {})
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise RunError(f"{run_dir / CONFIG}: \"heads\" or \"frame_inputs\" do not describe a model "
                       f"({type(exc).__name__}: {exc}); the file was edited or damaged: restore it, "
                       "or train the run again") from None
    tensors = read_weights(weights)
    state = {k: v for k, v in tensors.items() if k.startswith(("heads.", "pools.", "frame_weightings."))}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise RunError(f"{weights}: weights do not fit the model in {CONFIG} ({str(exc).splitlines()[0]})") from None
    model.to(torch.device(device)).eval()
    return model, config
