"""torchrun support: which rank does which tensors, and the few collective steps a run needs.

Tensors are independent, so ranks share nothing but the store directory and the preallocated
output shards: rank 0 lays those out, every rank writes its own tensors at their offsets, and
rank 0 finalises after a barrier. Outside torchrun every function here is a no-op for rank 0 of 1.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_from_env(device_name: str) -> Ranks:
    """Join the torchrun job described by the environment (RANK, WORLD_SIZE, LOCAL_RANK)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Ranks()
    ranks = Ranks(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        use_cuda = device_name != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(ranks.local_rank)
        # A generous timeout: rank 0 may finalise large outputs while the others wait.
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(hours=2)
        )
    return ranks


def device_for(device_name: str, ranks: Ranks) -> str:
    """Each rank picks its own GPU (LOCAL_RANK) when on CUDA."""
    if ranks.distributed and device_name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{ranks.local_rank}"
    return device_name


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        dist.barrier()


def broadcast(value, ranks: Ranks):
    """Rank 0's value, on every rank (a small picklable object)."""
    if not ranks.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value, ranks: Ranks) -> list:
    """Every rank's value (a small picklable object), on every rank."""
    if not ranks.distributed:
        return [value]
    boxes: list = [None] * ranks.world_size
    dist.all_gather_object(boxes, value)
    return boxes


def shutdown(ranks: Ranks) -> None:
    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()
