"""Which hidden states of an audio encoder a store keeps: `--layers all|last|LIST`, and the store's
record of them.

Hidden states are numbered as transformers numbers them: 0 is the input of the first transformer
layer (the CNN's projection for WavLM, HuBERT, wav2vec 2.0; the convolutions plus positions for
Whisper), k the output of layer k, and L (the last) the encoder's output. An encoder with L layers
has L + 1 states.

A store's settings record the choice under "layer", in one of four forms, so that the stores built
before the choice existed keep their fingerprints:
- "last": only the last state, no layer axis (Whisper's and the frame stores' default);
- "all": every state, a layer axis of L + 1 (WavLM's pooled default);
- an int k: only state k, no layer axis;
- a list of ints: those states in increasing order, a layer axis of their number.
`--layers L` (the last one named by its index) is stored as "last", and a list naming every state
as "all": one choice, one fingerprint.
"""

from __future__ import annotations

from collections.abc import Sequence


class LayersError(ValueError):
    """A --layers (or --layer) value that cannot be read, or names a state the encoder lacks."""


def parse_layers(spec: str, n_states: int, *, option: str = "--layers") -> tuple[int, ...]:
    """`all`, `last`, a comma list of indices and ranges (`6,12,18,24`, `8-16`, `0,4-6`) → sorted,
    distinct hidden-state indices in [0, n_states)."""
    if n_states < 1:
        raise LayersError(f"{option}: the encoder has no hidden states")
    text = str(spec).strip().lower()
    if text == "all":
        return tuple(range(n_states))
    if text == "last":
        return (n_states - 1,)
    picked: set[int] = set()
    expected = f"expected all, last, or indices 0-{n_states - 1} such as 6,12,18 or 8-16"
    for part in text.split(","):
        part = part.strip()
        lo, dash, hi = part.partition("-")
        try:
            first = int(lo)
            last = int(hi) if dash else first
        except ValueError:
            raise LayersError(f"{option} {spec}: '{part}' is not a layer index or range; {expected}") from None
        if first > last:
            raise LayersError(f"{option} {spec}: the range {part} runs backwards; write {last}-{first}")
        if first < 0 or last >= n_states:
            raise LayersError(f"{option} {spec}: this encoder has hidden states 0-{n_states - 1} "
                              f"({n_states - 1} layers and the input of the first); {part} is outside them")
        picked.update(range(first, last + 1))
    return tuple(sorted(picked))


def layer_setting(indices: Sequence[int], n_states: int) -> str | int | list[int]:
    """How a store's settings record the chosen states (see the module's docstring)."""
    indices = tuple(sorted(set(int(i) for i in indices)))
    if indices == (n_states - 1,):
        return "last"
    if indices == tuple(range(n_states)):
        return "all"
    if len(indices) == 1:
        return indices[0]
    return list(indices)


def has_layer_axis(setting) -> bool:
    """Whether a store with this "layer" setting holds one vector (or frame) per chosen state."""
    return setting == "all" or isinstance(setting, list)


def stored_layers(setting, n_states: int | None = None, *, axis_length: int | None = None) -> tuple[int, ...] | None:
    """The hidden-state indices held along a store's layer axis, in order; None for a store without one.

    For "all", the count comes from `n_states`, or else from the axis itself (`axis_length`)."""
    if isinstance(setting, list):
        return tuple(int(i) for i in setting)
    if setting == "all":
        n = n_states if n_states is not None else axis_length
        if n is None:
            raise LayersError("a store of every layer needs its number of states")
        return tuple(range(int(n)))
    return None


def describe(setting, n_states: int | None = None) -> str:
    """A short human reading of a "layer" setting: `last`, `all 25`, `12`, `6,12,18,24`."""
    if setting == "all":
        return f"all {n_states}" if n_states else "all"
    if isinstance(setting, list):
        return ",".join(str(i) for i in setting)
    return str(setting)
