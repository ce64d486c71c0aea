"""Data-parallel set-up under ``torchrun``: process group, device per rank, and the few collectives
the training run needs (barrier, sum, broadcast of the result).

Outside torchrun (no ``WORLD_SIZE`` > 1) everything here is a no-op on one process, so the training
code reads the same either way.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from incr_cli.errors import RankLost
from incr_cli.runtime import device as devices


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
    timeout_s: float = 1800.0  # how long a collective waits for the other ranks

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            with self.collective("a barrier"):
                dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """In place on every rank; returns the tensor (unchanged on one process)."""
        if self.enabled:
            with self.collective("a sum across ranks"):
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        with self.collective("the broadcast of rank 0's result"):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_equal(self, value: float) -> bool:
        """True when every rank passed the same ``value`` (a weight fingerprint)."""
        if not self.enabled:
            return True
        t = torch.tensor([value, -value], dtype=torch.float64, device=self.device)
        with self.collective("the comparison of the ranks' weights"):
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t[0].item() == value and -t[1].item() == value)

    @contextmanager
    def collective(self, what: str) -> Iterator[None]:
        """A collective (or a DDP backward) whose peer died (connection closed) or never came (the
        timeout): RankLost, one line on every surviving rank, instead of a backend traceback or a
        wait without end. Other errors pass through."""
        try:
            yield
        except RuntimeError as exc:
            if not self.enabled or not _is_rank_failure(exc):
                raise
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            timed_out = "timed out" in str(exc).lower() or "timeout" in str(exc).lower()
            why = (f"no answer within runtime.collective_timeout={self.timeout_s:g}s" if timed_out
                   else "the connection to another rank broke")
            _ignore_sigterm()
            raise RankLost(f"rank {self.rank} of {self.world_size}: {why} during {what} ({first}); a rank died, "
                           "hung or was stopped; nothing was promoted: rerun the same command to resume from "
                           "the last saved state") from exc

    def close(self, *, together: bool = False) -> None:
        """Leave the process group; ``together`` (every rank ends the command the same way): after a
        barrier, so that no rank tears gloo down while a peer is still finishing the last collective
        (that race aborted a rank at exit: "terminate called without an active exception")."""
        if self.owns_group and dist.is_initialized():
            if together:
                try:
                    with self.collective("the last barrier"):
                        dist.barrier()
                except RankLost:
                    pass  # a peer is gone: leave anyway
            dist.destroy_process_group()


def _ignore_sigterm() -> None:
    """This rank is failing with its one line: once a rank died, torchrun stops the others with
    SIGTERM, which must not cut that line off (torchrun still kills a rank that does not exit)."""
    try:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except ValueError:  # not the main thread
        pass


_RANK_FAILURE_TEXTS = ("gloo", "nccl", "connection closed", "connection reset", "broken pipe", "timed out",
                       "timeout", "socket")


def _is_rank_failure(exc: RuntimeError) -> bool:
    """A backend error (peer gone, timeout), not a bug in the step that happened to run collectively."""
    return isinstance(exc, dist.DistError) or any(t in str(exc).lower() for t in _RANK_FAILURE_TEXTS)


def setup(device_spec: str, timeout_s: float = 1800.0) -> DistContext:
    """Resolve the device and, under torchrun, join the process group (NCCL on CUDA, gloo on CPU).

    Each rank uses ``cuda:LOCAL_RANK`` when the recipe's device is CUDA (or auto with CUDA present).
    A collective that waits longer than ``timeout_s`` for the other ranks (one hung or was stopped)
    fails with ``RankLost``; it must exceed the longest rank-0-only stretch (the parent's evaluation,
    the version write), which the other ranks spend waiting.
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
                                timeout=timedelta(seconds=timeout_s))
    return DistContext(dist.get_rank(), dist.get_world_size(), device, owns_group=owns, timeout_s=timeout_s)
