"""Data-parallel set-up under ``torchrun``: process group, device per rank, and the few collectives
the training run needs (barrier, sum, broadcast of the result).

Outside torchrun (no ``WORLD_SIZE`` > 1) everything here is a no-op on one process, so the training
code reads the same either way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from incr_cli import device as devices


def env_rank() -> int:
    """This process's global rank as torchrun set it (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class DistContext:
    rank: int
    world_size: int
    device: torch.device
    owns_group: bool = False  # True when this context initialised the process group

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """In place on every rank; returns the tensor (unchanged on one process)."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_equal(self, value: float) -> bool:
        """True when every rank passed the same ``value`` (a weight fingerprint)."""
        if not self.enabled:
            return True
        t = torch.tensor([value, -value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t[0].item() == value and -t[1].item() == value)

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def setup(device_spec: str) -> DistContext:
    """Resolve the device and, under torchrun, join the process group (NCCL on CUDA, gloo on CPU).

    Each rank uses ``cuda:LOCAL_RANK`` when the recipe's device is CUDA (or auto with CUDA present).
    """
    world_size = env_world_size()
    device = devices.resolve_device(device_spec)
    if world_size <= 1:
        return DistContext(0, 1, device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(minutes=30))
    return DistContext(dist.get_rank(), dist.get_world_size(), device, owns_group=owns)
