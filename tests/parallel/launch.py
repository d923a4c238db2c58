"""Run a function on N CPU ranks (gloo) and collect what each rank returns.

Processes come from a forkserver that has already imported torch and the parallel package, so a
launch costs a fraction of a second instead of an import of torch per rank.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pretrain.distributed import shutdown

PRELOAD = ["torch", "torch.distributed", "pretrain.parallel.runtime", "tests.parallel.workloads"]
_preloaded = False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save(result, Path(out_dir) / f"{rank}.pt")
    finally:
        shutdown()


def run_ranks(world: int, fn, *args) -> list:
    """``fn(rank, world, *args)`` on ``world`` processes under one gloo process group; returns
    the list of per-rank results. A failure on any rank raises here with its traceback."""
    global _preloaded
    if not _preloaded:
        multiprocessing.set_forkserver_preload(PRELOAD)
        _preloaded = True
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            _worker, args=(world, free_port(), out_dir, fn, args), nprocs=world, start_method="forkserver"
        )
        return [torch.load(Path(out_dir) / f"{rank}.pt", weights_only=False) for rank in range(world)]


def launches_by_world(fn, *args):
    """``results(world)``: ``run_ranks(world, fn, *args)``, launched once per world size (for a
    module fixture whose tests each read one layout of a launch)."""
    cache: dict[int, list] = {}

    def results(world: int) -> list:
        if world not in cache:
            cache[world] = run_ranks(world, fn, *args)
        return cache[world]

    return results
