"""train-heads --layer K / NAME=K: which hidden state of a layered input (pooled (L, D) or frames (T,
L, D)) a run takes alone, checked against the layers each store holds (`held_layers`); pooled inputs
are picked by the heads (rows.layer_picks, heads.LayerPick), frame inputs read at that position
(`layer_choices`, FrameInput.layer_pos).
"""

from __future__ import annotations

from collections.abc import Sequence

from ser_cache.encoders.layers import has_layer_axis, stored_layers
from ser_cache.system.errors import TrainError
from ser_cache.system.inputs import FrameInput, InputStore


def held_layers(item: InputStore | FrameInput) -> tuple[int, ...] | None:
    """The hidden-state indices (transformers numbering) along an input's layer axis, in order; None
    for an input without one. Read from its store's settings "layer" (encoders.layers.stored_layers);
    a pooled (L, D) store whose settings do not say holds states 0 .. L-1."""
    setting = (item.attrs.get("settings") or {}).get("layer")
    pooled = isinstance(item, InputStore)
    shape = tuple(item.shape) if pooled else tuple(item.attrs.get("feature_shape") or ())
    if len(shape) != (2 if pooled else 3):
        return None
    n = int(shape[-2])
    return stored_layers(setting, axis_length=n) if has_layer_axis(setting) else tuple(range(n))


def parse_layer_options(specs: Sequence[str]) -> tuple[int | None, dict[str, int]]:
    """`--layer K` (every layered input) and `--layer NAME=K` values → (K for all or None, {NAME: K})."""
    every: int | None = None
    named: dict[str, int] = {}
    for spec in specs:
        name, eq, value = str(spec).rpartition("=")
        name = name.strip()
        try:
            k = int(value.strip())
        except ValueError:
            raise TrainError(f"--layer {spec}: expected K or NAME=K with K a hidden-state index (0 is the input of "
                             "the first transformer layer)") from None
        if k < 0:
            raise TrainError(f"--layer {spec}: a hidden-state index is 0 or more")
        if eq and not name:
            raise TrainError(f"--layer {spec}: no input name before '='; expected NAME=K")
        if not eq:
            if every is not None:
                raise TrainError(f"--layer is given twice for every layered input ({every} and {k}); give K once, "
                                 "or NAME=K per input")
            every = k
        elif name in named:
            raise TrainError(f"--layer {name}= is given twice ({named[name]} and {k})")
        else:
            named[name] = k
    return every, named


def layer_choices(specs: Sequence[str], inputs: Sequence[InputStore | FrameInput]) -> dict[str, tuple[int, int]]:
    """Which hidden state `--layer` picks in each input: {input name: (K, its position along the layer axis)}.

    `K` applies to every input with a layer axis, `NAME=K` to the input of that name (as the run
    records it); K must be one of the states the store holds. Errors name the input and list them."""
    every, named = parse_layer_options(specs)
    if every is None and not named:
        return {}
    by_name = {s.name: s for s in inputs}
    held = {s.name: held_layers(s) for s in inputs}
    unknown = [n for n in named if n not in by_name]
    if unknown:
        raise TrainError(f"--layer {unknown[0]}={named[unknown[0]]}: no input is named {unknown[0]}; the inputs "
                         f"are {', '.join(by_name) or 'none'}")
    layered = [n for n in by_name if held[n] is not None]
    if every is not None and not layered:
        raise TrainError(f"--layer {every}: no input has a layer axis (" + ", ".join(
            f"{n}: {_layer_text(by_name[n])}" for n in by_name) + "); --layer picks one hidden state of a store "
            "extracted with --layers all or a list")
    out = {}
    for name in layered if every is not None else []:
        out[name] = every
    out.update(named)
    choices = {}
    for name, k in out.items():
        if held[name] is None:
            raise TrainError(f"--layer {name}={k}: {by_name[name].path} has no layer axis "
                             f"({_layer_text(by_name[name])}); only a store extracted with --layers all or a list "
                             "holds several hidden states to pick from")
        if k not in held[name]:
            raise TrainError(f"--layer {k} for input {name}: {by_name[name].path} holds hidden states "
                             f"{_layers_list(held[name])}; choose one of them")
        choices[name] = (k, held[name].index(k))
    return choices


def _layer_text(item) -> str:
    setting = (item.attrs.get("settings") or {}).get("layer")
    return f"layer {setting}" if setting is not None else "one vector per utterance"


def _layers_list(held: Sequence[int]) -> str:
    held = list(held)
    if len(held) > 2 and held == list(range(held[0], held[-1] + 1)):
        return f"{held[0]}-{held[-1]}"
    return ",".join(map(str, held))
