"""Expert parallelism: the experts of every MoE layer spread over the ``ep`` ranks, tokens sent
to them and back with ``all_to_all_single``.

``ep`` is borrowed from the data-parallel ranks, as torchtitan does: ``dp_shard`` is cut into
``dp_shard / ep`` (outer) × ``ep`` (inner), so a layout stays pp × dp_replicate × dp_shard × tp.
The ``ep`` ranks hold different data; each holds E/ep consecutive experts (rank r: experts
r·E/ep … (r+1)·E/ep − 1), as DTensors ``Shard(0)`` over ``ep`` (``Replicate`` over ``tp`` when
tensor parallelism runs the routed part redundantly). Every other parameter is unaffected:
FSDP2 shards it over the whole ``dp_shard`` (HSDP: replicated over ``dp_replicate``). Expert
weights are sharded by FSDP2 over the remaining ``dp_shard / ep`` ranks (on their dimension 1,
so that the expert dimension stays whole for ``ep``; HSDP: replicated over ``dp_replicate``
too); their gradients are thus summed over every data-parallel rank, the ep ranks' share
arriving through the all-to-all's backward.

Per forward of a layer (:class:`AllToAllExchange`), on rows already grouped by all E experts:
1. the per-expert counts go through one ``all_to_all_single`` (each rank learns how many rows
   every source sends to each of its experts);
2. the rows go through ``all_to_all_single`` with per-rank splits (autograd: the backward is
   the reverse exchange), arriving grouped by source and, within a source, by expert;
3. a stable sort by local expert groups them for the grouped GEMM;
4. the outputs are put back in arrival order and returned by the reverse all-to-all.
Capacity and routing are decided before the exchange, on the rank's own tokens, so which
tokens an expert drops does not depend on ``ep``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard

from pretrain.parallel.mesh import LayoutError, ParallelDims, flattened


class AllToAllExchange:
    """Rows to and from the ranks of ``group`` that hold their experts (``n_experts`` in all)."""

    def __init__(self, group: dist.ProcessGroup, n_experts: int):
        self.group = group
        self.ep = dist.get_world_size(group)
        self.local = n_experts // self.ep

    def dispatch(self, x: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, object]:
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts.contiguous(), group=self.group)
        received = received.view(self.ep, self.local)  # [source, local expert]
        send = counts.view(self.ep, self.local).sum(1).tolist()
        arrive = received.sum(1).tolist()
        rows = all_to_all_single_autograd(x.contiguous(), arrive, send, self.group)
        experts = torch.arange(self.local, device=x.device).repeat(self.ep)
        order = torch.argsort(torch.repeat_interleave(experts, received.reshape(-1)), stable=True)
        return rows.index_select(0, order), received.sum(0), (order, send, arrive)

    def combine(self, y: torch.Tensor, state: object) -> torch.Tensor:
        order, send, arrive = state
        arrived = torch.zeros_like(y).index_copy(0, order, y)
        return all_to_all_single_autograd(arrived, send, arrive, self.group)

    def local_weights(self, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(w.to_local() if isinstance(w, DTensor) else w for w in weights)


def expert_meshes(dims: ParallelDims, ep: int, mesh: DeviceMesh) -> tuple[DeviceMesh, DeviceMesh]:
    """(the mesh the experts' DTensors live on: ``ep``, or ``ep`` × ``tp``; the mesh FSDP2 shards
    expert weights over: ``dp_shard / ep``, with HSDP (``dp_replicate`` > 1) together with
    ``dp_replicate``). Under context parallelism ``ep`` is cut from ``dp_shard × cp``, whose ranks
    all hold other tokens. Creates process groups: call once per model."""
    inner, rest = "dp_shard", "dp_shard_mod_ep"
    if dims.cp > 1:  # ep ranks are then the inner ranks of dp_shard × cp
        flattened(mesh, "dp_shard_cp")
        inner, rest = "dp_shard_cp", "dp_shard_cp_mod_ep"
    outer = ("dp_replicate",) if dims.dp_replicate > 1 else ()
    size = dims.dp_shard * dims.cp // ep
    split = mesh[(*outer, inner, "tp")]._unflatten(len(outer), (size, ep), (rest, "ep"))
    placed = split["ep", "tp"] if dims.tp > 1 else split["ep"]
    return placed, split[(*outer, rest)]


def expert_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules that accept an exchange (``exchange`` and ``ep_errors``)."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "exchange") and hasattr(m, "ep_errors")]


def apply_ep(model: nn.Module, placed: DeviceMesh, ep: int) -> None:
    """Shard every expert module's parameters over ``ep`` (dimension 0: the experts) and give it
    an all-to-all exchange, in place (before tensor parallelism, which then leaves them)."""
    found = expert_modules(model)
    errors = [e for name, module in found for e in module.ep_errors(ep, name)]
    if errors:
        raise LayoutError("invalid expert parallelism:\n  - " + "\n  - ".join(errors))
    placements = [Shard(0)] + [Replicate()] * (placed.ndim - 1)
    ep_mesh = placed["ep"] if placed.ndim > 1 else placed
    group, rank = ep_mesh.get_group(), ep_mesh.get_local_rank()
    for _, module in found:
        for key, param in list(module.named_parameters(recurse=False)):
            local = param.data.chunk(ep, dim=0)[rank]
            sharded = DTensor.from_local(local, placed, placements, run_check=False, shape=param.shape, stride=param.stride())
            module.register_parameter(key, nn.Parameter(sharded))
        module.exchange = AllToAllExchange(group, module.n_experts)


def shard_experts(
    model: nn.Module, fsdp_mesh: DeviceMesh, param_dtype: torch.dtype | None, reshard_after_forward: bool = True
) -> None:
    """FSDP2 over the ``dp_shard / ep`` ranks for each expert module (before the blocks are
    sharded, which then skip these parameters); dimension 1, so the expert dimension stays whole."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for _, module in expert_modules(model):
        fully_shard(
            module, mesh=fsdp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward,
            shard_placement_fn=lambda p: Shard(1),
        )
