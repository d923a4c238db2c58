"""Interleaved hidden-unit order that keeps every granularity a prefix on every TP rank.

Column-parallel w1/w3 give rank r the stored rows [r·d_ff/T, (r+1)·d_ff/T). In the plain order
every nested prefix would sit on rank 0. Instead the canonical units are cut into segments
[g_{k-1}, g_k) (g_{-1} = 0), each segment into T equal chunks, and rank r's shard is chunk r of
segment 0, then chunk r of segment 1, ... So the first g_k/T rows of every rank's shard are
exactly the canonical units [0, g_k) split across ranks. ``perm[stored] = canonical``; T = 1 is
the identity.
"""

from __future__ import annotations

import torch


def interleave_perm(granularities: list[int], tp: int) -> torch.Tensor:
    """Canonical index of each stored hidden unit (length d_ff = granularities[-1])."""
    order: list[int] = []
    for rank in range(tp):
        start = 0
        for g in granularities:
            chunk = (g - start) // tp
            order.extend(range(start + rank * chunk, start + (rank + 1) * chunk))
            start = g
    return torch.tensor(order, dtype=torch.long, device="cpu")


def to_stored(tensor: torch.Tensor, perm: torch.Tensor, dim: int) -> torch.Tensor:
    """Canonical → stored order along ``dim`` (the hidden-unit axis)."""
    return tensor.index_select(dim, perm.to(tensor.device))


def to_canonical(tensor: torch.Tensor, perm: torch.Tensor, dim: int) -> torch.Tensor:
    """Stored → canonical order along ``dim`` (inverse of :func:`to_stored`)."""
    return tensor.index_select(dim, torch.argsort(perm).to(tensor.device))
