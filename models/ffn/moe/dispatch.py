"""Token dispatch and combine: the T·k (token, slot) assignments grouped by expert, the capacity
rule, and the weighted sum back in token order. No Python loop over tokens.

Assignments are numbered a = t·k + j (token t, slot j of its top-k). Dispatch orders them by
expert (a stable sort, so within an expert by a), or, under a capacity, by expert and then by
decreasing routing weight with ties by a; an expert then keeps its first ``capacity``
assignments and drops the rest. A dropped assignment contributes 0 to its token's output (the
residual stream still carries the token).

Combine brings the expert outputs back to assignment order and sums each token's k rows,
weighted. Without drops the grouping is a permutation of the assignments: both directions are
gathers by it or its inverse (:class:`_GatherRows`: the backward of a gather by a permutation is
the gather by the inverse, with no zero buffer and no index_add). With drops, combine writes
each kept assignment's weighted output to row a of a zero [T·k, d] buffer (each row written
once: no atomics, deterministic). Either way the k rows of a token are summed in slot order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def expert_capacity(tokens: int, top_k: int, n_experts: int, factor: float | None) -> int | None:
    """ceil(T·k/E · factor) assignments per expert, or None (dropless) without a factor."""
    if not factor:
        return None
    return math.ceil(tokens * top_k / n_experts * factor)


@dataclass
class Dispatch:
    """Where each kept assignment goes: ``order`` [N] the kept assignments' numbers a, grouped by
    expert (N = T·k without drops); ``tokens`` [N] their tokens (a // k); ``counts`` [E] kept
    assignments per expert (int64); ``routed`` [E] assignments per expert before the capacity
    (int64); ``dropped``: the number dropped (a 0-dim int64 tensor); ``inverse`` [T·k] without
    drops: the grouped row of each assignment a (``order`` inverted), else None."""

    order: torch.Tensor
    tokens: torch.Tensor
    counts: torch.Tensor
    routed: torch.Tensor
    dropped: torch.Tensor
    inverse: torch.Tensor | None = None


def plan_dispatch(
    experts: torch.Tensor, weights: torch.Tensor, n_experts: int, capacity: int | None
) -> Dispatch:
    """The dispatch of assignments ``experts`` [T, k] with routing ``weights`` [T, k]."""
    top_k = experts.shape[1]
    flat = experts.reshape(-1)
    routed = torch.bincount(flat, minlength=n_experts)
    if capacity is None:
        order = torch.argsort(flat, stable=True)
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        return Dispatch(order, order // top_k, routed, routed, routed.new_zeros(()), inverse)
    by_weight = torch.argsort(weights.detach().reshape(-1), descending=True, stable=True)
    order = by_weight[torch.argsort(flat[by_weight], stable=True)]
    starts = torch.cumsum(routed, 0) - routed
    rank = torch.arange(order.numel(), device=order.device) - starts[flat[order]]
    kept = order[rank < capacity]
    counts = torch.clamp(routed, max=capacity)
    return Dispatch(kept, kept // top_k, counts, routed, (routed - counts).sum())


class _GatherRows(torch.autograd.Function):
    """``x.index_select(0, index)`` whose backward is ``grad.index_select(0, adjoint)`` summed over
    consecutive groups of ``fold`` rows: right when row i of ``x`` is read exactly by the rows
    ``adjoint[i·fold : (i+1)·fold]`` of the output (a permutation and its inverse, or dispatch's
    k reads of every token)."""

    @staticmethod
    def forward(ctx, x, index, adjoint, fold: int):
        ctx.save_for_backward(adjoint)
        ctx.fold = fold
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (adjoint,) = ctx.saved_tensors
        rows = grad.index_select(0, adjoint)
        if ctx.fold > 1:
            rows = rows.view(-1, ctx.fold, rows.shape[-1]).sum(1)
        return rows, None, None, None


def dispatch(x: torch.Tensor, plan: Dispatch) -> torch.Tensor:
    """The rows of ``x`` [T, d] each kept assignment reads, grouped by expert: [N, d]."""
    if plan.inverse is None:
        return x.index_select(0, plan.tokens)
    return _GatherRows.apply(x, plan.tokens, plan.inverse, plan.inverse.numel() // x.shape[0])


def combine(y: torch.Tensor, weights: torch.Tensor, plan: Dispatch) -> torch.Tensor:
    """Σ over a token's kept assignments of weight · expert output: ``y`` [N, d] (grouped by
    expert, as dispatched), ``weights`` [T, k] → [T, d] in ``y``'s dtype."""
    tokens, top_k = weights.shape
    if plan.inverse is not None:
        rows = _GatherRows.apply(y, plan.inverse, plan.order, 1).view(tokens, top_k, -1)
        return (rows * weights.to(y.dtype).unsqueeze(-1)).sum(1)
    scaled = y * weights.reshape(-1).index_select(0, plan.order).to(y.dtype).unsqueeze(1)
    rows = y.new_zeros(tokens * top_k, y.shape[1]).index_copy(0, plan.order, scaled)
    return rows.view(tokens, top_k, -1).sum(1)
