"""Gradient-norm clipping over parameters sharded any way (plain, DDP, FSDP2, TP, pipeline).

The global norm is sqrt of the sum of squared gradient entries over the whole model, each entry
counted once: DTensor gradients of the same mesh and placements are reduced together (one
collective per group, summing shards and counting replicas once); plain gradients are
replicated within the stage; pipeline stages add their squares over ``pp_group``. Squares are
accumulated in fp64: in fp32 the rounding of a norm over millions of entries depends on how they
are split into shards (1e-5 relative was measured), which would make the clip factor, and so the
training run, depend on the layout.

On CPU, ``_foreach_norm(..., dtype=float64)`` converts each whole gradient to an fp64 copy first
(1 GB of fresh memory per step for the 125m preset: 1.3 s of its ~10 s CPU step); even cut into
pieces it allocates a fresh fp64 copy of each (12.4M gradient entries: 83 ms, mostly page
faults). Plain CPU gradients are therefore copied ``CPU_CHUNK`` elements at a time into one
reused fp64 buffer, which stays in cache, and summed there by ``dot`` (11 ms): the same exact
squares, summed in fp64.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

CPU_CHUNK = 1 << 16


def _grad_groups(params: Iterable[torch.Tensor]) -> dict[object, list[torch.Tensor]]:
    """Gradients grouped so that each group can go through one foreach kernel: plain tensors
    together, DTensors by (mesh, placements)."""
    groups: dict[object, list[torch.Tensor]] = defaultdict(list)
    for p in params:
        if p.grad is not None:
            g = p.grad
            groups[(g.device_mesh, g.placements) if isinstance(g, DTensor) else None].append(g)
    return groups


def _cpu_square_sum(grads: list[torch.Tensor]) -> torch.Tensor:
    """Σ g² over plain CPU gradients, in fp64: each cut into flat pieces of at most CPU_CHUNK
    elements, copied into one reused fp64 buffer and summed there."""
    buffer = torch.empty(CPU_CHUNK, dtype=torch.float64)
    sums = [torch.zeros((), dtype=torch.float64)]
    for g in grads:
        for piece in g.reshape(-1).split(CPU_CHUNK):
            part = buffer[: piece.numel()]
            part.copy_(piece)
            sums.append(torch.dot(part, part))
    return torch.stack(sums).sum()


@torch.no_grad()
def global_grad_norm(params: Iterable[torch.Tensor], pp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The 2-norm of all gradients (fp32 scalar, a plain tensor, the same on every rank)."""
    squares = []
    for grads in _grad_groups(params).values():
        if not isinstance(grads[0], DTensor):
            on_cpu = [g for g in grads if g.device.type == "cpu"]
            if on_cpu:
                squares.append(_cpu_square_sum(on_cpu))
            grads = [g for g in grads if g.device.type != "cpu"]
            if not grads:
                continue
        norms = torch._foreach_norm(grads, 2.0, dtype=torch.float64)
        square = torch.stack(norms).pow(2).sum()
        squares.append(square.full_tensor() if isinstance(square, DTensor) else square)
    total = torch.stack(squares).sum()
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(total, group=pp_group)
    return total.sqrt().float()


@torch.no_grad()
def clip_grad_norm_(
    params: Iterable[torch.Tensor], max_norm: float, pp_group: dist.ProcessGroup | None = None
) -> float:
    """Scale gradients by min(1, max_norm / (norm + 1e-6)) as torch's clip_grad_norm_ does
    (``max_norm`` 0 or inf: no clipping); returns the norm before clipping."""
    params = list(params)
    norm = float(global_grad_norm(params, pp_group))
    scale = max_norm / (norm + 1e-6) if max_norm > 0 else 1.0
    if scale < 1.0:
        for grads in _grad_groups(params).values():
            torch._foreach_mul_(grads, scale)
    return norm
