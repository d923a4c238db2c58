"""Fused linear + cross entropy: the head GEMM and the loss in chunks of tokens, so that the full
[tokens, vocab] logits never exist.

For hidden states h [N, d] (after the final norm), the head weight W [V, d], labels y [N] and a
loss mask m [N], each chunk of c tokens computes its logits h·Wᵀ [c, V] (fp32), their
logsumexp and cross entropy, and, when gradients are wanted, at once the gradient of the
masked per-token loss ℓ_i = ce_i + z·lse_i² with respect to the logits,

    ∂ℓ_i/∂logits_i = (1 + 2·z·lse_i)·softmax_i − onehot(y_i),

then multiplies it into the chunk's gradient of h ([c, d]) and adds it into the gradient of W
([V, d], fp32). The chunk's logits are freed before the next chunk. Backward only scales the two
stored gradients by the incoming gradient: three GEMMs per token as in the unfused head, and the
memory of the loss path is one chunk of logits plus W's gradient (which training holds anyway).

The result is one tensor [N, 3] per token: the masked contributions m·ℓ, m·ce and m·z·lse² (so
their sums are the loss, the cross-entropy and the z-loss terms). Only the first column carries
a gradient, and its gradient must be the same for every token (the loss sums it and scales the
sum): models/causal_lm.py does exactly that. Under ``torch.no_grad`` (evaluation) no gradient is
computed.

Vocab-parallel (tensor parallelism): when W is a DTensor sharded over the vocabulary
(``Shard(0)``), each rank computes its slice of every chunk's logits, and the ranks exchange
[c]-sized maxima, sums of exponentials and target logits and the chunk's [c, d] input gradient;
each rank keeps the gradient of its slice of W. Sequence-sharded hidden states (DTensor
``Shard(1)`` under sequence parallelism) are gathered first.

On GPU, liger-kernel's fused linear cross entropy (``model.kernels.loss: liger``) computes the
same three sums; models/kernels.py spreads them evenly over the tokens in the same layout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

# Logit elements per chunk (fp32: 256 MiB): 2048 tokens of a 32k vocabulary, 512 of 128k.
CHUNK_ELEMENTS = 1 << 26


def default_chunk(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, mask, z_loss: float, chunk: int, group, vocab_start: int, grads: bool):
        tokens, local_vocab = hidden.shape[0], weight.shape[0]
        w = weight.to(hidden.dtype)
        out = torch.empty(tokens, 3, dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if grads else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grads else None
        for start in range(0, tokens, chunk):
            rows = slice(start, start + chunk)
            h = hidden[rows]
            logits = (h @ w.t()).float()
            local = labels[rows] - vocab_start
            inside = (local >= 0) & (local < local_vocab)
            local = torch.where(inside, local, torch.zeros_like(local))
            target = logits.gather(1, local[:, None]).squeeze(1) * inside
            peak = logits.amax(1)
            if group is not None:
                dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
            exp = logits.sub_(peak[:, None]).exp_()
            sums = torch.stack([exp.sum(1), target])
            if group is not None:
                dist.all_reduce(sums, group=group)
            lse = sums[0].log() + peak
            ce = lse - sums[1]
            m = mask[rows]
            out[rows, 1] = m * ce
            out[rows, 2] = m * z_loss * lse.square()
            out[rows, 0] = out[rows, 1] + out[rows, 2]
            if grads:
                scale = m * (1 + 2 * z_loss * lse) / sums[0]
                d_logits = exp.mul_(scale[:, None])
                d_logits.scatter_add_(1, local[:, None], -(m * inside)[:, None])
                d_logits = d_logits.to(hidden.dtype)
                g = d_logits @ w
                if group is not None:
                    g = g.float()
                    dist.all_reduce(g, group=group)
                grad_h[rows] = g
                if h.dtype == torch.float32 and not torch.is_autocast_enabled(h.device.type):
                    grad_w.addmm_(d_logits.t(), h)
                else:
                    grad_w.add_(d_logits.t() @ h)
        ctx.grads = (grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        if grad_h is None:
            raise RuntimeError("the fused linear cross entropy ran without gradients (under torch.no_grad)")
        scale = grad_out[:, 0].mean()
        grad_h = grad_h.mul_(scale).to(ctx.dtypes[0])
        grad_w = grad_w.mul_(scale).to(ctx.dtypes[1])
        return grad_h, grad_w, None, None, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    z_loss: float = 0.0,
    chunk: int | None = None,
) -> torch.Tensor:
    """Per-token [..., 3] (m·(ce + z·lse²), m·ce, m·z·lse²) for hidden states [..., d], head
    weight [V, d] (a tensor, or a DTensor sharded over the vocabulary), labels [...] (any class
    id or -100 where masked) and ``loss_mask`` [...] (1 where the token counts; default all),
    ``chunk`` tokens at a time (default: :data:`CHUNK_ELEMENTS` logits per chunk)."""
    shape = labels.shape
    group, vocab_start, vocab = None, 0, weight.shape[0]
    if isinstance(weight, DTensor):
        if tuple(weight.placements) != (Shard(0),):
            raise ValueError(f"the fused loss takes a head weight sharded over the vocabulary, got {weight.placements}")
        mesh = weight.device_mesh
        if isinstance(hidden, DTensor):
            hidden = hidden.redistribute(mesh, [Replicate()]).to_local()
        weight = weight.to_local()
        group, vocab_start = mesh.get_group(), mesh.get_local_rank() * weight.shape[0]
    flat = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1).clamp(min=0)
    mask = torch.ones(labels.shape, device=flat.device) if loss_mask is None else loss_mask.reshape(-1).float()
    grads = torch.is_grad_enabled() and (flat.requires_grad or weight.requires_grad)
    out = _LinearCrossEntropy.apply(
        flat, weight, labels, mask, float(z_loss), chunk or default_chunk(vocab), group, vocab_start, grads
    )
    return out.view(*shape, 3)
