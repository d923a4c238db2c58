"""Build this rank's part of the model under a layout: split, TP/SP, recompute, compile, FSDP,
then materialise and initialise.

The model is built on the meta device (no memory), cut into this rank's pipeline stages, each
stage parallelised in torchtitan's order (tensor parallel → activation recomputation → compile →
FSDP), and only then allocated on the device. Initialisation (``parallel.init``): ``full``
initialises a complete CPU copy from the seed exactly as one process would and copies this rank's
shards out of it; ``sharded`` runs the model's ``init_weights`` on the shards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh

from models.spec import ModelSpec, build_model, get_spec
from pretrain.names import clean_key
from pretrain.parallel.compile import apply_compile
from pretrain.parallel.config import ParallelConfig
from pretrain.parallel.context.apply import apply_cp
from pretrain.parallel.fsdp import apply_fsdp
from pretrain.parallel.mesh import ParallelDims, flattened
from pretrain.parallel.pipeline import local_stage_ids, shard_boundaries, split_stage, stage_layer_counts
from pretrain.parallel.recompute import apply_ac
from pretrain.parallel.ep import apply_ep, expert_meshes, shard_experts
from pretrain.parallel.tp import apply_tp


@dataclass
class ModelParts:
    """This rank's pipeline stages (one part without pipeline parallelism), the family's spec
    and the whole model's block order."""

    parts: list[nn.Module]
    stage_ids: list[int]
    n_stages: int
    spec: ModelSpec
    block_order: list[str]

    @property
    def has_first(self) -> bool:
        return 0 in self.stage_ids

    @property
    def has_last(self) -> bool:
        return self.n_stages - 1 in self.stage_ids


def fsdp_mesh(dims: ParallelDims, mesh: DeviceMesh) -> DeviceMesh:
    """FSDP over ``dp_shard``, or HSDP over (``dp_replicate``, ``dp_shard``); with context
    parallelism the shard dimension is ``dp_shard`` × ``cp``."""
    shard = "dp_shard"
    if dims.cp > 1:
        shard = "dp_shard_cp"
        flattened(mesh, shard)
    return mesh["dp_replicate", shard] if dims.dp_replicate > 1 else mesh[shard]


def build_parts(
    model_config,
    parallel: ParallelConfig,
    dims: ParallelDims,
    mesh: DeviceMesh | None,
    device: torch.device,
    *,
    recompute: str = "none",
    recompute_every: int = 1,
    param_dtype: torch.dtype | None = None,
    seed: int = 0,
) -> ModelParts:
    """Parallelised, initialised model parts of this rank (``mesh`` None: one process)."""
    with torch.device("meta"):
        model = build_model(model_config)
    block_order = model.block_names()
    n_stages = dims.pp * parallel.virtual_stages
    if dims.pp > 1:
        pp_rank = mesh["pp"].get_local_rank()
        stage_ids = local_stage_ids(pp_rank, dims.pp, parallel.virtual_stages, parallel.pp_schedule)
        counts = stage_layer_counts(len(block_order), n_stages, parallel.pp_stage_layers)
        parts = [split_stage(model, s, counts) for s in stage_ids]
    else:
        stage_ids, parts = [0], [model]
    ep = parallel.ep
    experts_placed, experts_fsdp = expert_meshes(dims, ep, mesh) if ep > 1 else (None, None)
    for part, stage in zip(parts, stage_ids):
        if ep > 1:
            apply_ep(part, experts_placed, ep)
        if dims.tp > 1:
            apply_tp(part, mesh["tp"], dims.sp)
            if dims.sp and dims.pp > 1:
                shard_boundaries(part, mesh["tp"], first=stage == 0, last=stage == n_stages - 1)
        if dims.cp > 1:
            apply_cp(part, mesh["cp"], parallel.cp_mode)
        apply_ac(part, recompute, recompute_every, block_order=block_order)
        if parallel.compile:
            apply_compile(part, parallel.compile_backend)
        if ep > 1:
            shard_experts(part, experts_fsdp, param_dtype, reshard_after_forward=dims.pp == 1)
        if dims.fsdp:
            apply_fsdp(part, fsdp_mesh(dims, mesh), param_dtype, reshard_after_forward=dims.pp == 1)
    for part in parts:
        part.to_empty(device=device)
        if hasattr(part, "tie_weights"):  # to_empty replaces plain Parameters, untying a tied head
            part.tie_weights()
    if parallel.init == "full" and mesh is not None:
        _init_from_full_copy(parts, model_config, seed)
    else:  # sharded init, or one process (its only part is the whole model)
        _init_sharded(parts, dims, mesh, seed)
    return ModelParts(parts, stage_ids, n_stages, get_spec(model_config), block_order)


@torch.no_grad()
def _init_from_full_copy(parts: list[nn.Module], model_config, seed: int) -> None:
    """Initialise a complete model on the CPU as one process would (seed, then init_weights)
    and copy each part's entries (whole tensors, or this rank's shards of them) into it, and its
    non-persistent buffers (not in a state dict, so ``to_empty`` left them uninitialised: e.g.
    an MoE layer's statistics and hash table)."""
    with torch.device("meta"):
        full = build_model(model_config)
    full.to_empty(device="cpu")
    torch.manual_seed(seed)
    full.init_weights()
    values = full.state_dict()
    buffers = dict(full.named_buffers())
    options = StateDictOptions(full_state_dict=True)
    for part in parts:
        keys = get_model_state_dict(part).keys()
        set_model_state_dict(part, {key: values[key] for key in keys}, options=options)
        for name, buffer in part.named_buffers():
            if clean_key(name) not in keys:
                buffer.copy_(buffers[clean_key(name)])


@torch.no_grad()
def _init_sharded(parts: list[nn.Module], dims: ParallelDims, mesh: DeviceMesh | None, seed: int) -> None:
    """``init_weights`` on the shards; the seed differs per (pp, dp_shard, tp) coordinate so that
    shards differ, and replicas (dp_replicate) initialise alike."""
    offset = 0
    if mesh is not None:
        pp, shard, cp, tp = (mesh[name].get_local_rank() for name in ("pp", "dp_shard", "cp", "tp"))
        offset = ((pp * dims.dp_shard + shard) * dims.cp + cp) * dims.tp + tp
    torch.manual_seed(seed + offset)
    for part in parts:
        part.init_weights()
