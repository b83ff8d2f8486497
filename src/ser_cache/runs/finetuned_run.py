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
from ser_cache.system.finetuned import MIN_SECONDS, WavLMEmotionModel, build_from_config, model_state


def load_finetuned(run_dir: Path, config: dict, *, device: str = "cpu") -> WavLMEmotionModel:
    """The fine-tuned model of a run, from its config.json and model.safetensors alone (no hub)."""
    from ser_cache.runs import layout, rundir

    weights = Path(run_dir) / layout.WEIGHTS
    if not weights.is_file():
        raise layout.RunError(f"{run_dir}: {layout.WEIGHTS} is missing; the run is incomplete")
    try:
        model = build_from_config(config)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise layout.RunError(f"{Path(run_dir) / layout.CONFIG}: \"wavlm\" or \"heads\" do not describe a model "
                            f"({type(exc).__name__}: {exc}); the file was edited or damaged: restore it, "
                            "or train the run again") from None
    tensors = rundir.read_weights(weights)
    try:
        model.load_state_dict(model_state(tensors), strict=True)
    except RuntimeError as exc:
        raise layout.RunError(f"{weights}: weights do not fit the model in {layout.CONFIG} "
                            f"({str(exc).splitlines()[0]})") from None
    return model.to(torch.device(device)).eval()


def save_weights(path: Path, model: nn.Module, aam: nn.Module | None) -> Path:
    """The whole model (encoder included, keys "wavlm.*", "heads.*", ...) and the AAM weights ("aam.*")."""
    from ser_cache.runs import rundir

    return rundir.write_weights(path, model.state_dict(), aam)


def predict_audio(model: WavLMEmotionModel, utts: list, cached: Mapping[str, np.ndarray], *, device: str = "auto",
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
