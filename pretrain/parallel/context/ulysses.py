"""Ulysses-style context parallelism: an all-to-all turns sequence shards into head shards
before attention and back after it.

Every rank holds the zigzag chunks of all heads; after the all-to-all it holds the whole
sequence (put back in natural order) for heads/cp of the heads, runs the model's own attention
backend on it unchanged (any mask it supports: causal, documents, windows), and the reverse
all-to-all returns its chunks of every head. Volume per rank and layer: q, k, v and the output,
each (cp−1)/cp of its local size, independent of the number of ranks' blocks; it needs the local
query and KV heads divisible by cp. The ring (ring.py) has no head constraint and sends K/V only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd

from models.attention.backends import AttentionBackend


@dataclass(frozen=True)
class UlyssesPlan:
    """The group and its size, the permutation from the ranks' concatenated chunks to natural
    order (``natural``) and back (``zigzag``), and the inner backend's prepared plan."""

    group: dist.ProcessGroup
    size: int
    natural: torch.Tensor
    zigzag: torch.Tensor
    inner: AttentionBackend
    prepared: Any


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    out = all_to_all_single_autograd(x.contiguous(), None, None, group)
    return out.wait() if hasattr(out, "wait") else out


def sequence_to_heads(x: torch.Tensor, plan: UlyssesPlan) -> torch.Tensor:
    """[B, H, S/cp, D] (this rank's chunks, all heads) → [B, H/cp, S, D] (natural order)."""
    batch, heads, seq, dim = x.shape
    send = x.view(batch, plan.size, heads // plan.size, seq, dim).transpose(0, 1)
    recv = _all_to_all(send, plan.group).view(plan.size, batch, heads // plan.size, seq, dim)
    full = recv.permute(1, 2, 0, 3, 4).reshape(batch, heads // plan.size, plan.size * seq, dim)
    return full.index_select(2, plan.natural)


def heads_to_sequence(x: torch.Tensor, plan: UlyssesPlan) -> torch.Tensor:
    """[B, H/cp, S, D] (natural order) → [B, H, S/cp, D] (this rank's chunks)."""
    batch, heads, seq, dim = x.shape
    chunks = x.index_select(2, plan.zigzag).view(batch, heads, plan.size, seq // plan.size, dim)
    recv = _all_to_all(chunks.permute(2, 0, 1, 3, 4), plan.group)
    recv = recv.view(plan.size, batch, heads, seq // plan.size, dim)
    return recv.transpose(0, 1).reshape(batch, plan.size * heads, seq // plan.size, dim)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: UlyssesPlan) -> torch.Tensor:
    q, k, v = (sequence_to_heads(t, plan) for t in (q, k, v))
    return heads_to_sequence(plan.inner.attend(q, k, v, plan.prepared), plan)
