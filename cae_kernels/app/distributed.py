"""Data-parallel training under ``torchrun``: joining the process group, and the few collectives.

Every rank walks the same shuffled order and takes its slice of each global batch
(DistributedDataParallel, gloo on the CPU, NCCL on GPUs); rank 0 alone writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["World", "gather", "join_world", "mean_over_ranks"]


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def leave(self) -> None:
        """Ends the process group if ``join_world`` started it."""
        if self.owns_group:
            dist.destroy_process_group()
            self.owns_group = False


def join_world(device: torch.device) -> tuple[World, torch.device]:
    """This process's place among torchrun's (a world of one without torchrun), and its device."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                **({"device_id": device} if device.type == "cuda" else {}))
    return World(rank, size, local_rank, owns), device


def mean_over_ranks(loss_sum: float, seen: int, world: World) -> float:
    """The mean of a per-rank sum over all ranks' ``seen`` items."""
    if world.size > 1:
        totals = torch.tensor([loss_sum, float(seen)], dtype=torch.float64)
        dist.all_reduce(totals)
        loss_sum, seen = totals.tolist()
    return loss_sum / max(seen, 1)


def gather(state: dict, world: World) -> list[dict]:
    """Every rank's ``state``, in rank order."""
    if world.size == 1:
        return [state]
    states = [None] * world.size
    dist.all_gather_object(states, state)
    return states
