"""A fine-tuned WavLM run: its weights loaded into the model and saved, and its predictions on audio."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ser_cache.data import audio as audio_lib
from ser_cache.data.batching import audio_loader, plan_batches
from ser_cache.infra.runtime import autocast
from ser_cache.system.finetuned import MIN_SECONDS, model_state
from ser_cache.system.online import WEIGHTS_FROM_BASE, WEIGHTS_IN_RUN, OnlineModel, encoder_weights_kept, run_state


def load_finetuned(run_dir: Path, config: dict, *, device: str = "cpu") -> OnlineModel:
    """The fine-tuned model of a run, from its config.json and model.safetensors alone; a run of adapters
    and heads (`--lora`, `--freeze-encoder`) also loads its base encoder (hub or local folder) and checks
    that it is the very revision the run was trained on."""
    from ser_cache.runs import layout, rundir
    from ser_cache.system.online_kinds import arch_of, build_from_config

    weights = Path(run_dir) / layout.WEIGHTS
    if not weights.is_file():
        raise layout.RunError(f"{run_dir}: {layout.WEIGHTS} is missing; the run is incomplete")
    def damaged(exc: Exception) -> layout.RunError:
        return layout.RunError(f"{Path(run_dir) / layout.CONFIG}: the encoder entry or \"heads\" do not describe a "
                               f"model ({type(exc).__name__}: {exc}); the file was edited or damaged: restore it, "
                               "or train the run again")

    try:
        arch = arch_of(config)
        kept = encoder_weights_kept(arch)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise damaged(exc) from None
    encoder = _base_encoder(run_dir, config, arch) if kept == WEIGHTS_FROM_BASE else None
    try:
        model = build_from_config(config, encoder)
        if arch.get("lora") is not None:
            from ser_cache.system.lora import add_lora

            add_lora(model.encoder, arch["lora"])
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise damaged(exc) from None
    tensors = model_state(rundir.read_weights(weights))
    try:
        if kept == WEIGHTS_IN_RUN:
            model.load_state_dict(tensors, strict=True)
        else:
            expected = run_state(model, kept)
            missing = sorted(set(expected) - set(tensors))
            extra = sorted(set(tensors) - set(model.state_dict()))
            if missing or extra:
                raise RuntimeError(f"missing {missing[:3]}, unexpected {extra[:3]}")
            model.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:
        raise layout.RunError(f"{weights}: weights do not fit the model in {layout.CONFIG} "
                              f"({str(exc).splitlines()[0]})") from None
    return model.to(torch.device(device)).eval()


def _base_encoder(run_dir: Path, config: dict, arch: dict):
    """The pretrained encoder a run of adapters and heads stands on, checked to be the run's revision."""
    from ser_cache.encoders.base import EncoderError, weights_revision
    from ser_cache.runs import layout
    from ser_cache.system.online_kinds import kind_of, load_base

    model_id, revision = str(arch["model_id"]), str(arch["revision"])
    try:
        encoder, resolved = load_base(kind_of(config).name, model_id)
    except EncoderError as exc:
        raise layout.RunError(f"{run_dir}: the run holds adapters and heads only; its base model {model_id} "
                              f"cannot be loaded ({exc})") from None
    found = weights_revision(encoder, resolved)
    if found != revision:
        raise layout.RunError(f"{run_dir}: the run was trained on {model_id} at revision {revision}; the model found "
                              f"is at {found}; get that revision (or `ser-cache export {run_dir} --merged` where "
                              "it is)")
    return encoder


def save_weights(path: Path, model: nn.Module, aam: nn.Module | None, *, weights: str = WEIGHTS_IN_RUN) -> Path:
    """The model (keys "wavlm.*" or "whisper.*", "heads.*", ...) and the AAM weights ("aam.*"): the whole
    model, or (WEIGHTS_FROM_BASE) all but the frozen encoder's own weights (system.online.run_state)."""
    from ser_cache.runs import rundir

    return rundir.write_weights(path, run_state(model, weights), aam)


def predict_audio(model: OnlineModel, utts: list, cached: Mapping[str, np.ndarray], *, device: str = "auto",
                  max_seconds: float = audio_lib.DEFAULT_MAX_SECONDS, batch_seconds: float = 200.0,
                  workers: int = 0, precision: str = "fp32", with_classes: bool = False) -> tuple:
    """Run a fine-tuned model over utterances' audio (plus their cached inputs, aligned with `utts`).

    Returns (avd (N, 3) float64, gender probabilities (N, G) or None); `with_classes`: and (N, C)
    class probabilities or None (then avd is None for heads without attribute heads). Unreadable
    audio raises AudioError naming the file.
    """
    from ser_cache.encoders.base import RuntimeOptions
    from ser_cache.infra.runtime import resolve_device

    dev = resolve_device(device)
    dtype = RuntimeOptions(device=str(dev), precision=precision).autocast_dtype(dev)
    model.to(dev).eval()
    seconds = np.array([min(audio_lib.info(u.path).seconds, max_seconds) for u in utts], dtype=np.float64)
    loader, plan = audio_loader([str(u.path) for u in utts], max_seconds, workers)
    plan.batches = [b.tolist() for b in plan_batches(np.arange(len(utts)), seconds, batch_seconds, None, min_rows=1)]
    n = len(utts)
    attributes = bool(getattr(model.heads, "attributes", True))
    avd = np.empty((n, 3), dtype=np.float64) if attributes else None
    n_genders = model.heads.n_genders
    probs = np.empty((n, n_genders), dtype=np.float64) if n_genders else None
    n_classes = int(getattr(model.heads, "n_classes", 0)) if with_classes else 0
    class_probs = np.empty((n, n_classes), dtype=np.float64) if n_classes else None
    with torch.inference_mode():
        for rows, audio, lengths in loader:
            _check_lengths(utts, rows, lengths)
            inputs = {k: torch.from_numpy(a[rows]).to(dev) for k, a in cached.items()}
            with autocast(dev, dtype):
                out = model(audio.to(dev), lengths.to(dev), inputs)
            if avd is not None:
                avd[rows] = out["avd"].double().cpu().numpy()
            if probs is not None:
                probs[rows] = torch.softmax(out["gender_logits"].double(), dim=-1).cpu().numpy()
            if class_probs is not None:
                class_probs[rows] = torch.softmax(out["class_logits"].double(), dim=-1).cpu().numpy()
    return (avd, probs, class_probs) if with_classes else (avd, probs)


def _check_lengths(utts, rows, lengths) -> None:
    short = [int(r) for r, n in zip(rows, lengths.tolist()) if n < MIN_SECONDS * audio_lib.SAMPLE_RATE]
    if short:
        u = utts[short[0]]
        raise audio_lib.AudioError(u.path, f"too short for WavLM (at least {MIN_SECONDS} s needed)")
