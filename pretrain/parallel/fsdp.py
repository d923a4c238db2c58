"""Data parallelism: FSDP2 (``fully_shard``; HSDP on a 2-D mesh) or DDP for small models.

FSDP2 shards every block separately and the root (embedding, final norm, head) last, so a
block's parameters are all-gathered just before it runs and freed after. On a 2-D
(replicate, shard) mesh this is HSDP: sharded within a group, replicated across groups. Mixed
precision (GPU): parameters are all-gathered and computed in bf16, gradients reduced in fp32.

Gradients are SUMMED over the data-parallel ranks, not averaged: the trainer normalises each
rank's loss by the token count of the whole global batch, so the sum is the global mean
gradient (pretrain/train.py). FSDP2 gets a divide factor of 1; DDP a summing comm hook.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel


def apply_fsdp(
    model: nn.Module,
    dp_mesh: DeviceMesh,
    param_dtype: torch.dtype | None = None,
    reshard_after_forward: bool = True,
) -> None:
    """Shard ``model`` (a whole model or one pipeline stage) over ``dp_mesh`` (1-D: FSDP; 2-D
    (replicate, shard): HSDP) in place, each of its blocks (``block_names()``) as one unit. ``param_dtype`` bf16 turns on mixed precision with fp32
    gradient reduction. ``reshard_after_forward=False`` keeps gathered parameters until backward
    (pipeline parallelism: no all-gather per micro-batch)."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for name in model.block_names():
        block = model.get_submodule(name)
        fully_shard(block, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    # The root's parameters (embedding, final norm, head...) are needed again right at the start of backward.
    fully_shard(model, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=False)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: no PREMUL_SUM (gloo lacks it)


def _sum_allreduce_hook(group, bucket):
    """DDP comm hook summing a gradient bucket. (No annotations: DDP checks them at runtime,
    and postponed evaluation would turn them into strings.)"""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda future: future.value()[0])


def apply_ddp(model: nn.Module, dp_mesh: DeviceMesh) -> DistributedDataParallel:
    """Replicate ``model`` over ``dp_mesh`` (1-D) with DDP, summing gradients.

    ``find_unused_parameters=True`` keeps the gradient buckets fixed: otherwise DDP rebuilds them
    after its first iteration, and since bucket boundaries set the all-reduce's summation order,
    a resumed run (whose first step uses the initial buckets) drifted from the uninterrupted one
    by ~1e-7 (measured with 4 ranks; tests/parallel/test_layout_resume.py). It also lets modules
    leave parameters unused in a step (experts that receive no tokens). The cost is one walk of
    the autograd graph per step, and torch warns once per rank that nothing was unused."""
    group = dp_mesh.get_group()
    wrapped = DistributedDataParallel(model, process_group=group, find_unused_parameters=True)
    wrapped.register_comm_hook(group, _sum_allreduce_hook)
    return wrapped
