"""The device mesh: ParallelConfig resolved against the world size, checked, then built.

Mesh dimensions are declared once, in ``MESH_DIMS`` (outermost first: ``pp``, ``dp_replicate``,
``dp_shard``, ``cp``, ``tp``; tensor parallelism innermost, so its frequent collectives stay between
neighbouring ranks of one node), and the flattened views in ``FLATTENED``: ``dp`` =
``dp_replicate × dp_shard``, the data-parallel coordinates that cut the global batch and
normalise the loss. A new dimension (context or expert parallelism) is an entry in each table
and a field of ParallelConfig / ParallelDims; building and validating the mesh follow the tables.

``check_layout`` lists every violation (world size, the model's sizes that tp must divide, blocks
per pipeline stage, the family's own constraints, batch per data-parallel rank, micro-batches per
pipeline schedule) in one error, before anything is allocated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from pretrain.parallel.config import ParallelConfig

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
FLATTENED = {"dp": ("dp_replicate", "dp_shard")}
# Context parallelism: parameters are sharded over dp_shard × cp, the loss reduced over dp × cp.
FLATTENED.update(dp_shard_cp=("dp_shard", "cp"), dp_cp=("dp_replicate", "dp_shard", "cp"))


class LayoutError(ValueError):
    """The parallel layout does not fit the world, the model or the batch."""


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of each mesh dimension (``dp_shard`` resolved) for a world of ``world`` ranks."""

    pp: int
    dp_replicate: int
    dp_shard: int
    tp: int
    sp: bool
    world: int
    cp: int = 1

    @classmethod
    def resolve(cls, parallel: ParallelConfig, world: int | None) -> ParallelDims:
        """``world`` None (not known yet): ``dp_shard=-1`` counts as 1."""
        dp_shard = parallel.dp_shard
        others = parallel.pp * parallel.dp_replicate * parallel.tp * parallel.cp
        if dp_shard == -1 and world is None:
            dp_shard = 1
        elif dp_shard == -1:
            dp_shard = world // others if others > 0 and world % others == 0 else 0
        if world is None:
            world = others * dp_shard
        sp = parallel.sp and parallel.tp > 1
        return cls(parallel.pp, parallel.dp_replicate, dp_shard, parallel.tp, sp, world, parallel.cp)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, name) for name in MESH_DIMS)

    @property
    def fsdp(self) -> bool:
        """Parameters are sharded (FSDP2), or replicated by FSDP2 because DDP cannot hold
        DTensor or pipeline-stage parameters alongside TP/PP."""
        return self.dp_shard > 1 or self.cp > 1 or (self.dp_replicate > 1 and (self.tp > 1 or self.pp > 1))

    @property
    def ddp(self) -> bool:
        return self.dp_replicate > 1 and not self.fsdp

    def describe(self) -> str:
        """E.g. ``pp=2 dp_replicate=1 dp_shard=2 tp=2 sp (FSDP2)``."""
        flavour = " (FSDP2)" if self.fsdp else " (DDP)" if self.ddp else ""
        sp = " sp" if self.sp else ""
        degrees = " ".join(f"{name}={getattr(self, name)}" for name in MESH_DIMS)
        return f"{degrees}{sp}{flavour}"


def microbatch_errors(parallel: ParallelConfig, n_microbatches: int) -> list[str]:
    """What the pipeline schedules require of the micro-batches per step and pipeline rank."""
    if parallel.pp == 1:
        return []
    stages = parallel.pp * parallel.virtual_stages
    errors = []
    if parallel.pp_schedule != "gpipe" and n_microbatches < parallel.pp:
        errors.append(
            f"parallel.pp_schedule={parallel.pp_schedule} needs at least pp={parallel.pp} micro-batches per step, "
            f"got {n_microbatches} (train.global_batch / (data-parallel size x train.micro_batch)); "
            "raise train.global_batch or lower train.micro_batch"
        )
    if parallel.pp_schedule == "zbv" and n_microbatches < stages:
        errors.append(f"parallel.pp_schedule=zbv needs at least {stages} micro-batches per step, got {n_microbatches}")
    if parallel.pp_schedule.startswith("interleaved"):
        rounds = max(1, n_microbatches // parallel.pp)
        if n_microbatches % rounds:
            errors.append(
                f"parallel.pp_schedule={parallel.pp_schedule}: {n_microbatches} micro-batches per step is not a "
                f"multiple of its {rounds} rounds; use a multiple of pp={parallel.pp}"
            )
    return errors


def layout_errors(
    parallel: ParallelConfig, model, world: int | None, *, global_batch: int, micro_batch: int, seq_len: int
) -> tuple[ParallelDims, list[str]]:
    """``parallel`` resolved for ``world`` ranks, and every problem it has with the model config
    and the batch (an empty list when it fits). ``world`` None skips what needs the world size."""
    errors = parallel.validate()
    dims = ParallelDims.resolve(parallel, world)
    product = math.prod(dims.shape)
    if world is not None and parallel.dp_shard == -1 and dims.dp_shard < 1:
        others = parallel.pp * parallel.dp_replicate * parallel.tp * parallel.cp
        errors.append(
            f"{world} rank(s) cannot be split into parallel.pp x dp_replicate x tp x cp = {parallel.pp} x "
            f"{parallel.dp_replicate} x {parallel.tp} x {parallel.cp} = {others} times a data-parallel degree (dp_shard=-1); "
            f"launch a multiple of {others} ranks or lower those degrees"
        )
    elif world is not None and product != world:
        names = " x ".join(MESH_DIMS)
        values = " x ".join(str(d) for d in dims.shape)
        errors.append(
            f"the world has {world} rank(s) but parallel.{names} = {values} = {product}; the product must "
            "equal the world size (parallel.dp_shard=-1 takes the rest)"
        )
    if parallel.tp > 1:
        for name, value in model.tp_sizes().items():
            if value % parallel.tp:
                errors.append(f"{name} ({value}) must be divisible by parallel.tp ({parallel.tp})")
        if dims.sp and seq_len % parallel.tp:
            errors.append(
                f"data.seq_len ({seq_len}) must be divisible by parallel.tp ({parallel.tp}) with sequence "
                "parallelism (parallel.sp=true)"
            )
    errors.extend(_pipeline_errors(parallel, model))
    errors.extend(_context_errors(parallel, model, seq_len))
    if dims.dp >= 1 and micro_batch >= 1:  # otherwise reported above, or by the train section
        errors.extend(_batch_errors(parallel, dims.dp, global_batch, micro_batch))
    shard_known = world is not None or parallel.dp_shard != -1
    borrowed = dims.dp_shard * dims.cp  # ep is cut from dp_shard (x cp: those ranks hold other tokens too)
    if parallel.ep > 1 and shard_known and dims.dp_shard >= 1 and borrowed % parallel.ep:
        within = "parallel.dp_shard" + (f" x parallel.cp ({dims.dp_shard} x {dims.cp})" if dims.cp > 1 else "")
        errors.append(
            f"parallel.ep ({parallel.ep}) must divide {within} ({borrowed}): expert parallelism "
            "borrows data-parallel ranks; launch more ranks or lower ep"
        )
    return dims, errors


def check_layout(
    parallel: ParallelConfig, model, world: int, *, global_batch: int, micro_batch: int, seq_len: int
) -> ParallelDims:
    """:func:`layout_errors`, raising one LayoutError listing every problem."""
    dims, errors = layout_errors(
        parallel, model, world, global_batch=global_batch, micro_batch=micro_batch, seq_len=seq_len
    )
    if errors:
        raise LayoutError("invalid parallel layout:\n  - " + "\n  - ".join(errors))
    return dims


def _batch_errors(parallel: ParallelConfig, dp: int, global_batch: int, micro_batch: int) -> list[str]:
    per_step = dp * micro_batch
    if global_batch % per_step:
        return [
            f"train.global_batch ({global_batch}) must be a multiple of train.micro_batch ({micro_batch}) x "
            f"data-parallel size ({dp}) = {per_step}; e.g. train.global_batch="
            f"{max(per_step, global_batch // per_step * per_step)}"
        ]
    return microbatch_errors(parallel, global_batch // per_step)


def _context_errors(parallel: ParallelConfig, model, seq_len: int) -> list[str]:
    """Context parallelism: what the model declares it cannot split, zigzag chunks of equal
    length, and heads for the all-to-all."""
    cp = parallel.cp
    if cp <= 1:
        return []
    errors = model.context_parallel_errors()
    if seq_len % (2 * cp):
        errors.append(
            f"data.seq_len ({seq_len}) must be divisible by 2 x parallel.cp = {2 * cp} (each cp rank holds two "
            f"zigzag chunks); e.g. data.seq_len={max(2 * cp, seq_len // (2 * cp) * 2 * cp)}"
        )
    elif parallel.tp > 1 and parallel.sp and (seq_len // cp) % parallel.tp:
        errors.append(
            f"data.seq_len / parallel.cp ({seq_len // cp}) must be divisible by parallel.tp ({parallel.tp}) with "
            "sequence parallelism; change data.seq_len or set parallel.sp=false"
        )
    if parallel.cp_mode == "alltoall":
        for name, value in model.tp_sizes().items():
            if name.endswith("heads") and value % (parallel.tp * cp):
                errors.append(
                    f"{name} ({value}) must be divisible by parallel.tp x parallel.cp = {parallel.tp * cp} for "
                    "parallel.cp_mode=alltoall (heads are split over cp); use parallel.cp_mode=ring"
                )
    return errors


def _pipeline_errors(parallel: ParallelConfig, model) -> list[str]:
    stages = parallel.pp * parallel.virtual_stages
    errors = model.layout_errors(tp=parallel.tp, pp=parallel.pp, stages=stages)
    blocks = model.n_blocks
    if parallel.pp_stage_layers:
        if len(parallel.pp_stage_layers) != stages or sum(parallel.pp_stage_layers) != blocks:
            errors.append(
                f"parallel.pp_stage_layers {parallel.pp_stage_layers} must list {stages} stages "
                f"(pp x virtual_stages) adding up to the model's {blocks} blocks"
            )
    elif stages > blocks:
        errors.append(
            f"the model's {blocks} blocks must be at least pp x virtual_stages = {stages} so that every "
            "pipeline stage holds a block"
        )
    return errors


def build_mesh(dims: ParallelDims, device_type: str) -> DeviceMesh:
    """The world as a mesh of MESH_DIMS, with every FLATTENED view created. Needs an initialised
    default process group of ``dims.world`` ranks."""
    if dist.get_world_size() != dims.world:
        raise LayoutError(f"the process group has {dist.get_world_size()} ranks, the layout expects {dims.world}")
    mesh = init_device_mesh(device_type, dims.shape, mesh_dim_names=MESH_DIMS)
    for name in FLATTENED:
        flattened(mesh, name)
    return mesh


def flattened(mesh: DeviceMesh, name: str) -> DeviceMesh:
    """The flattened view ``name`` of FLATTENED (created once, then the same mesh and group)."""
    return mesh[FLATTENED[name]]._flatten(name)


def dp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The flattened data-parallel dimension."""
    return flattened(mesh, "dp")
