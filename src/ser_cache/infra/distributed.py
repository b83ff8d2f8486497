"""torch.distributed, only when launched by torchrun: one process per device, rank 0 does the I/O that must happen
once."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from ser_cache.infra.runtime import rank_device


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def device(self, requested: str) -> str:
        """Each rank gets its own GPU (cuda:LOCAL_RANK) when the device is auto or plain cuda."""
        return rank_device(requested, self.local_rank) if self.enabled else requested

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def broadcast(self, obj):
        """Rank 0's object, on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out


def init(timeout: timedelta | None = None) -> Dist:
    """Join the process group torchrun describes in the environment; a plain run is rank 0 of 1.

    `timeout` bounds how long a rank waits for the others at a collective (torch's default when
    None: 10 minutes with NCCL). If a rank dies, torchrun stops the others whatever the timeout.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("SER_CACHE_BACKEND") != "gloo" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        kwargs = {} if timeout is None else {"timeout": timeout}
        torch.distributed.init_process_group(backend=backend, **kwargs)
    return Dist(rank=rank, world=world, local_rank=local_rank)


def shutdown(dist: Dist) -> None:
    if dist.enabled and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def decoding_workers(device_type: str, *, gpu_cap: int, cpu_cap: int) -> int:
    """Audio-decoding processes for this rank by default: its share of this machine's cores
    (torchrun's LOCAL_WORLD_SIZE ranks share them), less one for the rank itself; at least one
    and at most `gpu_cap` on a GPU, at most `cpu_cap` on a CPU (where they compete with the
    model's own threads)."""
    cpus = os.cpu_count() or 1
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    share = cpus // local - 1
    if device_type == "cuda":
        return max(1, min(gpu_cap, share))
    return max(0, min(cpu_cap, share))
