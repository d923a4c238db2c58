"""Context parallelism applied to a model from outside: every attention layer's backend is
wrapped so that it attends over the whole sequence while its rank holds only its zigzag chunks
(zigzag.py), by a ring of K/V blocks (``ring``) or an all-to-all between sequence and head shards
(``alltoall``). The model code is unchanged: position ids (rotary embeddings) and document ids
arrive already cut (``shard_sequence``), and the wrapped backend builds, once per forward, the
masks of the global positions.

The layout check refuses what a model declares context parallelism cannot compute
(``context_parallel_errors`` of its config: a recurrent mixer, an encoder-decoder, an MoE
capacity). Refused here too, at the first forward, with an error that names the fix, should a
model reach it anyway: a block whose mixer is not attention, an additive bias, query/key
segments (cross-attention to an unrelated sequence), a decode state (generation).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_reduce
from torch.distributed.device_mesh import DeviceMesh

from models.attention.backends import AttentionBackend
from models.attention.spec import AttentionSpec, AttentionSpecError
from pretrain.parallel.context.ring import Block, RingPlan, block_masks, ring_attention
from pretrain.parallel.context.ulysses import UlyssesPlan, ulysses_attention
from pretrain.parallel.context.zigzag import zigzag_positions

CP_MODES = ("ring", "alltoall")


def sum_over(group: dist.ProcessGroup, tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over ``group``; its gradient is the sum of the ranks' gradients."""
    return all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)


class ContextParallelAttention(AttentionBackend):
    """Wraps the layer's own backend (``inner``): the all-to-all mode runs it on head shards of
    the whole sequence; the ring mode replaces it with ring attention."""

    def __init__(self, inner: AttentionBackend, mesh: DeviceMesh, mode: str):
        if mode not in CP_MODES:
            raise ValueError(f"parallel.cp_mode {mode!r} is unknown; choose one of {list(CP_MODES)}")
        self.inner, self.mode = inner, mode
        self.name = f"{inner.name}+cp_{mode}"
        self.group = mesh.get_group()
        self.rank, self.size = mesh.get_local_rank(), mesh.size()

    def _refusal(self, spec: AttentionSpec, q_len: int, kv_len: int) -> str | None:
        if q_len != kv_len:
            return "attention over a KV cache (generation runs without context parallelism)"
        if spec.bias is not None:
            return "an additive bias (T5's relative position bias needs the whole score matrix)"
        if spec.q_segments is not None:
            return "query/key segments (cross-attention to a sequence that is not cut like the queries)"
        return None

    def prepare(self, spec: AttentionSpec, q_len: int, kv_len: int, device: torch.device):
        refusal = self._refusal(spec, q_len, kv_len)
        if refusal:
            raise AttentionSpecError(f"context parallelism (parallel.cp={self.size}) cannot compute {refusal}; "
                                     "set parallel.cp=1 for this model")
        seq = q_len * self.size
        positions = [zigzag_positions(seq, self.size, j, device) for j in range(self.size)]
        segments = None
        if spec.segments is not None:
            segments = [torch.empty_like(spec.segments) for _ in range(self.size)]
            dist.all_gather(segments, spec.segments.contiguous(), group=self.group)
        if self.mode == "ring":
            masks = block_masks(positions, self.rank, spec.causal, spec.window, segments)
            prev = dist.get_global_rank(self.group, (self.rank - 1) % self.size)
            nxt = dist.get_global_rank(self.group, (self.rank + 1) % self.size)
            return RingPlan(self.group, self.rank, self.size, prev, nxt, tuple(Block.of(m) for m in masks), spec.scale)
        order = torch.cat(positions)
        natural = torch.argsort(order)
        if segments is not None:
            spec = AttentionSpec(spec.causal, spec.window, spec.scale, segments=torch.cat(segments, 1)[:, natural])
        return UlyssesPlan(self.group, self.size, natural, order, self.inner, self.inner.prepare(spec, seq, seq, device))

    def attend(self, q, k, v, plan):
        if isinstance(plan, RingPlan):
            return ring_attention(q, k, v, plan)
        return ulysses_attention(q, k, v, plan)


def apply_cp(model: nn.Module, mesh: DeviceMesh, mode: str) -> None:
    """Wrap the attention backend of every block's mixer (and of any other attention module) in
    place, and give every module with statistics over whole sequences (``sequence_reduce``,
    models/aux_loss.py) the sum over the cp group; a block without attention cannot be split
    along the sequence (refused earlier, by the layout check: ``context_parallel_errors``)."""
    group = mesh.get_group()
    wrapped = set()
    for module in model.modules():
        if hasattr(module, "sequence_reduce"):
            module.sequence_reduce = functools.partial(sum_over, group)
        backend = getattr(module, "backend", None)
        if isinstance(backend, AttentionBackend) and not isinstance(backend, ContextParallelAttention):
            module.backend = ContextParallelAttention(backend, mesh, mode)
            wrapped.add(id(module))
    for name in model.block_names():
        mixer = getattr(model.get_submodule(name), "mixer", None)
        if mixer is not None and id(mixer) not in wrapped:
            raise AttentionSpecError(
                f"{name}: its mixer ({type(mixer).__name__}) is not attention and carries state along the sequence, "
                "which context parallelism cannot split; set parallel.cp=1 or use an attention mixer"
            )
