"""Trainable heads on top of cached, frozen encoder features.

Mirrors the Interspeech 2025 SER Challenge Task 2 winner: one 2-layer MLP per
emotional attribute (arousal, valence, dominance) whose sigmoid output is
mapped back onto the training labels' range (paper Eq. 2), plus optional
auxiliary heads for gender (classification) and speaker (an embedding for an
additive-angular-margin softmax). The categorical task (Task 1) adds a class head of the same
shape (its logits, one per emotion class), beside the attribute heads or instead of them.
Features cached per encoder layer are combined by a learnable softmax weighting, so the heads
pick the layers; or one layer is taken as it is (`layer_picks`, train-heads --layer).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["AVD", "LayerPick", "LayerWeighting", "MultitaskHeads", "RegressionHead"]

AVD: tuple[str, ...] = ("arousal", "valence", "dominance")
"""Order of the columns of the ``"avd"`` output."""

FUSE_MIN_ROWS_CPU = 256
"""Batches from this many rows up run the heads' first layers as one product on a CPU. Below it the
concatenation of the weights (11 MB at the paper's sizes) costs more than the one product saves:
measured on 2 cores, a batch of 64 took 8.2 ms fused against 6.5 ms per head, forward and backward,
and the two break even near 256 rows (docs/performance.md). On a GPU the copy is microseconds."""


class LayerWeighting(nn.Module):
    """Learnable convex combination of an encoder's layers.

    Logits start at zero, so training starts from the plain mean over layers
    and no layer is favoured before the data says so.
    """

    def __init__(self, n_layers: int) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        self.n_layers = n_layers
        self.logits = nn.Parameter(torch.zeros(n_layers))

    @property
    def weights(self) -> Tensor:
        """Current per-layer weights (softmax of the logits), summing to one."""
        return torch.softmax(self.logits, dim=0)

    def forward(self, x: Tensor) -> Tensor:
        """(B, L, D) -> (B, D)."""
        if x.ndim != 3 or x.shape[1] != self.n_layers:
            raise ValueError(f"expected (B, {self.n_layers}, D), got {tuple(x.shape)}")
        return torch.einsum("l,bld->bd", self.weights.to(x.dtype), x)


class LayerPick(nn.Module):
    """One layer of an (L, D) input, taken as it is: (B, L, D) -> (B, D), exactly x[:, position].

    The position is a one-hot buffer rather than an int, so that the members of a sweep stack
    (train/stack.py, under vmap) can each take another layer of the same input. The buffer is not
    persistent: a run's weights are those of heads on a store of that layer alone; config() and
    from_config carry the position. The product with the one-hot and the sum over L add exact zeros,
    so the result is x[:, position] bit for bit (no matrix product, which a GPU may round in TF32).
    """

    onehot: Tensor

    def __init__(self, n_layers: int, position: int) -> None:
        super().__init__()
        if not 0 <= position < n_layers:
            raise ValueError(f"layer position {position} outside the input's {n_layers} layers")
        self.n_layers, self.position = int(n_layers), int(position)
        self.register_buffer("onehot", F.one_hot(torch.tensor(self.position), self.n_layers).float(),
                             persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """(B, L, D) -> (B, D)."""
        if x.ndim != 3 or x.shape[1] != self.n_layers:
            raise ValueError(f"expected (B, {self.n_layers}, D), got {tuple(x.shape)}")
        return (x * self.onehot.to(x.dtype)[:, None]).sum(dim=1)


def _mlp(in_dim: int, hidden: int, out_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim)
    )


class RegressionHead(nn.Module):
    """2-layer MLP whose output is squashed into ``[lo, hi]`` (paper Eq. 2).

    ``y = lo + (hi - lo) * sigmoid(z)``, with lo/hi the training labels' min
    and max: predictions can never leave the label scale, and the sigmoid's
    steep middle sits where the labels are.  lo/hi are buffers so a saved
    state dict carries the scale the head was trained with.
    """

    lo: Tensor
    hi: Tensor

    def __init__(
        self, in_dim: int, *, hidden: int = 256, dropout: float = 0.1, lo: float, hi: float
    ) -> None:
        super().__init__()
        if not hi > lo:
            raise ValueError(f"label range needs hi > lo, got lo={lo}, hi={hi}")
        self.mlp = _mlp(in_dim, hidden, 1, dropout)
        self.register_buffer("lo", torch.tensor(float(lo)))
        self.register_buffer("hi", torch.tensor(float(hi)))

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_dim) -> (B,)."""
        return self.squash(self.mlp(x).squeeze(-1))

    def squash(self, z: Tensor) -> Tensor:
        """The MLP's (B,) output -> predictions on the label scale."""
        p = torch.sigmoid(z)
        # lerp is lo + p*(hi - lo), but computed so that p = 0 / 1 give exactly lo / hi:
        # the naive form can overshoot hi by an ulp when the sigmoid saturates.
        return torch.lerp(self.lo.to(p.dtype).expand_as(p), self.hi.to(p.dtype).expand_as(p), p)


def _check_input_dims(input_dims: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
    if not input_dims:
        raise ValueError("input_dims must name at least one input")
    checked = {}
    for name, shape in input_dims.items():
        shape = tuple(int(s) for s in shape)
        if len(shape) not in (1, 2) or min(shape) < 1:
            raise ValueError(
                f"input {name!r}: shape must be (D,) or (L, D) of positive sizes, got {shape}"
            )
        checked[str(name)] = shape
    return checked


def _three_floats(values: Sequence[float], name: str) -> list[float]:
    values = [float(v) for v in values]
    if len(values) != len(AVD):
        raise ValueError(f"{name} needs one value per attribute {AVD}, got {values}")
    return values


def _fused_first_layers(x: Tensor, layers: Sequence[nn.Linear]) -> list[Tensor]:
    """Every head's first Linear over the same input as one matrix product, split back per head.

    The weights are concatenated at each call rather than stored fused, so each head keeps its own
    parameters (and state-dict keys, and initialisation); the concatenation is cheap next to the
    product, and one (B, in_dim) x (in_dim, sum of widths) product uses the cores far better than
    five thin ones. Under autocast the input is cast once, not once per head.
    """
    weight = torch.cat([layer.weight for layer in layers])
    bias = torch.cat([layer.bias for layer in layers])
    return list(F.linear(x, weight, bias).split([layer.out_features for layer in layers], dim=-1))


class MultitaskHeads(nn.Module):
    """Arousal/valence/dominance regression plus optional gender and speaker heads.

    ``input_dims`` maps each named cached input (e.g. ``"whisper-large-v3"``)
    to its per-utterance shape: ``(D,)`` for a pooled vector, ``(L, D)`` for one
    vector per encoder layer, which then goes through its own
    :class:`LayerWeighting`.  Inputs are concatenated in sorted name order, so
    the layout never depends on dict insertion order.

    ``layer_picks`` maps an (L, D) input's name to one position along its layer axis: that layer is
    taken as it is (:class:`LayerPick`, no weighting), and the heads are those of a (D,) input.
    Recorded in :meth:`config` only when given.

    ``n_classes`` > 0 adds a class head (an MLP of the attribute heads' shape, output
    ``"class_logits"``); ``attributes=False`` leaves the attribute heads out (the categorical task
    alone: no ``"avd"`` output). Both are recorded in :meth:`config` only when they differ from an
    attribute run's (no class head, attribute heads), so such a run's config and state dict are
    what they always were.

    The speaker branch only produces an embedding; the AAM-softmax loss that
    consumes it lives with the training loop, which builds it from
    ``speaker_embedding_dim``, ``n_speakers``, ``aam_margin`` and ``aam_scale``.
    """

    def __init__(
        self,
        input_dims: Mapping[str, Sequence[int]],
        *,
        hidden: int = 256,
        dropout: float = 0.1,
        label_min: Sequence[float],
        label_max: Sequence[float],
        n_genders: int = 0,
        n_speakers: int = 0,
        speaker_embedding_dim: int = 256,
        aam_margin: float = 0.2,
        aam_scale: float = 30.0,
        n_classes: int = 0,
        attributes: bool = True,
        layer_picks: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__()
        if not attributes and n_classes < 2:
            raise ValueError(f"heads without attribute heads need a class head of 2 or more classes, got {n_classes}")
        dims = _check_input_dims(input_dims)
        self.input_names: tuple[str, ...] = tuple(sorted(dims))
        self.input_dims = {name: dims[name] for name in self.input_names}
        self.hidden = int(hidden)
        self.dropout = float(dropout)
        self.label_min = _three_floats(label_min, "label_min")
        self.label_max = _three_floats(label_max, "label_max")
        self.n_genders = int(n_genders)
        self.n_speakers = int(n_speakers)
        self.speaker_embedding_dim = int(speaker_embedding_dim)
        self.aam_margin = float(aam_margin)
        self.aam_scale = float(aam_scale)
        self.n_classes = int(n_classes)
        self.attributes = bool(attributes)

        # A ModuleList (aligned with the layered inputs in sorted order) rather than
        # a ModuleDict keyed by name: encoder names may contain "." or clash with
        # nn.Module attributes, which ModuleDict keys cannot.
        picks = {str(k): int(v) for k, v in (layer_picks or {}).items()}
        for name in picks:
            if len(self.input_dims.get(name, ())) != 2:
                raise ValueError(f"layer_picks: {name!r} is not an input of shape (L, D); "
                                 f"inputs: {self.input_dims}")
        self.picks = {n: picks[n] for n in self.input_names if n in picks}
        self._picked = list(self.picks)
        self.layer_picks = nn.ModuleList(LayerPick(self.input_dims[n][0], p) for n, p in self.picks.items())
        self._layered = [n for n in self.input_names if len(self.input_dims[n]) == 2 and n not in self.picks]
        self.layer_weightings = nn.ModuleList(
            LayerWeighting(self.input_dims[n][0]) for n in self._layered
        )
        in_dim = sum(shape[-1] for shape in self.input_dims.values())
        self.in_dim = in_dim

        self.regressors = nn.ModuleDict(
            {
                attr: RegressionHead(in_dim, hidden=self.hidden, dropout=self.dropout, lo=lo, hi=hi)
                for attr, lo, hi in zip(AVD, self.label_min, self.label_max)
            }
            if self.attributes
            else {}
        )
        self.gender = (
            _mlp(in_dim, self.hidden, self.n_genders, self.dropout) if self.n_genders > 0 else None
        )
        self.speaker = (
            _mlp(in_dim, self.hidden, self.speaker_embedding_dim, self.dropout)
            if self.n_speakers > 0
            else None
        )
        # Built last, so that the attribute and auxiliary heads are seeded as they always were.
        self.classifier = (
            _mlp(in_dim, self.hidden, self.n_classes, self.dropout) if self.n_classes > 0 else None
        )

    def _pooled(self, inputs: Mapping[str, Tensor]) -> Tensor:
        """Validate the named inputs and concatenate them into (B, in_dim)."""
        dtype = self.regressors[AVD[0]].lo.dtype if self.attributes else self.classifier[0].weight.dtype
        weighting = dict(zip(self._layered, self.layer_weightings))
        weighting.update(zip(self._picked, self.layer_picks))
        parts, batch = [], None
        for name in self.input_names:
            if name not in inputs:
                raise KeyError(f"missing input {name!r}; expected inputs {list(self.input_names)}")
            x = inputs[name]
            expected = self.input_dims[name]
            if tuple(x.shape[1:]) != expected or x.ndim != len(expected) + 1:
                raise ValueError(
                    f"input {name!r}: expected shape (B, {', '.join(map(str, expected))}), "
                    f"got {tuple(x.shape)}"
                )
            if batch is not None and x.shape[0] != batch:
                raise ValueError(f"input {name!r}: batch size {x.shape[0]} differs from {batch}")
            batch = x.shape[0]
            # Caches are often stored in half precision; the heads train in their own dtype.
            x = x.to(dtype)
            parts.append(weighting[name](x) if name in weighting else x)
        return torch.cat(parts, dim=-1)

    def forward(self, inputs: Mapping[str, Tensor], *, compute_dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """Named features -> ``{"avd"?: (B, 3), "class_logits"?: (B, C), "gender_logits"?, "speaker_embedding"?}``.

        Keys of ``inputs`` not named in ``input_dims`` are ignored, so a whole
        batch dict (with labels) can be passed.  ``compute_dtype`` (e.g.
        ``torch.bfloat16``) runs the MLPs' matrix products under autocast; the
        outputs, and the sigmoid that maps onto the label range, stay float32.
        """
        x = self._pooled(inputs)
        mlps = self.mlps()
        with torch.autocast(x.device.type, dtype=compute_dtype or torch.bfloat16, enabled=compute_dtype is not None):
            if x.device.type != "cpu" or x.shape[0] >= FUSE_MIN_ROWS_CPU:
                hidden = _fused_first_layers(x, [mlp[0] for mlp in mlps.values()])
            else:
                hidden = [mlp[0](x) for mlp in mlps.values()]
            z = {key: mlp[1:](h).float() for (key, mlp), h in zip(mlps.items(), hidden)}
        out = {}
        if self.attributes:
            out["avd"] = torch.stack([self.regressors[a].squash(z[a].squeeze(-1)) for a in AVD], dim=-1)
        if "class" in z:
            out["class_logits"] = z["class"]
        if "gender" in z:
            out["gender_logits"] = z["gender"]
        if "speaker" in z:
            out["speaker_embedding"] = z["speaker"]
        return out

    def mlps(self) -> dict[str, nn.Sequential]:
        """Every head's MLP, in a fixed order: arousal?, valence?, dominance?, class?, gender?, speaker?."""
        mlps = {attr: self.regressors[attr].mlp for attr in AVD} if self.attributes else {}
        if self.classifier is not None:
            mlps["class"] = self.classifier
        if self.gender is not None:
            mlps["gender"] = self.gender
        if self.speaker is not None:
            mlps["speaker"] = self.speaker
        return mlps

    def layer_weights(self) -> dict[str, Tensor]:
        """Learned per-layer weights of each (L, D) input, for inspection."""
        return {name: lw.weights.detach() for name, lw in zip(self._layered, self.layer_weightings)}

    def config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments; see :meth:`from_config`."""
        return {
            "input_dims": {name: list(shape) for name, shape in self.input_dims.items()},
            "hidden": self.hidden,
            "dropout": self.dropout,
            "label_min": list(self.label_min),
            "label_max": list(self.label_max),
            "n_genders": self.n_genders,
            "n_speakers": self.n_speakers,
            "speaker_embedding_dim": self.speaker_embedding_dim,
            "aam_margin": self.aam_margin,
            "aam_scale": self.aam_scale,
            **({"n_classes": self.n_classes} if self.n_classes else {}),
            **({} if self.attributes else {"attributes": False}),
            **({"layer_picks": dict(self.picks)} if self.picks else {}),
        }

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> MultitaskHeads:
        """Rebuild an (untrained) module from :meth:`config`; then load its weights."""
        cfg = dict(cfg)
        input_dims = {name: tuple(shape) for name, shape in cfg.pop("input_dims").items()}
        return cls(input_dims, **cfg)
