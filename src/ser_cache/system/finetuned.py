"""The fine-tuned WavLM system: the encoder, what sits between it and the heads, and its audio batches.

    waveform → WavLM (every hidden state) → softmax layer weighting → point-wise Conv1d stack
             → mean over the valid frames → [concatenated with cached features] → MultitaskHeads

The heads are stage two's `heads.MultitaskHeads`, unchanged: the pooled audio vector is just one
more named input (AUDIO_INPUT) beside any cached store, so the same losses, metrics and run format
apply. Input conventions (per-utterance normalisation, attention mask) are those of the frozen
WavLM encoder (encoders/wavlm.py), read from the checkpoint's preprocessor config.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ser_cache.data import audio as audio_lib

SYSTEM = "finetuned-wavlm"  # config.json "system" of a fine-tuned run
AUDIO_INPUT = "finetuned-wavlm"  # the heads' input name of the pooled WavLM vector
MIN_SECONDS = 0.05  # shorter than one or two WavLM frames: nothing to pool (as in extract)
# Utterances sorted by length together when batches are formed: large enough that a batch holds
# clips of similar length (little padding), small enough that batches still mix the epoch's draw.
BUCKET_BATCHES = 50


LAST_STATE = "after-final-layer-norm"  # as transformers 4.x returned it; the authors trained on 4.46
LEGACY_LAST_STATE = "before-final-layer-norm"  # runs written before that was followed (transformers 5's)


def encoder_states(wavlm: nn.Module, audio: Tensor, mask: Tensor | None, *, layerdrop: float = 0.0,
                   generator: torch.Generator | None = None, last_state: str = LAST_STATE) -> list[Tensor]:
    """WavLMModel's forward, returning all L + 1 hidden states as transformers 4.46 did.

    transformers 5 computes the same layers but (a) returns the last state before the encoder's
    final layer norm, and (b) with LayerDrop on, leaves a skipped layer's state out of the list,
    so the weighted sum would see 24 states one step and 25 the next. Here, as in 4.46: state i is
    the input of layer i, a skipped layer passes its input on (so its state repeats), and the last
    state comes after the final layer norm (models with do_stable_layer_norm, WavLM Large).

    LayerDrop (training mode only, never layer 0, as transformers) draws from `generator`: under
    torchrun every rank holds the same generator, so all ranks skip the same layers and the
    global batch takes the very step a single process would: a layer skipped on every rank gets
    no gradient, which DDP (find_unused_parameters) leaves as None, as one process does, so AdamW
    leaves it alone in both.
    """
    cfg = wavlm.config
    extract = wavlm.feature_extractor(audio).transpose(1, 2)
    frame_mask = None
    if mask is not None:
        frame_mask = wavlm._get_feature_vector_attention_mask(extract.shape[1], mask, add_adapter=False)
    hidden, _ = wavlm.feature_projection(extract)
    hidden = wavlm._mask_hidden_states(hidden, attention_mask=frame_mask)  # spec-augment, training only
    enc = wavlm.encoder
    if frame_mask is not None:
        hidden = hidden.masked_fill(~frame_mask.bool()[..., None], 0.0)
    hidden = hidden + enc.pos_conv_embed(hidden)
    stable = bool(getattr(cfg, "do_stable_layer_norm", False))
    if not stable:
        hidden = enc.layer_norm(hidden)
    hidden = enc.dropout(hidden)
    states: list[Tensor] = []
    bias = None
    for i, layer in enumerate(enc.layers):
        states.append(hidden)
        if wavlm.training and i > 0 and layerdrop > 0 and float(torch.rand((), generator=generator)) < layerdrop:
            continue
        hidden, bias = layer(hidden, attention_mask=frame_mask, position_bias=bias, index=i)
    if stable and last_state == LAST_STATE:
        hidden = enc.layer_norm(hidden)
    states.append(hidden)
    return states


class WavLMEmotionModel(nn.Module):
    """WavLM + layer weighting + point-wise convolutions + masked mean pooling + the multitask heads.

    `forward(audio, lengths, cached)` takes right-padded raw 16 kHz waveforms (B, T), their real
    lengths in samples, and the cached inputs {name: (B, *shape)}; it returns the heads' outputs.
    The convolutions and pooling are model.ConvPool, the very module of stage two's frame inputs.
    `layerdrop`: the probability of skipping each transformer layer (but the first) in training;
    the challenge winner trained with the checkpoint's own value (0.1 for WavLM Large).
    """

    def __init__(self, wavlm: nn.Module, heads: nn.Module, *, conv_dim: int = 256, conv_layers: int = 3,
                 conv_dropout: float = 0.1, normalize: bool = True, attention_mask: bool = True,
                 layerdrop: float = 0.0, seed: int = 0, last_state: str = LAST_STATE,
                 conv_final_activation: bool = False):
        super().__init__()
        from ser_cache.system.heads import LayerWeighting
        from ser_cache.system.model import ConvPool

        self.wavlm = wavlm
        self.normalize = normalize
        self.attention_mask = attention_mask
        self.layerdrop = float(layerdrop)
        self.last_state = last_state
        # One generator for the LayerDrop draws, seeded alike on every rank (see encoder_states).
        self.layerdrop_generator = torch.Generator().manual_seed(int(seed))
        n_states = wavlm.config.num_hidden_layers + 1  # the CNN projection and every transformer layer
        self.layer_weighting = LayerWeighting(n_states)
        self.pool = ConvPool(wavlm.config.hidden_size, dim=conv_dim, layers=conv_layers, dropout=conv_dropout,
                             final_activation=conv_final_activation)
        self.heads = heads

    def pooled(self, audio: Tensor, lengths: Tensor) -> Tensor:
        """(B, T) waveforms → (B, conv_dim), the mean over each utterance's valid frames."""
        from ser_cache.encoders.wavlm import normalise

        if self.normalize:
            audio = normalise(audio, lengths)
        mask = None
        if self.attention_mask:
            mask = (torch.arange(audio.shape[1], device=audio.device)[None, :] < lengths[:, None]).long()
        with warnings.catch_warnings():
            # WavLM mixes a float position bias with a boolean padding mask inside torch's attention,
            # which warns on every call; the result is correct (see encoders/wavlm.py).
            warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask")
            states = encoder_states(self.wavlm, audio, mask, layerdrop=self.layerdrop,
                                    generator=self.layerdrop_generator, last_state=self.last_state)
        weights = self.layer_weighting.weights
        # A running weighted sum rather than LayerWeighting(stack(states)): stacking 25 states of
        # (B, T, 1024) would hold one more copy of all of them for the backward pass.
        mixed = sum(w.to(h.dtype) * h for w, h in zip(weights, states))
        frames = self.wavlm._get_feat_extract_output_lengths(lengths).long()
        return self.pool(mixed, frames)

    def forward(self, audio: Tensor, lengths: Tensor, cached: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        pooled = self.pooled(audio, lengths)
        # The heads and the loss run in float32 whatever the encoder's autocast: a CCC computed
        # from bfloat16 predictions would lose most of its precision.
        with torch.autocast(device_type=audio.device.type, enabled=False):
            return self.heads({AUDIO_INPUT: pooled.float(), **(cached or {})})


def freeze_unused(model: WavLMEmotionModel) -> list[str]:
    """Freeze the encoder parameters that cannot reach the output; returns their names.

    With the last state taken after the final layer norm (as the authors), every transformer
    parameter reaches the output; what is left is what WavLMModel holds for pre-training only
    (e.g. a quantizer in some checkpoints). DDP refuses trainable parameters that get no gradient,
    and AdamW would only decay them. Found by one backward pass in eval mode (no dropout, no
    masking, no LayerDrop: no random numbers drawn); the spec-augment mask embedding, used in
    training mode only, is left alone.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    audio = torch.randn(1, audio_lib.SAMPLE_RATE, generator=torch.Generator().manual_seed(0)).to(device)
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        model.pooled(audio, torch.tensor([audio.shape[1]], device=device)).sum().backward()
    unused = [n for n, p in model.wavlm.named_parameters()
              if p.requires_grad and p.grad is None and "masked_spec_embed" not in n]
    params = dict(model.wavlm.named_parameters())
    for name in unused:
        params[name].requires_grad_(False)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return unused


# --------------------------------------------------------------------------- loading


def load_wavlm(name: str):
    """(WavLMModel, ResolvedModel, normalise?, attention mask?) for a short name, hub id or local directory.

    The model keeps its checkpoint's configuration, LayerDrop included (0.1 for microsoft/wavlm-large);
    WavLMEmotionModel applies it (encoder_states), so that all hidden states stay in the weighting.
    """
    from transformers import WavLMModel

    from ser_cache.encoders import HUB_IDS
    from ser_cache.encoders.base import load_pretrained, resolve_model
    from ser_cache.encoders.wavlm import _input_conventions

    resolved = resolve_model(name, HUB_IDS)
    _refuse_other_models(name)
    model = load_pretrained(WavLMModel, resolved)
    if getattr(model.config, "model_type", "wavlm") != "wavlm":
        from ser_cache.encoders.base import EncoderError

        raise EncoderError(f"model '{name}' is a {model.config.model_type} model; `finetune wavlm` needs a WavLM")
    normalize, uses_mask = _input_conventions(resolved, model.config)
    return model, resolved, normalize, uses_mask


def _refuse_other_models(name: str) -> None:
    """Before loading: a Whisper (or any non-WavLM) model loaded as WavLM would fail as "lacks N weights"."""
    from ser_cache.encoders import _read_config
    from ser_cache.encoders.base import EncoderError

    try:
        config = _read_config(name, allow_network=False)  # None: not on disk yet; the loader reports it
    except EncoderError:
        return
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if isinstance(model_type, str) and model_type and model_type != "wavlm":
        listed = config.get("architectures")
        architectures = ", ".join(map(str, listed)) if isinstance(listed, list) and listed else model_type
        raise EncoderError(f"model '{name}' holds a {model_type} model ({architectures}); `finetune wavlm` "
                           "fine-tunes a WavLM model: give --model wavlm-large or a directory holding a WavLM model")


def architecture(model: WavLMEmotionModel, resolved, *, max_seconds: float, revision: str) -> dict:
    """config.json's "wavlm" entry: everything needed to rebuild the model without the hub."""
    pool = model.pool
    return {
        "model_id": resolved.model_id,
        "revision": revision,
        "config": model.wavlm.config.to_dict(),
        "normalize": model.normalize,
        "attention_mask": model.attention_mask,
        "conv_dim": pool.dim,
        "conv_layers": pool.layers,
        "conv_dropout": pool.dropout,
        "conv_final_activation": pool.final_activation,
        "last_state": model.last_state,
        "layerdrop": model.layerdrop,
        "max_seconds": max_seconds,
        "sample_rate": audio_lib.SAMPLE_RATE,
        "input": AUDIO_INPUT,
    }


def build_from_config(config: dict) -> WavLMEmotionModel:
    """The (untrained) model a run's config.json describes; then load model.safetensors into it.

    Runs written before ser-cache built the authors' architecture lack "last_state" and
    "conv_final_activation": they are rebuilt as they were trained (last state before the final
    layer norm, ReLU and dropout after the last convolution), never silently as the new model.
    """
    from transformers import WavLMConfig, WavLMModel

    from ser_cache.system.heads import MultitaskHeads

    arch = config["wavlm"]
    wavlm_cfg = dict(arch["config"])
    for key in ("architectures", "model_type", "transformers_version"):
        wavlm_cfg.pop(key, None)
    wavlm = WavLMModel(WavLMConfig(**wavlm_cfg))
    heads = MultitaskHeads.from_config(config["heads"])
    return WavLMEmotionModel(wavlm, heads, conv_dim=arch["conv_dim"], conv_layers=arch["conv_layers"],
                             conv_dropout=arch.get("conv_dropout", arch.get("dropout", 0.1)),
                             normalize=arch["normalize"], attention_mask=arch["attention_mask"],
                             layerdrop=float(arch.get("layerdrop", 0.0)),
                             last_state=arch.get("last_state", LEGACY_LAST_STATE),
                             conv_final_activation=bool(arch.get("conv_final_activation", True)))


def model_state(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A fine-tuned run's weights as WavLMEmotionModel keys: without the AAM's, and the convolutions of
    runs written before model.ConvPool ("convs.*") under their present name ("pool.convs.*")."""
    return {("pool." + k if k.startswith("convs.") else k): v for k, v in tensors.items() if not k.startswith("aam.")}


def load_finetuned(run_dir: Path, config: dict, *, device: str = "cpu") -> WavLMEmotionModel:
    """The fine-tuned model of a run, from its config.json and model.safetensors alone (no hub)."""
    from ser_cache.runs import rundir

    weights = Path(run_dir) / rundir.WEIGHTS
    if not weights.is_file():
        raise rundir.RunError(f"{run_dir}: {rundir.WEIGHTS} is missing; the run is incomplete")
    try:
        model = build_from_config(config)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise rundir.RunError(f"{Path(run_dir) / rundir.CONFIG}: \"wavlm\" or \"heads\" do not describe a model "
                            f"({type(exc).__name__}: {exc}); the file was edited or damaged: restore it, "
                            "or train the run again") from None
    tensors = rundir.read_weights(weights)
    try:
        model.load_state_dict(model_state(tensors), strict=True)
    except RuntimeError as exc:
        raise rundir.RunError(f"{weights}: weights do not fit the model in {rundir.CONFIG} "
                            f"({str(exc).splitlines()[0]})") from None
    return model.to(torch.device(device)).eval()


def save_weights(path: Path, model: nn.Module, aam: nn.Module | None) -> Path:
    """The whole model (encoder included, keys "wavlm.*", "heads.*", ...) and the AAM weights ("aam.*")."""
    from ser_cache.runs import rundir

    return rundir.write_weights(path, model.state_dict(), aam)


# --------------------------------------------------------------------------- audio and batches


class AudioRows:
    """Decodes row i's file (in a DataLoader worker when there are any): (i, float32 waveform)."""

    def __init__(self, paths: Sequence[str], max_seconds: float):
        self.paths = list(paths)
        self.max_seconds = max_seconds

    def __getitem__(self, i: int):
        return i, audio_lib.load(self.paths[i], max_seconds=self.max_seconds)

    def __len__(self) -> int:
        return len(self.paths)


class PlannedBatches:
    """A batch sampler whose batches are set before each pass: one DataLoader (and its workers) serves
    every epoch's training plan and the evaluation plan."""

    def __init__(self):
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _collate(items):
    rows, waves = zip(*items)
    lengths = torch.tensor([len(w) for w in waves], dtype=torch.long)
    audio = torch.zeros(len(waves), int(lengths.max()), dtype=torch.float32)
    for i, w in enumerate(waves):
        audio[i, : len(w)] = torch.from_numpy(w)
    return np.asarray(rows, dtype=np.int64), audio, lengths


def audio_loader(paths: Sequence[str], max_seconds: float, workers: int):
    """(DataLoader, PlannedBatches): decoding in `workers` spawned processes (0: in this process)."""
    from torch.utils.data import DataLoader

    import functools
    import os

    from ser_cache.infra.workers import init_loader_worker

    plan = PlannedBatches()
    # Spawned, not forked (as in extract): a forked child of a process with threads running
    # (Zarr's I/O, torch's pools) can deadlock. Persistent, so they are spawned once per run.
    # init_loader_worker: a worker dies with this process, even one killed with SIGKILL (torch's
    # own check only runs between batches), and leaves Ctrl-C to it.
    loader = DataLoader(AudioRows(paths, max_seconds), batch_sampler=plan, collate_fn=_collate,
                        num_workers=workers, multiprocessing_context="spawn" if workers > 0 else None,
                        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
                        worker_init_fn=functools.partial(init_loader_worker, parent_pid=os.getpid()) if workers > 0 else None,
                        generator=torch.Generator())  # its own seed draws: dropout's stream stays untouched
    return loader, plan


def plan_batches(order: np.ndarray, seconds: np.ndarray, batch_seconds: float, rng: np.random.Generator | None,
                 min_rows: int = 2) -> list[np.ndarray]:
    """Split `order` into batches of about `batch_seconds` of audio (clips cropped to their length in `seconds`).

    Windows of the order (BUCKET_BATCHES batches' worth) are sorted by length before cutting, so a
    batch holds clips of similar length and pads little; `rng` then shuffles the batches (None keeps
    them in length order, for evaluation). A batch of fewer than `min_rows` rows, or a tail of less
    than half a batch, joins its neighbour: CCC needs at least two rows, and a short tail is noise.
    The plan depends on the order and the lengths only, never on the number of ranks.
    """
    order = np.asarray(order, dtype=np.int64)
    if order.size == 0:
        return []
    mean = float(np.mean(seconds[order]))
    window = max(1, int(BUCKET_BATCHES * batch_seconds / max(mean, 1e-3)))
    batches: list[list[int]] = []
    for start in range(0, order.size, window):
        part = order[start:start + window]
        part = part[np.argsort(seconds[part], kind="stable")]
        cur: list[int] = []
        total = 0.0
        for row in part.tolist():
            if cur and total + seconds[row] > batch_seconds:
                batches.append(cur)
                cur, total = [], 0.0
            cur.append(row)
            total += float(seconds[row])
        if cur:
            if batches and (len(cur) < min_rows or total < batch_seconds / 2):
                batches[-1].extend(cur)
            else:
                batches.append(cur)
    merged: list[list[int]] = []
    for b in batches:
        if merged and len(b) < min_rows:
            merged[-1].extend(b)
        else:
            merged.append(b)
    out = [np.asarray(b, dtype=np.int64) for b in merged]
    if rng is not None:
        out = [out[i] for i in rng.permutation(len(out))]
    return out


def shard(batch: np.ndarray, seconds: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's part of a global batch: every world-th clip by length, so the ranks' loads match."""
    by_length = batch[np.argsort(seconds[batch], kind="stable")]
    return by_length[rank::world]


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------- prediction


def predict_audio(model: WavLMEmotionModel, utts: list, cached: Mapping[str, np.ndarray], *, device: str = "auto",
                  max_seconds: float = audio_lib.DEFAULT_MAX_SECONDS, batch_seconds: float = 200.0,
                  workers: int = 0, precision: str = "fp32") -> tuple[np.ndarray, np.ndarray | None]:
    """Run a fine-tuned model over utterances' audio (plus their cached inputs, aligned with `utts`).

    Returns (avd (N, 3) float64, gender probabilities (N, G) or None). Unreadable audio raises
    AudioError naming the file.
    """
    from ser_cache.encoders.base import RuntimeOptions
    from ser_cache.train.training import resolve_device

    dev = resolve_device(device)
    dtype = RuntimeOptions(device=str(dev), precision=precision).autocast_dtype(dev)
    model.to(dev).eval()
    seconds = np.array([min(audio_lib.info(u.path).seconds, max_seconds) for u in utts], dtype=np.float64)
    loader, plan = audio_loader([str(u.path) for u in utts], max_seconds, workers)
    plan.batches = [b.tolist() for b in plan_batches(np.arange(len(utts)), seconds, batch_seconds, None, min_rows=1)]
    n = len(utts)
    avd = np.empty((n, 3), dtype=np.float64)
    n_genders = model.heads.n_genders
    probs = np.empty((n, n_genders), dtype=np.float64) if n_genders else None
    with torch.inference_mode():
        for rows, audio, lengths in loader:
            _check_lengths(utts, rows, lengths)
            inputs = {k: torch.from_numpy(a[rows]).to(dev) for k, a in cached.items()}
            with autocast(dev, dtype):
                out = model(audio.to(dev), lengths.to(dev), inputs)
            avd[rows] = out["avd"].double().cpu().numpy()
            if probs is not None:
                probs[rows] = torch.softmax(out["gender_logits"].double(), dim=-1).cpu().numpy()
    return avd, probs


def _check_lengths(utts, rows, lengths) -> None:
    short = [int(r) for r, n in zip(rows, lengths.tolist()) if n < MIN_SECONDS * audio_lib.SAMPLE_RATE]
    if short:
        u = utts[short[0]]
        raise audio_lib.AudioError(u.path, f"too short for WavLM (at least {MIN_SECONDS} s needed)")
