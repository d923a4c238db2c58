"""Pipeline parallelism: the model cut by blocks into stages, run by torch.distributed.pipelining.

A stage is the model itself with parts removed. The family lists its model as ordered units
(``pipeline_units()``: one block each, plus the modules that must share its stage, e.g. the
embedding with the first block, the final norm and head with the last); a stage keeps a
contiguous run of units and every other unit's modules are removed (deleted from their
ModuleDict, which keeps the other keys, or set to None), so parameter names — and checkpoints —
do not depend on the split. The last stage's output goes to the family's loss.

Stage placement: ``pp`` ranks hold ``virtual_stages`` stages each; stage ``s`` lives on rank
``s mod pp`` (looped, for GPipe / 1F1B / interleaved schedules) or, for ``zbv``, rank ``r`` holds
stages ``r`` and ``2·pp − 1 − r`` (V-shaped). The local batch of one optimizer step is cut into
the step's micro-batches by the schedule.

Stage boundaries carry whatever the stage returns: one tensor, or a tuple of tensors (a model
family whose stages must pass more than the hidden states, e.g. a global KV or an encoder
output, returns a tuple and takes the same tuple positionally). Per-forward inputs (the
family's ``inputs`` keyword arguments: positions, segment ids) are given to every stage. Under
sequence parallelism a floating-point tensor crossing a boundary travels as its local shard;
residual-stream activations (all floating-point ones, unless the stage module lists which in
``boundary_residual``, a tuple of flags) become ``Shard(1)`` DTensors again on arrival.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)
from torch.distributed.tensor import DTensor, Shard

SCHEDULES = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "interleaved_zb": ScheduleInterleavedZeroBubble,
    "zbv": ScheduleZBVZeroBubble,
}

def stage_layer_counts(n_layers: int, n_stages: int, explicit: list[int] | None = None) -> list[int]:
    """Blocks per stage: ``explicit`` when given, else an even split whose remainder goes to the
    middle stages first (the first and last stages also carry the embedding and the head+loss);
    of two stages equally near the middle, the earlier one gets its extra block first."""
    if explicit:
        return list(explicit)
    base, extra = divmod(n_layers, n_stages)
    counts = [base] * n_stages
    middle_first = sorted(range(n_stages), key=lambda s: -min(s, n_stages - 1 - s))
    for stage in middle_first[:extra]:
        counts[stage] += 1
    return counts


def local_stage_ids(pp_rank: int, pp: int, virtual_stages: int, schedule: str) -> list[int]:
    """The stages pipeline rank ``pp_rank`` holds: looped, or V-shaped for ``zbv``."""
    if schedule == "zbv":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(virtual_stages)]


def check_units(model: nn.Module) -> list[tuple[str, ...]]:
    """The model's pipeline units, checked: every parameter belongs to exactly one unit."""
    units = model.pipeline_units()
    names = [name for unit in units for name in unit]
    if len(set(names)) != len(names):
        raise ValueError(f"{type(model).__name__}.pipeline_units() names a module twice: {names}")
    for param in dict(model.named_parameters()):
        if not any(param == n or param.startswith(n + ".") for n in names):
            raise ValueError(
                f"parameter {param} belongs to no unit of {type(model).__name__}.pipeline_units(); every parameter "
                "must live on exactly one pipeline stage"
            )
    return units


def remove_module(model: nn.Module, name: str) -> None:
    """Delete submodule ``name`` from its parent ModuleDict, or set the attribute to None."""
    owner, _, leaf = name.rpartition(".")
    parent = model.get_submodule(owner)
    if isinstance(parent, nn.ModuleDict):
        del parent[leaf]
    else:
        setattr(parent, leaf, None)


def split_stage(model: nn.Module, stage: int, block_counts: list[int]) -> nn.Module:
    """A copy of ``model`` (typically on the meta device) holding only stage ``stage``'s units."""
    units = check_units(model)
    if sum(block_counts) != len(units):
        raise ValueError(f"stages of {block_counts} blocks do not add up to the model's {len(units)} blocks")
    start = sum(block_counts[:stage])
    keep = {name for unit in units[start : start + block_counts[stage]] for name in unit}
    part = copy.deepcopy(model)
    for unit in units:
        for name in unit:
            if name not in keep:
                remove_module(part, name)
    return part


def _to_local(value):
    """The local shard, as a tensor of its own: ``to_local`` returns a view, and the zero-bubble
    schedules free a stage's outputs with an in-place ``detach_``, which views refuse."""
    if not isinstance(value, DTensor):
        return value
    local = value.to_local()
    return local.clone() if local._is_view() else local


def shard_boundaries(part: nn.Module, tp_mesh: DeviceMesh, first: bool, last: bool) -> None:
    """Sequence parallelism across stage boundaries: send local sequence shards, receive them
    back as ``Shard(1)`` DTensors."""

    flags = getattr(part, "boundary_residual", None)

    def receive(module, args, kwargs):
        residual = flags or tuple(torch.is_tensor(a) and a.is_floating_point() for a in args)
        wrapped = tuple(DTensor.from_local(a, tp_mesh, [Shard(1)]) if r else a for a, r in zip(args, residual))
        return wrapped, kwargs

    def send(module, args, output):
        return tuple(_to_local(o) for o in output) if isinstance(output, tuple) else _to_local(output)

    if not first:
        part.register_forward_pre_hook(receive, with_kwargs=True)
    if not last:
        part.register_forward_hook(send)


def _isolated(method: Callable, module: nn.Module, quiet: Callable[[], contextlib.AbstractContextManager]):
    """``method`` with the module's buffers restored afterwards and ``quiet()`` entered."""

    def run(*args, **kwargs):
        saved = [(buffer, buffer.detach().clone()) for buffer in module.buffers()]
        try:
            with quiet():
                return method(*args, **kwargs)
        finally:
            with torch.no_grad():
                for buffer, value in saved:
                    buffer.copy_(value)

    return run


def build_schedule(
    parts: list[nn.Module],
    stage_ids: list[int],
    n_stages: int,
    schedule: str,
    n_microbatches: int,
    loss_fn: Callable,
    pp_group,
    device: torch.device,
    quiet: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
):
    """The pipeline schedule over this rank's stage modules ``parts`` (stage ids ``stage_ids``).
    ``loss_fn(output, target)`` returns each micro-batch's share of the step loss (already
    normalised over the global batch), so gradients are not rescaled.

    The schedule infers the shapes crossing each boundary by running every stage's forward (and
    the loss, and a backward) once on placeholder tensors, at the first step and again after each
    switch between training and evaluation. Those runs must not count: each stage's buffers
    (statistics that modules keep) are restored after them, and ``quiet()`` is entered around
    them (the runner stops recording loss terms)."""
    stages = [
        PipelineStage(part, stage_id, n_stages, device, group=pp_group) for part, stage_id in zip(parts, stage_ids)
    ]
    for stage, part in zip(stages, parts):
        stage._prepare_forward_infra = _isolated(stage._prepare_forward_infra, part, quiet)
        stage._prepare_backward_infra = _isolated(stage._prepare_backward_infra, part, quiet)
    cls = SCHEDULES[schedule]
    if schedule in ("gpipe", "1f1b"):
        return cls(stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
    return cls(stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
