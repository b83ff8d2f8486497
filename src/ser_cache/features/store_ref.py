"""What identifies a store's numbers: the fingerprint of its settings and the digest of its rows."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence


def fingerprint(settings: dict) -> str:
    """A short hash of everything that changes the numbers in a store (canonical JSON, sha256)."""
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def settings_differences(a: dict, b: dict, *, labels: tuple[str, str], keys=None, ignore=()) -> list[str]:
    """'key: <labels[0]> <a's value>, <labels[1]> <b's value>' for every setting that differs."""
    keys = sorted(set(a) | set(b)) if keys is None else keys
    return [f"{k}: {labels[0]} {a.get(k)!r}, {labels[1]} {b.get(k)!r}"
            for k in keys if k not in ignore and a.get(k) != b.get(k)]


def ids_digest(ids: Sequence[str]) -> str:
    """A hash of the row order: a store built over other utterances must not be resumed."""
    h = hashlib.sha256()
    for i in ids:
        h.update(i.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]
