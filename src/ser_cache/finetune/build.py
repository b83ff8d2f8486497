"""The online model of a `finetune wavlm|whisper` run: its encoder component loaded, the heads, what trains
(everything, LoRA adapters only, or nothing of the encoder), and the optimizer's two groups.

The order of the random draws is fixed (the encoder's loading, the heads, the convolutions, then
the adapters), so a WavLM run without the new options draws exactly what it drew before.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ser_cache.finetune.options import FinetuneConfig
from ser_cache.system.errors import TrainError

log = logging.getLogger(__name__)


@dataclass
class Built:
    model: object  # system.online.OnlineModel
    heads: object
    resolved: object
    revision: str
    layerdrop: float
    weights: str  # online.WEIGHTS_IN_RUN or WEIGHTS_FROM_BASE
    lora: dict | None  # the recorded LoRA spec (system.lora.lora_spec)

    def architecture(self, cfg: FinetuneConfig) -> dict:
        """config.json's encoder entry ("wavlm" or "whisper")."""
        from ser_cache.system import finetuned, whisper_finetuned
        from ser_cache.system.online import WEIGHTS_IN_RUN

        if cfg.encoder == "whisper":
            arch = whisper_finetuned.architecture(self.model, self.resolved, revision=self.revision)
        else:
            arch = finetuned.architecture(self.model, self.resolved, max_seconds=cfg.max_seconds,
                                          revision=self.revision)
        if self.weights != WEIGHTS_IN_RUN:  # runs as before record nothing new
            arch["weights"] = self.weights
        if self.lora is not None:
            arch["lora"] = self.lora
        return arch


def build_model(cfg: FinetuneConfig, make_heads, device) -> Built:
    """The model on `device`, its encoder's frozen parts frozen. `make_heads(input_name)`: the heads."""
    from ser_cache.encoders.base import weights_revision
    from ser_cache.system import lora as lora_lib, online
    from ser_cache.system.finetuned import WavLMEmotionModel, load_wavlm
    from ser_cache.system.online_kinds import n_layers
    from ser_cache.system.whisper_finetuned import WhisperEmotionModel, check_window, load_whisper

    if cfg.lora and cfg.freeze_encoder:
        raise TrainError("--lora and --freeze-encoder: give one (adapters train, or nothing of the encoder does)")
    if cfg.lora:
        lora_lib.require_peft()  # before minutes of loading
    if cfg.encoder == "whisper":
        encoder, resolved, filters = load_whisper(cfg.model)
        if problem := check_window(cfg.window or "window", cfg.max_seconds, encoder):
            raise TrainError(problem)
        if cfg.freeze_cnn:
            for conv in (encoder.conv1, encoder.conv2):
                conv.requires_grad_(False)
        layerdrop = 0.0
    else:
        encoder, resolved, normalize, uses_mask = load_wavlm(cfg.model)
        if cfg.freeze_cnn:
            encoder.freeze_feature_encoder()
        layerdrop = float(encoder.config.layerdrop if cfg.layerdrop is None else cfg.layerdrop)
    revision = weights_revision(encoder, resolved)
    if cfg.gradient_checkpointing:
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.encoder == "whisper":
        heads = make_heads(WhisperEmotionModel.input_name)
        model = WhisperEmotionModel(encoder, heads, filters, window=cfg.window or "window",
                                    states=cfg.states or "last", max_seconds=cfg.max_seconds, conv_dim=cfg.conv_dim,
                                    conv_dropout=cfg.conv_dropout, seed=cfg.seed)
    else:
        heads = make_heads(WavLMEmotionModel.input_name)
        model = WavLMEmotionModel(encoder, heads, conv_dim=cfg.conv_dim, conv_dropout=cfg.conv_dropout,
                                  normalize=normalize, attention_mask=uses_mask, layerdrop=layerdrop, seed=cfg.seed)
    spec = None
    imported = None
    if cfg.init_from is not None and cfg.encoder == "whisper":
        from ser_cache.finetune import init_vox

        imported = init_vox.imported_whisper(Path(cfg.init_from))
    if imported is not None:  # the authors' Whisper model: their adapters go on first, then their weights
        theirs = init_vox.their_lora_spec(imported, n_layers("whisper", encoder))
        init_vox.check_lora_matches(cfg, theirs, Path(cfg.init_from))
        if theirs is not None:
            spec = theirs
            lora_lib.add_lora(encoder, spec)
        init_vox.init_from_imported(model, Path(cfg.init_from), imported, spec)
    elif cfg.init_from is not None:
        from ser_cache.finetune.checkpoint import check_init_run, init_from_run, run_lora

        check_init_run(model, Path(cfg.init_from))
        theirs = run_lora(Path(cfg.init_from))
        if theirs is not None:  # a LoRA run continued: its adapters go on first, then its weights
            spec = _same_lora(cfg, encoder, theirs, lora_lib, n_layers)
            lora_lib.add_lora(encoder, spec)
        init_from_run(model, Path(cfg.init_from))
    if cfg.lora and spec is None:
        spec = lora_lib.lora_spec(cfg.encoder, encoder, n_layers(cfg.encoder, encoder), rank=cfg.lora,
                                  alpha=cfg.lora_alpha, dropout=cfg.lora_dropout or 0.0,
                                  targets=cfg.lora_targets, layers=cfg.lora_layers or lora_lib.UPPER_HALF)
        lora_lib.add_lora(encoder, spec)
    elif cfg.freeze_encoder:
        online.freeze_encoder(model)
    model.to(device)
    weights = online.WEIGHTS_FROM_BASE if (spec is not None or cfg.freeze_encoder) else online.WEIGHTS_IN_RUN
    return Built(model=model, heads=heads, resolved=resolved, revision=revision, layerdrop=layerdrop,
                 weights=weights, lora=spec)


def _same_lora(cfg: FinetuneConfig, encoder, theirs: dict, lora_lib, n_layers) -> dict:
    """--init-from a LoRA run: these options must build its adapters (rank, alpha, dropout, modules)."""
    if cfg.lora:
        ours = lora_lib.lora_spec(cfg.encoder, encoder, n_layers(cfg.encoder, encoder), rank=cfg.lora,
                                  alpha=cfg.lora_alpha, dropout=cfg.lora_dropout or 0.0, targets=cfg.lora_targets,
                                  layers=cfg.lora_layers or lora_lib.UPPER_HALF)
        if all(ours[k] == theirs.get(k) for k in ("rank", "alpha", "dropout", "targets")):
            return ours
    raise TrainError(f"--init-from {cfg.init_from}: the run trained LoRA adapters (rank {theirs['rank']}, alpha "
                     f"{theirs['alpha']:g}, {len(theirs['targets'])} modules); continue them with the same --lora, "
                     "--lora-alpha, --lora-dropout, --lora-targets and --lora-layers (or `export --merged` it and "
                     "start from the merged run)")


def param_groups(cfg: FinetuneConfig, model, aam) -> list[dict]:
    """AdamW's groups: the encoder's trainable weights at --lr-encoder (left out when none train),
    everything else that trains (layer weighting, convolutions, heads, AAM) at --lr-heads."""
    encoder_params = [p for p in model.encoder.parameters() if p.requires_grad]
    encoder_ids = {id(p) for p in encoder_params}
    head_params = [p for p in model.parameters() if p.requires_grad and id(p) not in encoder_ids]
    head_params += list(aam.parameters()) if aam is not None else []
    groups = [{"params": encoder_params, "lr": cfg.lr_encoder}] if encoder_params else []
    return groups + [{"params": head_params, "lr": cfg.lr_heads}]
