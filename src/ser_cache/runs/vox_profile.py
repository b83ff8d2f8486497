"""`ser-cache import vox-profile`: the challenge winner's released checkpoints as ordinary ser-cache runs.

The authors released their dimensional-emotion models (`tiantiaf/wavlm-large-msp-podcast-emotion-dim`,
`tiantiaf/whisper-large-v3-msp-podcast-emotion-dim`) in the layout of their model code
(vox-profile-release, src/model/emotion/{wavlm,whisper}_emotion_dim.py), saved by
huggingface_hub's PyTorchModelHubMixin:

    config.json          the wrapper's constructor arguments: pretrain_model (wavlm_large, wavlm,
                         whisper_large, whisper_tiny/base/small/medium), hidden_dim, finetune_method,
                         lora_rank, use_conv_output, predict_gender, ...
    model.safetensors    backbone_model.*            the whole WavLMModel / WhisperModel state
                         weights                     layer-weight logits (WavLM; unused by Whisper)
                         model_seq.{0,3,6}.*         the three 1×1 convolutions
                         {arousal,valence,dominance}_layer.{0,2}.*   Linear–ReLU–Linear, then Sigmoid
                         gender_layer.{0,2}.*        optional, 2 logits
                         emotion_layer, detailed_out_layer, embed_positions, the Whisper decoder: unused

Their forward, which the imported run reproduces:
- WavLM: every hidden state (the last after the encoder's final layer norm, transformers 4.46),
  softmax(weights)-weighted sum (over all L + 1 states with use_conv_output, else over the L
  layer outputs), the convolutions, the mean over the valid frames, the heads, sigmoid.
  wavlm_large inputs are normalised per clip and masked; wavlm (base) inputs are neither.
- Whisper: the frozen-window encoder (15 s, 750 positions), its last layer after the final layer
  norm, the convolutions, the mean over the first (n // 160 - 1) // 2 + 1 frames, heads, sigmoid.

The sigmoid outputs lie in [0, 1]; the run maps them onto `label_range` (1–7 for MSP-Podcast),
exactly as ser-cache's heads map theirs onto the training labels' range (paper Eq. 2).

A WavLM checkpoint becomes a fine-tuned-WavLM run (system/finetuned.py); a Whisper checkpoint becomes
a frame-heads run whose input is the checkpoint's own Whisper encoder (saved into the run as
`encoder/`, a model directory like any other) followed by a ConvPool (model.FeatureModel).

The categorical models (`tiantiaf/wavlm-large-categorical-emotion`,
`tiantiaf/whisper-large-v3-msp-podcast-emotion`; src/model/emotion/{wavlm,whisper}_emotion.py) are
the same wrappers with trained class heads and no gender head:

    emotion_layer.{0,2}.*       Linear(hidden, hidden)–ReLU–Linear(hidden, 9): class logits, softmax, in
                                the order Anger, Contempt, Disgust, Fear, Happiness, Neutral, Sadness,
                                Surprise, Other (their examples' label_list)
    detailed_out_layer.{0,2}.*  Linear(hidden, hidden)–ReLU–Linear(hidden, 17): the "detailed" logits
    {arousal,valence,dominance}_layer   as above, sigmoid

A checkpoint whose emotion_layer has 9 outputs is imported as a class run of task "both" with the
classes system.tasks.class_codes(9) (A S H U F D C N O): the class head's last layer rows are
permuted from the authors' order onto those codes by CLASS_MAP, once, at import; predict's
`--task categorical --with-probabilities` then gives the softmax of their emotion_layer logits.
The 17-way detailed head has no place in the run's model (and no published label names), so its
four tensors are kept beside it, under the authors' names, in DETAILED_FILE
(`detailed_head.safetensors`); predict does not use it. In the dimensional checkpoints the
emotion_layer (4 outputs) and detailed_out_layer are untrained and are not imported.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ser_cache.infra import atomic
from ser_cache.runs import layout, rundir, staging
from ser_cache.runs.vox_profile_checkpoint import (
    AUTHORS_CLASSES,
    BACKBONES,
    CLASS_MAP,
    DETAILED_LAYER,
    LORA_ALPHA,
    ImportError_,
    checkpoint_files,
    class_heads,
    head_state,
    is_categorical,
    lora_adapters,
    merge_lora,
    read_weights,
    read_wrapper_config,
    rebuilt,
    split_weights,
)
from ser_cache.system.tasks import class_codes
from ser_cache.version import __version__

log = logging.getLogger(__name__)

DEFAULT_GENDER_LABELS = ("Female", "Male")  # the order of the authors' sex model (src/example/age_sex_wavlm.py)
ENCODER_DIR = "encoder"  # a Whisper run's own encoder, inside the run directory
LORA_ADAPTERS = "lora_adapters.safetensors"  # a LoRA Whisper run's loralib pairs, unmerged (for --init-from)

DETAILED_FILE = "detailed_head.safetensors"  # a categorical run's 17-way detailed head, the authors' key names


@dataclass(frozen=True)
class ImportConfig:
    source: str  # hub id or local directory in the authors' layout
    out: Path
    backbone: str | None = None
    label_range: tuple[float, float] = (1.0, 7.0)
    gender_labels: tuple[str, ...] = DEFAULT_GENDER_LABELS
    overwrite: bool = False

    def verify(self) -> None:
        problems = []
        lo, hi = self.label_range
        if not hi > lo:
            problems.append(f"--label-range {lo} {hi}: expected LOW HIGH with HIGH > LOW")
        if len(self.gender_labels) != 2 or len(set(self.gender_labels)) != 2:
            problems.append(f"--gender-labels {','.join(self.gender_labels)}: expected two different labels")
        if problems:
            raise ImportError_("; ".join(problems))


@dataclass
class ImportResult:
    run_dir: Path
    system: str  # "finetuned-wavlm" or "frame-heads"
    pretrain_model: str
    merged_lora: int  # LoRA pairs merged into dense weights
    task: str = "attributes"  # "both" for a categorical checkpoint (class head + A/V/D heads)


# --------------------------------------------------------------------------- reading the checkpoint


def _categorical_parts(categorical: bool, tensors: Mapping[str, Tensor], hidden: int,
                       imported: dict) -> tuple[dict, dict, dict]:
    """(class-head state, detailed tensors, the run config's "categorical" block); all empty for a
    dimensional checkpoint."""
    if not categorical:
        return {}, {}, {}
    state, detailed = class_heads(tensors, hidden)
    imported["class_map"] = {AUTHORS_CLASSES[i]: code for i, code in CLASS_MAP.items()}
    imported["detailed_head"] = {"file": DETAILED_FILE,
                                 "outputs": int(detailed[f"{DETAILED_LAYER}.2.weight"].shape[0]),
                                 "used_by_predict": False}
    block = {"categorical": {"task": "both", "classes": list(class_codes(len(AUTHORS_CLASSES))),
                             "class_weights": None}}
    return state, detailed, block


def _save_detailed(run_dir: Path, detailed: dict[str, Tensor]) -> None:
    if detailed:
        from safetensors.torch import save_file

        save_file(detailed, str(run_dir / DETAILED_FILE), metadata={"format": "vox-profile detailed_out_layer"})


# --------------------------------------------------------------------------- the import


def import_vox_profile(cfg: ImportConfig) -> ImportResult:
    """Turn the authors' checkpoint into a run directory at cfg.out (written whole, then renamed)."""
    cfg.verify()
    staging.check_run_target(cfg.out, cfg.overwrite)
    config_path, weights_path, revision = checkpoint_files(cfg.source)
    wrapper = read_wrapper_config(config_path)
    tensors = read_weights(weights_path)
    kind = "whisper" if wrapper["pretrain_model"].startswith("whisper") else "wavlm"
    backbone = cfg.backbone or BACKBONES[wrapper["pretrain_model"]]
    imported = {"source": cfg.source, "revision": revision, "wrapper": wrapper, "backbone": backbone}
    categorical = is_categorical(wrapper, tensors)
    if kind == "wavlm":
        merged = _import_wavlm(cfg, wrapper, tensors, backbone, imported, categorical)
        system = "finetuned-wavlm"
    else:
        merged = _import_whisper(cfg, wrapper, tensors, backbone, imported, categorical)
        system = "frame-heads"
    log.info("imported %s (%s) into %s", cfg.source, wrapper["pretrain_model"], cfg.out)
    return ImportResult(run_dir=Path(cfg.out), system=system, pretrain_model=wrapper["pretrain_model"],
                        merged_lora=merged, task="both" if categorical else "attributes")


def _merged(tensors: dict[str, Tensor], wrapper: dict, n_layers: int, imported: dict) -> tuple[dict, int]:
    merged = 0
    if any(k.endswith(".lora_A") for k in tensors):
        tensors, merged = merge_lora(tensors, int(wrapper.get("lora_rank") or 0), n_layers)
        log.info("merged %d LoRA pair(s) into their dense weights (scaling %g / r)", merged, LORA_ALPHA)
    imported["merged_lora"] = merged
    return tensors, merged


def _backbone_config(backbone: str, config_cls):
    from ser_cache.encoders import HUB_IDS
    from ser_cache.encoders.base import EncoderError, load_error, quiet_loading, resolve_model

    try:
        resolved = resolve_model(backbone, HUB_IDS)
    except EncoderError as exc:
        raise ImportError_(f"--backbone: {exc}") from None
    try:
        with quiet_loading():
            return config_cls.from_pretrained(resolved.source, local_files_only=resolved.local_only), resolved
    except (OSError, ValueError) as exc:
        raise ImportError_(f"--backbone: {load_error(resolved, exc)}") from None


def _heads(hidden: int, input_name: str, cfg: ImportConfig, predict_gender: bool, categorical: bool = False):
    from ser_cache.system.heads import MultitaskHeads

    lo, hi = cfg.label_range
    return MultitaskHeads({input_name: (hidden,)}, hidden=hidden, dropout=0.0, label_min=[lo] * 3,
                          label_max=[hi] * 3, n_genders=2 if predict_gender else 0,
                          n_classes=len(AUTHORS_CLASSES) if categorical else 0)


def _run_config(cfg: ImportConfig, heads, imported: dict, predict_gender: bool, **extra) -> dict:
    lo, hi = cfg.label_range
    gender_labels = list(cfg.gender_labels) if predict_gender else []
    return {
        "format": layout.RUN_FORMAT,
        "format_version": layout.RUN_FORMAT_VERSION,
        "package_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
        "imported": imported,
        "train": {"imported_from": cfg.source, "seed": 0, "balanced_trials": 10, "balanced_per_class": None,
                  "ox": "keep", "dev_split": None},
        "excluded_stores": [],
        "labels": {"attributes": ["arousal", "valence", "dominance"], "min": [lo] * 3, "max": [hi] * 3},
        "gender_labels": gender_labels,
        "n_speakers": 0,
        "speakers": [],
        "heads": heads.config(),
        "data": {},
        "best_epoch": None,
    }


def _import_wavlm(cfg: ImportConfig, wrapper: dict, tensors: dict, backbone: str, imported: dict,
                  categorical: bool = False) -> int:
    from transformers import WavLMConfig, WavLMModel

    from ser_cache.runs.finetuned_run import save_weights
    from ser_cache.system.finetuned import AUDIO_INPUT, LAST_STATE, SYSTEM, WavLMEmotionModel, architecture

    wavlm_config, resolved = _backbone_config(backbone, WavLMConfig)
    if getattr(wavlm_config, "model_type", "") != "wavlm":
        raise ImportError_(f"--backbone {backbone}: a {wavlm_config.model_type} model, not a WavLM")
    wavlm = WavLMModel(wavlm_config)
    tensors, merged = _merged(tensors, wrapper, wavlm_config.num_hidden_layers, imported)
    predict_gender = bool(wrapper.get("predict_gender", False))
    backbone_state, rest = split_weights(tensors, set(wavlm.state_dict()), predict_gender=predict_gender,
                                         whisper=False)
    hidden = int(wrapper.get("hidden_dim", 256))
    class_state, detailed, class_block = _categorical_parts(categorical, tensors, hidden, imported)
    heads = _heads(hidden, AUDIO_INPUT, cfg, predict_gender, categorical)
    large = wrapper["pretrain_model"] == "wavlm_large"
    # The authors run wavlm-large through its processor (per-clip normalisation) with a padding mask,
    # and the base model on the raw batch without either.
    model = WavLMEmotionModel(wavlm, heads, conv_dim=hidden, conv_dropout=0.1, normalize=large,
                              attention_mask=large, layerdrop=float(wavlm_config.layerdrop), last_state=LAST_STATE)
    n_states = wavlm_config.num_hidden_layers + 1
    weights = rest["weights"].float()
    if wrapper.get("use_conv_output", True):
        if weights.shape != (n_states,):
            raise ImportError_(f"weights: expected {n_states} layer weights (use_conv_output), got "
                               f"{tuple(weights.shape)}")
        logits = weights
    else:
        if weights.shape != (n_states - 1,):
            raise ImportError_(f"weights: expected {n_states - 1} layer weights, got {tuple(weights.shape)}")
        # Their softmax covers the layer outputs only; the CNN projection gets weight exp(-1e4) = 0.
        logits = torch.cat([torch.tensor([-1e4]), weights])
    state = {f"wavlm.{k}": v for k, v in backbone_state.items()}
    state["layer_weighting.logits"] = logits
    state.update({("pool." + k if k.startswith("convs.") else k): v
                  for k, v in head_state(rest, lo=cfg.label_range[0], hi=cfg.label_range[1],
                                         predict_gender=predict_gender).items()})
    state.update(class_state)
    _load_checked(model, state)
    arch = architecture(model, resolved, max_seconds=15.0, revision="imported:" + imported["revision"])
    config = _run_config(cfg, heads, imported, predict_gender, system=SYSTEM, wavlm=arch, inputs=[], **class_block)
    with staging.staged_run_dir(cfg.out, cfg.overwrite) as tmp:
        save_weights(tmp / layout.WEIGHTS, model, None)
        _save_detailed(tmp, detailed)
        atomic.write_json_atomic(tmp / layout.CONFIG, config)
    return merged


def _load_checked(model: torch.nn.Module, state: dict[str, Tensor], *, keys: set[str] | None = None,
                  prefix: str = "") -> None:
    """Load `state` into `model`; every parameter and buffer of `keys` (default: all of the model's)
    must be given, with its shape. `prefix` is how the checkpoint names them, for the message."""
    ours = model.state_dict()
    keys = set(ours) if keys is None else keys
    problems = [f"{prefix}{k} {tuple(v.shape)} (expected {tuple(ours[k].shape)})" for k, v in state.items()
                if k in keys and tuple(v.shape) != tuple(ours[k].shape)]
    missing = [f"{prefix}{k}" for k in ours if k in keys and k not in state and not rebuilt(k.split(".", 1)[-1])]
    if problems or missing:
        raise ImportError_("the checkpoint does not fit its backbone configuration: "
                           + "; ".join(problems[:5] + [f"missing {k}" for k in missing[:5]])
                           + " — pass the --backbone it was trained from")
    model.load_state_dict({k: v for k, v in state.items() if k in ours}, strict=False)


def _import_whisper(cfg: ImportConfig, wrapper: dict, tensors: dict, backbone: str, imported: dict,
                    categorical: bool = False) -> int:
    """A frame-heads run: the checkpoint's Whisper encoder (saved into the run), a ConvPool, the heads."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForAudioClassification

    from ser_cache.encoders import load_encoder
    from ser_cache.encoders.base import quiet_loading
    from ser_cache.encoders.whisper import WINDOW_POSITIONS
    from ser_cache.system.model import FeatureModel

    whisper_config, resolved = _backbone_config(backbone, WhisperConfig)
    if getattr(whisper_config, "model_type", "") != "whisper":
        raise ImportError_(f"--backbone {backbone}: a {whisper_config.model_type} model, not a Whisper")
    # The authors' forward puts their wrapper's own copy of the positional table (`embed_positions`,
    # cut to 750 rows: the 15-s window) into the encoder before every call, so that copy is the one
    # that counts; it equals the encoder's saved table in their checkpoints.
    tensors = dict(tensors)
    table = tensors.get("embed_positions", tensors.get("backbone_model.encoder.embed_positions.weight"))
    if table is not None:
        tensors["backbone_model.encoder.embed_positions.weight"] = table[:WINDOW_POSITIONS].clone()
    whisper_config.max_source_positions = WINDOW_POSITIONS
    encoder_model = WhisperForAudioClassification(whisper_config)
    encoder_keys = {k for k in encoder_model.state_dict() if k.startswith("encoder.")}
    adapters = lora_adapters(tensors, whisper_config.encoder_layers)
    if adapters:
        imported["lora_adapters"] = {"file": LORA_ADAPTERS, "alpha": LORA_ALPHA,
                                     "rank": int(next(v for k, v in adapters.items() if k.endswith("lora_A")).shape[0])}
    tensors, merged = _merged(tensors, wrapper, whisper_config.encoder_layers, imported)
    predict_gender = bool(wrapper.get("predict_gender", False))
    backbone_state, rest = split_weights(tensors, encoder_keys, predict_gender=predict_gender, whisper=True)
    _load_checked(encoder_model, backbone_state, keys=encoder_keys, prefix="backbone_model.")
    try:
        with quiet_loading():
            feature_extractor = WhisperFeatureExtractor.from_pretrained(resolved.source,
                                                                        local_files_only=resolved.local_only)
    except (OSError, ValueError) as exc:
        raise ImportError_(f"--backbone {backbone}: no Whisper preprocessor config ({exc})") from None
    if feature_extractor.feature_size != whisper_config.num_mel_bins:
        raise ImportError_(f"--backbone {backbone}: its preprocessor has {feature_extractor.feature_size} mel bins, "
                           f"the model {whisper_config.num_mel_bins}")

    hidden = int(wrapper.get("hidden_dim", 256))
    name = f"{wrapper['pretrain_model'].replace('_', '-')}-frames"
    class_state, detailed, class_block = _categorical_parts(categorical, tensors, hidden, imported)
    heads = _heads(hidden, name, cfg, predict_gender, categorical)
    frame_inputs = {name: {"in_dim": whisper_config.d_model, "dim": hidden, "layers": 3, "dropout": 0.1}}
    model = FeatureModel(heads, frame_inputs)
    state = {("pools.0." + k if k.startswith("convs.") else k): v
             for k, v in head_state(rest, lo=cfg.label_range[0], hi=cfg.label_range[1],
                                    predict_gender=predict_gender).items()}
    state.update(class_state)
    _load_checked(model, state)

    with staging.staged_run_dir(cfg.out, cfg.overwrite) as tmp:
        encoder_dir = tmp / ENCODER_DIR
        with quiet_loading():
            encoder_model.save_pretrained(encoder_dir)
            feature_extractor.save_pretrained(encoder_dir)
        # The run's input is this encoder, run as `extract --pooling frames` would (15-s window, last
        # layer after the final layer norm); predict computes it from the audio, as for any input
        # whose store is not at hand. Its settings are recorded relative to the run directory.
        encoder = load_encoder(str(encoder_dir), kind="whisper", device="cpu", precision="fp32", window="window",
                               pooling="frames", max_seconds=15.0)
        settings = {**encoder.settings(), "model_id": ENCODER_DIR}
        record = {"name": name, "path": "", "fingerprint": None, "model_id": ENCODER_DIR, "in_run": True,
                  "revision": encoder.revision, "kind": "whisper", "modality": "audio",
                  "feature_shape": list(encoder.feature_shape), "settings": settings}
        del encoder
        config = _run_config(cfg, heads, imported, predict_gender, inputs=[record], frame_inputs=model.config(),
                             **class_block)
        rundir.save_weights(tmp, model)
        _save_detailed(tmp, detailed)
        if adapters:
            from safetensors.torch import save_file

            save_file(adapters, str(tmp / LORA_ADAPTERS), metadata={"format": "vox-profile loralib adapters"})
        atomic.write_json_atomic(tmp / layout.CONFIG, config)
    return merged
