"""Process-group setup from the launcher's environment. torchrun's variables (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT) are used as they are; under ``srun`` or ``mpirun`` without
torchrun, ``pretrain.launch`` derives them first. A single process without any of those runs
without a process group. NCCL on CUDA, gloo on CPU.

Collectives time out after ``PRETRAIN_DIST_TIMEOUT`` seconds (default 600): long enough for rank 0
to prepare the built-in corpus or write a large checkpoint while the others wait, short enough
that a hung peer ends the job instead of holding the allocation. A peer that dies outright
fails the others' collectives at once (connection reset), without waiting for the timeout.

A gloo process group is destroyed at interpreter exit (atexit), while Python is still whole: left
to the C++ destructors during finalization, gloo's worker threads can release tensors after the
interpreter is gone and abort the process (SIGABRT, "terminate called without an active
exception") after a run that succeeded. NCCL groups are not: destroying one is collective, so
the trainer ends them itself (``shutdown``) on its normal path."""

from __future__ import annotations

import atexit
import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from pretrain.launch import setup_launch_env

DEFAULT_TIMEOUT_S = 600.0


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def collective_timeout() -> timedelta:
    raw = os.environ.get("PRETRAIN_DIST_TIMEOUT", "")
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"PRETRAIN_DIST_TIMEOUT={raw!r} is not a number of seconds") from None
    if seconds <= 0:
        raise ValueError(f"PRETRAIN_DIST_TIMEOUT must be > 0 seconds, got {raw}")
    return timedelta(seconds=seconds)


def init_distributed() -> DistInfo:
    setup_launch_env()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=collective_timeout())
        if backend == "gloo":
            atexit.register(shutdown)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is true on any rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Destroy the process groups, then collect the garbage that still references them (device
    meshes, FSDP state): destroying a group only unregisters it, and a gloo group that lives on
    until finalization aborts the process as the module docstring says."""
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()
