"""How far each shard of a store has come, and what is missing (`ser-cache info`, and a shard's last words).

A store extracted with `--shard I/N` is planned as one process plans it (encode.plan_units with one
rank: units of whole chunks), and shard I owns units I, I+N, ... (infra.shards). So any reader can
say, from the store's flags alone, which rows of which shard are still pending, and from the shards'
locks which of them run now. The count N is the store's attribute "shards" (the last N a shard ran with).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ser_cache.features.encode import plan_units
from ser_cache.features.store import FeatureStore
from ser_cache.infra.shards import Shard, lock_target


@dataclass(frozen=True)
class ShardProgress:
    shard: Shard
    chunks: tuple[int, ...]
    rows: int
    written: int
    failed: int
    running: str | None  # who holds the shard's lock now, or None

    @property
    def pending(self) -> int:
        return self.rows - self.written - self.failed

    def to_dict(self) -> dict:
        return {"shard": self.shard.label, "chunks": len(self.chunks), "rows": self.rows, "written": self.written,
                "failed": self.failed, "pending": self.pending, "running": self.running}


def shard_plan(store: FeatureStore) -> list[list[int]]:
    """The units of chunks shards are dealt: one process's plan, whatever the number of shards."""
    return plan_units(store, 1)


def shard_chunks(store: FeatureStore, shard: Shard) -> list[int]:
    """The chunks in `shard`'s share, in plan order."""
    return [c for unit in shard.share(shard_plan(store)) for c in unit]


def recorded_count(store: FeatureStore) -> int | None:
    """N of the last sharded extraction of the store, or None for a store never extracted by shards."""
    shards = store.attrs.get("shards")
    count = shards.get("count") if isinstance(shards, dict) else None
    return int(count) if isinstance(count, int) and count >= 1 else None


def progress(store: FeatureStore, count: int,
             flags: tuple[np.ndarray, np.ndarray] | None = None) -> list[ShardProgress]:
    """Every shard of `count`: its chunks, rows, and how many are written, failed, pending; who runs it."""
    from ser_cache.infra import locks

    written, failed = store.flags() if flags is None else flags
    plan = shard_plan(store)
    out = []
    for i in range(count):
        shard = Shard(i, count)
        chunks = tuple(c for unit in shard.share(plan) for c in unit)
        mask = np.zeros(store.n_rows, dtype=bool)
        for c in chunks:
            start, end = store.chunk_bounds(c)
            mask[start:end] = True
        out.append(ShardProgress(shard, chunks, int(mask.sum()), int((written & mask).sum()),
                                 int((failed & mask & ~written).sum()), locks.holder(lock_target(store.path, shard))))
    return out


def missing_text(rows: list[ShardProgress]) -> str:
    """'shards 0/3 (12 rows), 2/3 (96 rows, running)' for the shards with rows pending; '' when none."""
    parts = [f"{p.shard.label} ({p.pending} row(s){', running' if p.running else ''})" for p in rows if p.pending]
    return ("shard " if len(parts) == 1 else "shards ") + ", ".join(parts) if parts else ""
