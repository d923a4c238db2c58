"""Ring attention: exact attention over a sequence split across the ranks of a ``cp`` group.

Each rank holds its queries and its own K/V block. The K/V blocks travel around the ring (send to
rank r+1, receive from r−1) for cp−1 hops; while the next block is in flight, the current one is
attended. Each block's partial output comes with its log-sum-exp, and the partials merge exactly:
``lse = log Σ exp(lse_i)``, ``out = Σ exp(lse_i − lse) · out_i``. Blocks whose keys no query of
this rank may see (the future of a causal chunk, outside a window) are skipped.

Backward is exact too: the K/V blocks go around again, each rank adds its queries' share of
dK/dV of the block it holds to an accumulator that travels with the block, one hop behind, and
arrives back at the block's owner after cp hops; dQ stays local. Scores are recomputed from the
saved q, k, v, output and log-sum-exp (nothing of size S² is kept between forward and backward).

K/V travel in the model's dtype, the dK/dV accumulators in fp32. Per layer and micro-batch a rank
sends (cp−1) K/V blocks forward, (cp−1) K/V blocks and cp accumulators backward, each block
2·B·Hkv·(S/cp)·D elements. Arithmetic is fp32 (explicit scores per block): the reference
implementation that a fused kernel returning a log-sum-exp (flash attention) can replace block
by block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from models.attention.backends import expand_kv

_KV_TAG, _GRAD_TAG = 0, 1


@dataclass(frozen=True)
class RingPlan:
    """What one forward's attention layers share: the group, this rank, its neighbours (global
    ranks), for every source rank j the mask [B|1, 1, Sq, Sk] of this rank's queries against
    block j's keys (True = visible) and whether any pair is visible, and the softmax scale."""

    group: dist.ProcessGroup
    rank: int
    size: int
    prev: int
    next: int
    masks: tuple[torch.Tensor, ...]
    visible: tuple[bool, ...]
    scale: float | None

    def exchange(self, send: torch.Tensor, recv: torch.Tensor, tag: int) -> list:
        """Send ``send`` to the next rank and receive ``recv`` from the previous one (async)."""
        return [
            dist.isend(send, self.next, group=self.group, tag=tag),
            dist.irecv(recv, self.prev, group=self.group, tag=tag),
        ]


def block_masks(
    positions: list[torch.Tensor], rank: int, causal: bool, window: int | None, segments: list[torch.Tensor] | None
) -> list[torch.Tensor]:
    """Masks of ``rank``'s queries against each rank's keys, from the global sequence positions
    held by every rank and (packed documents) their document ids [B, S_local]."""
    q_pos = positions[rank][:, None]
    masks = []
    for j, k_pos in enumerate(positions):
        mask = torch.ones(q_pos.shape[0], k_pos.shape[0], dtype=torch.bool, device=q_pos.device)
        if causal:
            mask = mask & (k_pos[None, :] <= q_pos)
        if window is not None:
            mask = mask & ((q_pos - k_pos[None, :]).abs() < window)
        mask = mask[None, None]
        if segments is not None:
            mask = mask & (segments[rank][:, :, None] == segments[j][:, None, :])[:, None]
        masks.append(mask)
    return masks


def _finite(lse: torch.Tensor) -> torch.Tensor:
    """``lse`` with −inf (rows that see no key) replaced by 0, so exp(x − lse) stays 0, not NaN."""
    return torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)


def _scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    scores = (q @ expand_kv(k.float(), q.shape[1]).transpose(-1, -2)) * scale
    return scores.masked_fill(~mask, float("-inf"))


def _block_forward(q, k, v, mask, scale) -> tuple[torch.Tensor, torch.Tensor]:
    scores = _scores(q, k, mask, scale)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - _finite(lse)[..., None])
    return probs @ expand_kv(v.float(), q.shape[1]), lse


def _block_backward(q, k, v, d_out, delta, lse, mask, scale) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of one block, given the final log-sum-exp and delta = rowsum(d_out · out)."""
    heads, kv_heads = q.shape[1], k.shape[1]
    probs = torch.exp(_scores(q, k, mask, scale) - lse[..., None])
    dv = probs.transpose(-1, -2) @ d_out
    d_scores = probs * (d_out @ expand_kv(v.float(), heads).transpose(-1, -2) - delta[..., None])
    dq = (d_scores @ expand_kv(k.float(), heads)) * scale
    dk = (d_scores.transpose(-1, -2) @ q) * scale
    if kv_heads != heads:  # each KV head served heads/kv_heads query heads: sum their gradients
        batch, _, seq, dim = dk.shape
        dk = dk.view(batch, kv_heads, heads // kv_heads, seq, dim).sum(2)
        dv = dv.view(batch, kv_heads, heads // kv_heads, seq, dim).sum(2)
    return dq, dk, dv


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: RingPlan):
        scale = q.shape[-1] ** -0.5 if plan.scale is None else plan.scale
        q32 = q.float()
        current = torch.stack([k, v])  # sent in the model's dtype, attended in fp32
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
        for step in range(plan.size):
            source = (plan.rank - step) % plan.size
            pending, incoming = [], None
            if step < plan.size - 1:
                incoming = torch.empty_like(current)
                pending = plan.exchange(current, incoming, _KV_TAG)
            if plan.visible[source]:
                block_out, block_lse = _block_forward(q32, current[0], current[1], plan.masks[source], scale)
                merged = torch.logaddexp(lse, block_lse)
                safe = _finite(merged)
                out = out * torch.exp(lse - safe)[..., None] + block_out * torch.exp(block_lse - safe)[..., None]
                lse = merged
            for work in pending:
                work.wait()
            if incoming is not None:
                current = incoming
        # In [B, S, H, D] memory, as SDPA returns it: the layer's reshape to [B, S, H·D] for its
        # output projection is then a view, and the saved output and that input share storage.
        out = out.transpose(1, 2).contiguous().transpose(1, 2)
        ctx.plan, ctx.scale = plan, scale
        ctx.save_for_backward(q, k, v, out, lse)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, d_out):
        plan, scale = ctx.plan, ctx.scale
        q, k, v, out, lse = ctx.saved_tensors
        q32, d_out = q.float(), d_out.float()
        delta = (d_out * out).sum(-1)
        lse = _finite(lse)
        dq = torch.zeros_like(q32)
        current = torch.stack([k, v])
        grad, grad_pending, grad_incoming = None, [], None
        for step in range(plan.size):
            source = (plan.rank - step) % plan.size
            pending, incoming = [], None
            if step < plan.size - 1:
                incoming = torch.empty_like(current)
                pending = plan.exchange(current, incoming, _KV_TAG)
            part = None
            if plan.visible[source]:
                dq_part, dk, dv = _block_backward(q32, current[0], current[1], d_out, delta, lse, plan.masks[source], scale)
                dq += dq_part
                part = torch.stack([dk, dv])
            # The accumulator of this block's dK/dV comes from the previous rank (none at step 0).
            for work in grad_pending:
                work.wait()
            grad = torch.zeros_like(current, dtype=torch.float32) if grad_incoming is None else grad_incoming
            if part is not None:
                grad += part
            if plan.size > 1:
                grad_incoming = torch.empty_like(grad)
                grad_pending = plan.exchange(grad, grad_incoming, _GRAD_TAG)
            for work in pending:
                work.wait()
            if incoming is not None:
                current = incoming
        for work in grad_pending:
            work.wait()
        own = grad_incoming if plan.size > 1 else grad  # after cp hops: this rank's own block
        return dq.to(q.dtype), own[0].to(k.dtype), own[1].to(v.dtype), None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RingPlan) -> torch.Tensor:
    """Attention of this rank's queries q [B, H, Sq, D] over the keys and values of every rank
    of ``plan.group`` (k, v [B, Hkv, Sk, D] here), masked by ``plan.masks``."""
    return _RingAttention.apply(q, k, v, plan)
