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

Each block is cut to the bounding box of the pairs this rank's queries may see in it (with the
zigzag split, a block from a lower rank is seen by every query but only in its first chunk, one
from a higher rank only by the second chunk of queries: half the block each), and attended with
no mask, a causal triangle or a mask (documents, windows) inside that box. On CPU a block runs
torch's fused flash kernel for CPU, which returns the log-sum-exp and whose backward takes the
final output and log-sum-exp (so each block's gradient is its share of the global softmax's);
elsewhere (``kernel="explicit"``, the reference) explicit fp32 scores per block.

K/V travel in the model's dtype, the dK/dV accumulators in fp32. Per layer and micro-batch a rank
sends (cp−1) K/V blocks forward, (cp−1) K/V blocks and cp accumulators backward, each block
2·B·Hkv·(S/cp)·D elements.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from models.attention.backends import expand_kv

_KV_TAG, _GRAD_TAG = 0, 1


@dataclass(frozen=True)
class Block:
    """The part of one K/V block that this rank's queries see: the rows and columns of the
    bounding box of its visible pairs, the mask inside the box (True = visible), how the fused
    kernel applies it (``full``: no mask, ``causal``: the lower triangle, ``masked``: an additive
    mask), and the rows of the box that see no key of it (their log-sum-exp is −inf)."""

    rows: slice
    cols: slice
    mask: torch.Tensor
    kind: str
    hidden_rows: torch.Tensor | None

    @classmethod
    def of(cls, mask: torch.Tensor) -> Block | None:
        """The block of a mask [B|1, 1, Sq, Sk]; None when no pair is visible."""
        rows, cols = mask.any(dim=(0, 1, 3)), mask.any(dim=(0, 1, 2))
        if not rows.any():
            return None
        first_row, last_row = _span(rows)
        first_col, last_col = _span(cols)
        box = mask[:, :, first_row:last_row, first_col:last_col]
        r, c = box.shape[-2:]
        if bool(box.all()):
            kind = "full"
        elif r == c and torch.equal(box, torch.ones(r, c, dtype=torch.bool, device=box.device).tril().expand_as(box)):
            kind = "causal"
        else:
            kind = "masked"
        hidden = ~box.any(-1)
        return cls(slice(first_row, last_row), slice(first_col, last_col), box, kind, hidden if bool(hidden.any()) else None)


def _span(flags: torch.Tensor) -> tuple[int, int]:
    where = torch.nonzero(flags).flatten()
    return int(where[0]), int(where[-1]) + 1


@dataclass(frozen=True)
class RingPlan:
    """What one forward's attention layers share: the group, this rank, its neighbours (global
    ranks), for every source rank j the :class:`Block` of this rank's queries against block j's
    keys (None: nothing visible), the softmax scale, and the block kernel (``auto``: fused on
    CPU, explicit elsewhere; ``explicit``)."""

    group: dist.ProcessGroup
    rank: int
    size: int
    prev: int
    next: int
    blocks: tuple[Block | None, ...]
    scale: float | None
    kernel: str = "auto"

    def exchange(self, send: torch.Tensor, recv: torch.Tensor, tag: int) -> list:
        """Send ``send`` to the next rank and receive ``recv`` from the previous one (async)."""
        return [
            dist.isend(send, self.next, group=self.group, tag=tag),
            dist.irecv(recv, self.prev, group=self.group, tag=tag),
        ]

    def fused(self, device: torch.device) -> bool:
        return self.kernel == "auto" and device.type == "cpu"


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
    heads = q.shape[1]
    probs = torch.exp(_scores(q, k, mask, scale) - lse[..., None])
    dv = probs.transpose(-1, -2) @ d_out
    d_scores = probs * (d_out @ expand_kv(v.float(), heads).transpose(-1, -2) - delta[..., None])
    dq = (d_scores @ expand_kv(k.float(), heads)) * scale
    dk = (d_scores.transpose(-1, -2) @ q) * scale
    return dq, _sum_kv_heads(dk, k.shape[1]), _sum_kv_heads(dv, k.shape[1])


def _sum_kv_heads(grad: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Each KV head served heads/kv_heads query heads: sum their gradients."""
    batch, heads, seq, dim = grad.shape
    return grad if heads == kv_heads else grad.view(batch, kv_heads, heads // kv_heads, seq, dim).sum(2)


def _bias(block: Block, dtype: torch.dtype) -> torch.Tensor | None:
    if block.kind != "masked":
        return None
    return torch.zeros(block.mask.shape, dtype=dtype, device=block.mask.device).masked_fill(~block.mask, float("-inf"))


def _fused_forward(q, k, v, block: Block, scale) -> tuple[torch.Tensor, torch.Tensor]:
    heads = q.shape[1]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, expand_kv(k, heads), expand_kv(v, heads), 0.0, block.kind == "causal", attn_mask=_bias(block, q.dtype), scale=scale
    )
    if block.hidden_rows is not None:  # the kernel gives rows that see nothing lse 0, out 0
        lse = lse.masked_fill(block.hidden_rows, float("-inf"))
    return out.float(), lse.float()


def _fused_backward(q, k, v, d_out, out, lse, block: Block, scale) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    heads = q.shape[1]
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        d_out, q, expand_kv(k, heads), expand_kv(v, heads), out, lse, 0.0, block.kind == "causal",
        attn_mask=_bias(block, q.dtype), scale=scale,
    )
    return dq.float(), _sum_kv_heads(dk.float(), k.shape[1]), _sum_kv_heads(dv.float(), k.shape[1])


def _circulate(plan: RingPlan, current: torch.Tensor):
    """Yields (source rank, the K/V block from it) for each of the cp steps; while the caller
    attends one block, the transfer of the next is in flight (sent on to rank r+1)."""
    for step in range(plan.size):
        pending, incoming = [], None
        if step < plan.size - 1:
            incoming = torch.empty_like(current)
            pending = plan.exchange(current, incoming, _KV_TAG)
        yield (plan.rank - step) % plan.size, current
        for work in pending:
            work.wait()
        current = incoming


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: RingPlan):
        scale = q.shape[-1] ** -0.5 if plan.scale is None else plan.scale
        fused = plan.fused(q.device)
        q_in = q if fused else q.float()
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
        for source, current in _circulate(plan, torch.stack([k, v])):  # sent in the model's dtype
            block = plan.blocks[source]
            if block is not None:
                q_b, k_b, v_b = q_in[:, :, block.rows], current[0][:, :, block.cols], current[1][:, :, block.cols]
                if fused:
                    block_out, block_lse = _fused_forward(q_b, k_b, v_b, block, scale)
                else:
                    block_out, block_lse = _block_forward(q_b, k_b, v_b, block.mask, scale)
                rows_lse = lse[:, :, block.rows]
                merged = torch.logaddexp(rows_lse, block_lse)
                safe = _finite(merged)
                out[:, :, block.rows] = (out[:, :, block.rows] * torch.exp(rows_lse - safe)[..., None]
                                         + block_out * torch.exp(block_lse - safe)[..., None])
                lse[:, :, block.rows] = merged
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
        fused = plan.fused(q.device)
        if fused:  # the kernel wants one dtype for q, k, v, out and d_out, and computes delta itself
            q_in, d_out, out_in, delta = q, d_out.to(q.dtype), out.to(q.dtype), None
        else:
            q_in, d_out = q.float(), d_out.float()
            delta = (d_out * out).sum(-1)
        lse = _finite(lse)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        grad, grad_pending, grad_incoming = None, [], None
        for source, current in _circulate(plan, torch.stack([k, v])):
            block = plan.blocks[source]
            part = None
            if block is not None:
                rows, cols = block.rows, block.cols
                q_b, k_b, v_b = q_in[:, :, rows], current[0][:, :, cols], current[1][:, :, cols]
                if fused:
                    dq_part, dk, dv = _fused_backward(q_b, k_b, v_b, d_out[:, :, rows], out_in[:, :, rows],
                                                      lse[:, :, rows], block, scale)
                else:
                    dq_part, dk, dv = _block_backward(q_b, k_b, v_b, d_out[:, :, rows], delta[:, :, rows],
                                                      lse[:, :, rows], block.mask, scale)
                dq[:, :, rows] += dq_part
                part = (cols, dk, dv)
            # The accumulator of this block's dK/dV comes from the previous rank (none at step 0).
            for work in grad_pending:
                work.wait()
            grad = torch.zeros_like(current, dtype=torch.float32) if grad_incoming is None else grad_incoming
            if part is not None:
                cols, dk, dv = part
                grad[0][:, :, cols] += dk
                grad[1][:, :, cols] += dv
            if plan.size > 1:
                grad_incoming = torch.empty_like(grad)
                grad_pending = plan.exchange(grad, grad_incoming, _GRAD_TAG)
        for work in grad_pending:
            work.wait()
        own = grad_incoming if plan.size > 1 else grad  # after cp hops: this rank's own block
        return dq.to(q.dtype), own[0].to(k.dtype), own[1].to(v.dtype), None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: RingPlan) -> torch.Tensor:
    """Attention of this rank's queries q [B, H, Sq, D] over the keys and values of every rank
    of ``plan.group`` (k, v [B, Hkv, Sk, D] here), masked as ``plan.blocks`` say."""
    return _RingAttention.apply(q, k, v, plan)
