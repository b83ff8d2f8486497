"""What sits between frame-level encoder outputs and the heads, and the stage-two model built on it.

    frames (B, T, D) ─► ConvPool: Conv1d 1×1 D→256, ReLU, Dropout(0.1), Conv1d 256→256, ReLU,
                        Dropout(0.1), Conv1d 256→256 ─► mean over each clip's valid frames ─► (B, 256)

This is the challenge winner's point-wise convolution stack exactly as the authors' released code
builds it (vox-profile-release, `model_seq` in wavlm_emotion_dim.py / whisper_emotion_dim.py): no
activation or dropout after the last convolution, and the mean taken over the first `length`
frames only. The same module serves the fine-tuned WavLM (system/finetuned.py, on the weighted sum of
its hidden states) and cached frame stores in `train-heads` (MMWhisper: Whisper's last layer at
every frame), so both paths train one architecture. A 1×1 convolution sees one frame at a time, so
padding frames cannot leak into valid ones, and the masked mean keeps them out of the pooled vector.

`FeatureModel` is what `train-heads` trains: a ConvPool per frame input, then MultitaskHeads over
the pooled frame inputs and the pooled (vector) stores, concatenated in sorted name order.

A frame input with a layer axis (a frame store of several hidden states, frames (B, T, L, D))
first goes through a learned softmax LayerWeighting (heads.LayerWeighting, the pooled stores' own)
at every frame, giving (B, T, D) for its ConvPool: the fine-tuned WavLM's weighted sum of hidden
states, on cached frames. Its config entry then says how many states it weights ("weighted_layers").
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ser_cache.encoders.base import masked_pool

__all__ = ["CONV_DIM", "CONV_DROPOUT", "CONV_LAYERS", "WEIGHTED_LAYERS", "ConvPool", "FeatureModel"]

CONV_DIM = 256  # the authors' hidden_dim
CONV_LAYERS = 3
CONV_DROPOUT = 0.1  # fixed at 0.1 in the authors' model_seq
# A frame input's config key (FeatureModel.config()) for the states of its layer axis, which a
# LayerWeighting combines before its ConvPool; absent for frames of one state (every run before it).
WEIGHTED_LAYERS = "weighted_layers"


class ConvPool(nn.Module):
    """Point-wise Conv1d stack over every frame, then the mean over the valid frames.

    Parameters live in `convs` (an nn.Sequential), so the convolutions are `convs.0`, `convs.3`,
    `convs.6` for three layers: the authors' `model_seq.{0,3,6}` one to one.
    """

    def __init__(self, in_dim: int, *, dim: int = CONV_DIM, layers: int = CONV_LAYERS,
                 dropout: float = CONV_DROPOUT, final_activation: bool = False) -> None:
        super().__init__()
        if in_dim < 1 or dim < 1 or layers < 1:
            raise ValueError(f"ConvPool needs positive sizes, got in_dim={in_dim}, dim={dim}, layers={layers}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.in_dim, self.dim, self.layers, self.dropout = int(in_dim), int(dim), int(layers), float(dropout)
        # final_activation: ReLU and dropout after the last convolution too. Only for fine-tuned runs
        # written before ser-cache followed the authors here (their config.json says so); never new.
        self.final_activation = bool(final_activation)
        modules: list[nn.Module] = []
        width = self.in_dim
        for i in range(self.layers):
            modules.append(nn.Conv1d(width, self.dim, kernel_size=1))
            if i < self.layers - 1 or self.final_activation:  # the authors: nothing after the last one
                modules += [nn.ReLU(), nn.Dropout(self.dropout)]
            width = self.dim
        self.convs = nn.Sequential(*modules)

    def frames(self, x: Tensor) -> Tensor:
        """(B, T, in_dim) → (B, T, dim): the convolution stack at every frame."""
        # A 1×1 convolution is one matrix product per frame: as F.linear on (B, T, C), with the
        # Conv1d's own parameters, it runs about twice as fast on CPU as Conv1d on (B, C, T).
        for m in self.convs:
            x = nn.functional.linear(x, m.weight.squeeze(-1), m.bias) if isinstance(m, nn.Conv1d) else m(x)
        return x

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        """(B, T, in_dim) frames and their valid counts (B,) → (B, dim), in float32."""
        if x.ndim != 3 or x.shape[-1] != self.in_dim:
            raise ValueError(f"expected frames (B, T, {self.in_dim}), got {tuple(x.shape)}")
        x = x.to(self.convs[0].weight.dtype) if not torch.is_autocast_enabled(x.device.type) else x
        # The mean over each row's first lengths[b] frames: the masked pooling the frozen encoders use.
        return masked_pool(self.frames(x).float(), lengths.to(x.device), "mean")

    def config(self) -> dict[str, Any]:
        cfg = {"in_dim": self.in_dim, "dim": self.dim, "layers": self.layers, "dropout": self.dropout}
        if self.final_activation:
            cfg["final_activation"] = True
        return cfg


class FeatureModel(nn.Module):
    """Stage two's model: a ConvPool for every frame input, then the multitask heads.

    `forward(inputs)` takes {name: (B, *shape) tensor} for vector inputs and {name: ((B, T, D)
    frames, (B,) lengths)} for frame inputs ((B, T, L, D) for one with a layer axis: `frame_inputs`
    gives it WEIGHTED_LAYERS = L beside its ConvPool's arguments); it returns the heads' outputs.
    With no frame inputs it is exactly the heads (and its state dict is the heads' under "heads.",
    the layout of every run); frame inputs without a layer axis add "pools.*" only, layered ones
    "frame_weightings.*" too.
    """

    def __init__(self, heads: nn.Module, frame_inputs: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        super().__init__()
        self.heads = heads
        # bf16 (train-heads --precision): the matrix products under autocast, weights and outputs in
        # float32. A setting of the run, not of the weights: neither config() nor the state dict has it.
        self.compute_dtype: torch.dtype | None = None
        from ser_cache.system.heads import LayerWeighting

        frame_inputs = {name: dict(args) for name, args in (frame_inputs or {}).items()}
        # Sorted names and a ModuleList rather than a ModuleDict: store names may contain "."
        self.frame_names: tuple[str, ...] = tuple(sorted(frame_inputs))
        weighted = {name: int(args.pop(WEIGHTED_LAYERS)) for name, args in frame_inputs.items()
                    if args.get(WEIGHTED_LAYERS) is not None}
        self.pools = nn.ModuleList(ConvPool(**frame_inputs[n]) for n in self.frame_names)
        # The frame inputs with a layer axis, in sorted order, aligned with their LayerWeightings
        # (as the heads align theirs); built after the pools, so that a run without them is seeded
        # as it always was.
        self.weighted_frames: tuple[str, ...] = tuple(n for n in self.frame_names if n in weighted)
        self.frame_weightings = nn.ModuleList(LayerWeighting(weighted[n]) for n in self.weighted_frames)
        for name, pool in zip(self.frame_names, self.pools):
            if tuple(heads.input_dims.get(name, ())) != (pool.dim,):
                raise ValueError(f"frame input {name!r}: the heads must take it as ({pool.dim},), "
                                 f"not {heads.input_dims.get(name)}")

    @property
    def n_genders(self) -> int:
        return self.heads.n_genders

    def layer_weights(self) -> dict[str, Tensor]:
        """The learned per-layer weights of every input with a layer axis, for inspection: the heads'
        of each pooled (L, D) input, and those of each frame input with frames (L, D)."""
        return {**self.heads.layer_weights(),
                **{name: lw.weights.detach() for name, lw in zip(self.weighted_frames, self.frame_weightings)}}

    def pooled(self, inputs: Mapping[str, Any]) -> dict[str, Tensor]:
        """The heads' inputs: frame inputs pooled through their ConvPool (after their layer weighting,
        with a layer axis), vector inputs as given."""
        out = {name: value for name, value in inputs.items() if name not in self.frame_names}
        weighting = dict(zip(self.weighted_frames, self.frame_weightings))
        for name, pool in zip(self.frame_names, self.pools):
            if name not in inputs:
                raise KeyError(f"missing frame input {name!r}")
            x, lengths = inputs[name]
            if name in weighting:
                x = self._weigh(name, weighting[name], x, pool)
            out[name] = pool(x, lengths)
        return out

    @staticmethod
    def _weigh(name: str, weighting: nn.Module, x: Tensor, pool: ConvPool) -> Tensor:
        """(B, T, L, D) frames → (B, T, D): the softmax weighting of the L states at every frame, in the
        ConvPool's dtype (the stores' float16 is not summed in), or the autocast's under autocast."""
        if x.ndim != 4 or x.shape[2] != weighting.n_layers or x.shape[-1] != pool.in_dim:
            raise ValueError(f"frame input {name!r}: expected frames (B, T, {weighting.n_layers}, {pool.in_dim}), "
                             f"got {tuple(x.shape)}")
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(pool.convs[0].weight.dtype)
        b, t = x.shape[:2]
        return weighting(x.reshape(b * t, *x.shape[2:])).reshape(b, t, x.shape[-1])

    def forward(self, inputs: Mapping[str, Any]) -> dict[str, Tensor]:
        device_type = next(iter(self.heads.parameters())).device.type
        dtype = self.compute_dtype
        # The ConvPools' products in the compute dtype too (they return float32 means); without one,
        # they run under whatever autocast the caller has on.
        with torch.autocast(device_type=device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
            pooled = self.pooled(inputs)
        with torch.autocast(device_type=device_type, enabled=False):
            return self.heads({k: v.float() if torch.is_tensor(v) else v for k, v in pooled.items()},
                              compute_dtype=dtype)

    def config(self) -> dict[str, Any]:
        """config.json's "frame_inputs": the ConvPool arguments of every frame input, and WEIGHTED_LAYERS
        for one with a layer axis."""
        weighted = dict(zip(self.weighted_frames, self.frame_weightings))
        return {name: {**pool.config(), **({WEIGHTED_LAYERS: weighted[name].n_layers} if name in weighted else {})}
                for name, pool in zip(self.frame_names, self.pools)}

    @classmethod
    def from_config(cls, heads_config: Mapping[str, Any],
                    frame_inputs: Mapping[str, Any] | None = None) -> FeatureModel:
        from ser_cache.system.heads import MultitaskHeads

        return cls(MultitaskHeads.from_config(heads_config), frame_inputs)
