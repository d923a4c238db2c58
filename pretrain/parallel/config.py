"""The ``parallel:`` section of the run's config: how the world is cut into a device mesh.

    world = pp × dp_replicate × dp_shard × cp × tp

``tp`` (tensor parallel, with sequence parallelism when ``sp``) is the innermost mesh dimension
(neighbouring ranks: one node), ``pp`` the outermost. ``dp_shard`` > 1 shards parameters, gradients
and optimizer state with FSDP2 (HSDP when ``dp_replicate`` > 1 too); ``dp_replicate`` alone
replicates (DDP). ``dp_shard = -1`` takes whatever the other degrees leave of the world.

Pipeline: ``pp_schedule`` is one of ``gpipe``, ``1f1b``, ``interleaved_1f1b``,
``interleaved_zb`` (zero-bubble, interleaved) and ``zbv`` (zero-bubble, V-shaped, exactly two
stages per rank); ``virtual_stages`` stages per rank (1 for gpipe/1f1b). ``pp_stage_layers``
lists the blocks of each stage explicitly (length pp × virtual_stages); empty balances them
(see pretrain.parallel.pipeline.stage_layer_counts).

``ep``: expert parallelism, borrowed from ``dp_shard`` (which it must divide): each MoE layer's
experts are spread over ``ep`` data-parallel ranks and tokens reach them by all-to-all
(pretrain/parallel/ep.py).

``init``: ``full`` builds the whole model on the CPU of every process from the run seed and
keeps this rank's shards, so every layout starts from the weights one process would (host
memory for the fp32 model per process); ``sharded`` initialises each shard on its device
(no full copy; the initial weights then depend on the layout).

``cp`` (context parallel) splits every sequence over cp ranks in zigzag chunks; attention runs
as a ring of K/V blocks (``cp_mode: ring``) or an all-to-all between sequence and head shards
(``alltoall``: needs the query and KV heads per tensor-parallel rank divisible by cp). Parameters
are sharded over dp_shard × cp (pretrain/parallel/context/).

``compile``: torch.compile each block with ``compile_backend`` (pretrain/parallel/compile.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "interleaved_zb", "zbv")
SINGLE_STAGE_SCHEDULES = ("gpipe", "1f1b")


@dataclass
class ParallelConfig:
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = -1
    tp: int = 1
    sp: bool = True
    ep: int = 1
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b", "interleaved_zb", "zbv"] = "1f1b"
    virtual_stages: int = 1
    pp_stage_layers: list[int] = field(default_factory=list)
    init: Literal["full", "sharded"] = "full"
    compile: bool = False
    compile_backend: str = "inductor"
    cp: int = 1
    cp_mode: Literal["ring", "alltoall"] = "ring"

    def validate(self) -> list[str]:
        """Problems visible without knowing the world size or the model."""
        errors = []
        for name in ("pp", "dp_replicate", "tp", "virtual_stages"):
            if getattr(self, name) < 1:
                errors.append(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.dp_shard == 0 or self.dp_shard < -1:
            errors.append(f"parallel.dp_shard must be >= 1, or -1 for the rest of the world; got {self.dp_shard}")
        if self.ep < 1:
            errors.append(f"parallel.ep must be >= 1, got {self.ep}")
        if self.pp_schedule in SINGLE_STAGE_SCHEDULES and self.virtual_stages != 1:
            errors.append(
                f"parallel.pp_schedule={self.pp_schedule} runs one stage per rank; set parallel.virtual_stages=1 "
                "or use interleaved_1f1b / interleaved_zb"
            )
        if self.pp_schedule == "zbv" and self.virtual_stages != 2:
            errors.append(f"parallel.pp_schedule=zbv needs parallel.virtual_stages=2, got {self.virtual_stages}")
        if self.compile and self.pp > 1 and self.pp_schedule in ("interleaved_zb", "zbv"):
            errors.append(
                f"parallel.pp_schedule={self.pp_schedule} splits the backward into input and weight gradients, which "
                "compiled blocks cannot do; use interleaved_1f1b, or parallel.compile=false"
            )
        if self.compile and self.tp > 1 and not self.sp:
            errors.append(
                "parallel.compile=true with parallel.tp > 1 needs parallel.sp=true: without sequence parallelism "
                "torch 2.13's DTensor backward fails at the compiled blocks' boundary; set parallel.sp=true, or "
                "parallel.compile=false"
            )
        if self.cp < 1:
            errors.append(f"parallel.cp must be >= 1, got {self.cp}")
        if self.cp_mode not in ("ring", "alltoall"):
            errors.append(f"parallel.cp_mode must be ring or alltoall, got {self.cp_mode!r}")
        if any(n < 1 for n in self.pp_stage_layers):
            errors.append(f"parallel.pp_stage_layers must all be >= 1, got {self.pp_stage_layers}")
        return errors
