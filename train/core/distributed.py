"""Process group for ``torchrun`` launches (DDP), or a plain single process without it.

``torchrun --nproc_per_node=N -m train.<task> ...`` sets RANK/WORLD_SIZE/LOCAL_RANK; we then
join a process group (nccl on CUDA, gloo on CPU). Only rank 0 writes files. Shutdown goes through
``dist.barrier()`` before ``destroy_process_group()``: without it 2 of 21 gloo runs aborted at
exit with "terminate called without an active exception" (PERF.md).
"""
from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistributedContext:
    """Where this process stands: its rank, the world size and the device it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def sum(self, *values: float) -> list[float]:
        """Element-wise sum of ``values`` over ranks (e.g. loss sums and sample counts)."""
        if not self.distributed:
            return [float(v) for v in values]
        return [float(sum(column)) for column in zip(*self.gather([float(v) for v in values]))]

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def setup_distributed(prefer_cuda: bool = True) -> DistributedContext:
    """Join the torchrun process group if RANK/WORLD_SIZE are set; pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    # One GPU per local process or none at all: mixing would need two backends.
    cuda = prefer_cuda and torch.cuda.is_available() and torch.cuda.device_count() >= local_world
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(minutes=30))
        if not cuda:
            # torchrun already sets OMP_NUM_THREADS=1; keep N processes from fighting over N cores.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown_distributed(context: DistributedContext, clean: bool = True) -> None:
    """Leave the process group: barrier first, then destroy (see the module docstring).

    After a failure (``clean=False``) the barrier is skipped: the other ranks may never reach it,
    and torchrun stops them anyway once one rank exits with an error.
    """
    if context.distributed and dist.is_initialized():
        try:
            if clean:
                dist.barrier()
        finally:
            dist.destroy_process_group()
    sys.stderr.flush()
