"""A tree of tensors, arrays and plain values as ONE safetensors file that loading cannot run code from.

What a fine-tuning checkpoint holds is a tree: dicts of module and optimizer tensors, generator
states (tuples of ints, numpy arrays), scores, histories. Pickling it (torch.save) made loading a
checkpoint someone sent you run whatever its author put in it. Here the tensors and arrays go into
a safetensors file, and everything else into its metadata as JSON, each tensor replaced by a tagged
reference; loading parses a header and JSON and builds only tensors, arrays, tuples, dicts, lists
and scalars. One file, written beside its target and renamed (atomic.py): a kill -9 leaves the
previous file or the new one, never a mix.

Encoding (the "tree" metadata entry; plain JSON values stand for themselves):

    {"__t": "tensor", "key": K}             torch tensor K of the file (on the CPU when loaded)
    {"__t": "ndarray", "key": K, "dtype": D} numpy array of dtype D, stored as tensor K
    {"__t": "np", "dtype": D, "value": V}    numpy scalar
    {"__t": "tuple", "items": [...]}         tuple (random.setstate insists on one)
    {"__t": "dict", "items": [[k, v], ...]}  dict with keys that are not strings (an optimizer's
                                             state is keyed by int), or with a "__t" key

Floats round-trip exactly: JSON writes a float's shortest repr, NaN and ±Infinity included.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ser_cache.infra.atomic import atomic_path

TAG = "__t"


class StateFileError(Exception):
    """The file is not a readable state file of the expected format; the message names it."""


def save(path: str | Path, tree, *, fmt: str, version: int) -> Path:
    """Write `tree` to `path` atomically, tagged with format `fmt` and `version`."""
    import torch
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(tree, "", tensors)
    metadata = {"format": fmt, "format_version": str(version), "tree": json.dumps(encoded, allow_nan=True)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def load(path: str | Path, *, fmt: str, version: int, tensors: bool = True, what: str | None = None):
    """The tree in `path`; StateFileError (naming the file) for anything that is not one of format `fmt`.

    tensors=False reads the header alone (cheap for a multi-GB file) and gives None for every
    tensor and array. `what` names the kind of file in messages (default: `fmt`).
    """
    from safetensors import SafetensorError, safe_open

    path, what = Path(path), what or f"{fmt} file"
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            _check_format(path, metadata, fmt, version, what)
            stored = {k: f.get_tensor(k) for k in f.keys()} if tensors else None
    except (SafetensorError, OSError, ValueError) as exc:
        # A truncated or foreign file: safetensors cannot even read its header.
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StateFileError(f"{path}: not a readable {what} ({reason}); it is truncated or damaged") from None
    try:
        return _decode(json.loads(metadata["tree"]), stored)
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise StateFileError(f"{path}: its content does not decode ({type(exc).__name__}: {exc}); "
                             "the file is damaged") from None


def _check_format(path: Path, metadata: dict, fmt: str, version: int, what: str) -> None:
    if metadata.get("format") != fmt or "tree" not in metadata:
        raise StateFileError(f"{path}: a safetensors file, but not a {what} (format={metadata.get('format')!r})")
    try:
        theirs = int(metadata.get("format_version", ""))
    except ValueError:
        raise StateFileError(f"{path}: format_version {metadata.get('format_version')!r} is not a whole "
                             "number") from None
    if theirs > version:
        raise StateFileError(f"{path}: {what} format version {theirs} is newer than this ser-cache reads ({version}); "
                             "upgrade ser-cache")


# --------------------------------------------------------------------------- the encoding


def _encode(obj, where: str, tensors: dict):
    import torch

    if obj is None or isinstance(obj, (bool, int, float, str)) and not isinstance(obj, np.generic):
        return obj
    if isinstance(obj, torch.Tensor):
        return {TAG: "tensor", "key": _put(tensors, where, obj.detach().cpu().contiguous())}
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf":
            raise TypeError(f"{where}: a numpy array of dtype {obj.dtype} cannot be stored")
        return {TAG: "ndarray", "dtype": obj.dtype.str,
                "key": _put(tensors, where, torch.from_numpy(np.ascontiguousarray(obj).copy()))}
    if isinstance(obj, np.generic):
        return {TAG: "np", "dtype": obj.dtype.str, "value": obj.item()}
    if isinstance(obj, tuple):
        return {TAG: "tuple", "items": [_encode(v, f"{where}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{where}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and TAG not in obj:
            return {k: _encode(v, f"{where}/{k}", tensors) for k, v in obj.items()}
        return {TAG: "dict", "items": [[_encode(k, f"{where}/key", tensors), _encode(v, f"{where}/{k}", tensors)]
                                       for k, v in obj.items()]}
    raise TypeError(f"{where or 'the root'}: a {type(obj).__name__} cannot be stored in a state file")


def _put(tensors: dict, where: str, tensor) -> str:
    """The tensor's name in the file: its place in the tree (readable with any safetensors tool), made unique."""
    key = where.lstrip("/") or "root"
    name, n = key, 1
    while name in tensors:
        name, n = f"{key}~{n}", n + 1
    tensors[name] = tensor
    return name


def _decode(obj, tensors: dict | None):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    tag = obj.get(TAG)
    if tag is None:
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if tag == "tensor":
        return None if tensors is None else tensors[obj["key"]]
    if tag == "ndarray":
        return None if tensors is None else tensors[obj["key"]].numpy().astype(_numeric(obj["dtype"]), copy=False)
    if tag == "np":
        return _numeric(obj["dtype"]).type(obj["value"])
    if tag == "tuple":
        return tuple(_decode(v, tensors) for v in obj["items"])
    if tag == "dict":
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["items"]}
    raise ValueError(f"unknown tag {tag!r}")


def _numeric(name: str) -> np.dtype:
    dtype = np.dtype(str(name))
    if dtype.kind not in "biuf":
        raise ValueError(f"dtype {name!r} is not numeric")
    return dtype
