"""The encoder-decoder's ``sdpa`` backend: torch SDPA, except T5's self-attention with a learned
relative bias on CPU, which runs a lean kernel of its own.

With a bias that needs a gradient, CPU SDPA falls back to its math path: it scales q and k,
adds the mask and lets autograd keep every intermediate. :class:`BiasedAttention` computes the
same thing with less work: the mask and the bias are folded into one additive tensor once per
stack and forward (``prepare``), the scores are that tensor plus q·kᵀ in one ``baddbmm``, and
backward keeps only q, k, v and the probabilities; the bias gradient is the batch sum of the
score gradient (zero where masked, since the probability is), summed over the stack's layers by
autograd into the shared bias, whose table gradient is then taken once.

Everything else (no bias, cross-attention, rows that may see no key, GPUs, whose SDPA kernels
take a bias gradient) is :class:`~models.attention.backends.SDPABackend`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.attention.backends import AttentionBackend, SDPABackend, expand_kv
from models.attention.spec import dense_mask


@dataclass(frozen=True)
class BiasedPlan:
    """``bias`` [1|B, H, Sq, Sk] (for its gradient), ``additive`` = bias where visible, −inf
    elsewhere (no gradient), ``scale`` of q·kᵀ (None: 1/√head_dim)."""

    bias: torch.Tensor
    additive: torch.Tensor
    scale: float | None


class BiasedAttention(torch.autograd.Function):
    """softmax(scale·q·kᵀ + additive)·v for q [B, H, Sq, D], k and v [B, H, Sk, D]; the
    gradient of ``additive`` goes to ``bias`` (their values agree wherever a key is visible).

    The products run one batch row at a time (``_per_row``): q, k and v arrive as head views of
    [B, S, H·D] projections, and one row's [H, S, D] view is a strided batch the GEMM reads as it
    is, whereas one [B·H, S, D] batch would need a copy of each. The scores start as the row's
    slice of ``additive`` (a contiguous copy) and take q·kᵀ by ``baddbmm`` in place; softmax and
    its backward write over their inputs (on CPU each fresh [B, H, S, S] tensor costs its page
    faults)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, additive, scale: float):
        batch, heads, q_len, _ = q.shape
        additive = additive.to(q.dtype)
        scores = q.new_empty(batch, heads, q_len, k.shape[2])
        for row in range(batch):
            torch.baddbmm(additive[row % additive.shape[0]], q[row], k[row].transpose(1, 2), alpha=scale,
                          out=scores[row])
        probs = torch._softmax(scores, -1, False, out=scores)  # in place: row-wise, checked by the tests
        ctx.save_for_backward(q, k, v, probs)
        ctx.scale, ctx.bias_shape = scale, bias.shape
        return _per_row(probs, v)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, probs = ctx.saved_tensors
        grad_v = _per_row(probs.transpose(2, 3), grad_out)
        grad_probs = _per_row(grad_out, v.transpose(2, 3))
        grad_scores = torch.ops.aten._softmax_backward_data.out(grad_probs, probs, -1, probs.dtype, grad_input=grad_probs)
        grad_q = _per_row(grad_scores, k)
        grad_k = _per_row(grad_scores.transpose(2, 3), q)
        if ctx.scale != 1.0:
            grad_q.mul_(ctx.scale)
            grad_k.mul_(ctx.scale)
        grad_bias = grad_scores.sum_to_size(ctx.bias_shape) if ctx.needs_input_grad[3] else None
        return grad_q, grad_k, grad_v, grad_bias, None, None


def _per_row(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a·b for a [B, H, M, K] and b [B, H, K, N] of any strides (each row's [H, ·, ·] a strided
    batch), into a new contiguous [B, H, M, N]."""
    out = a.new_empty(a.shape[0], a.shape[1], a.shape[2], b.shape[3])
    for row in range(a.shape[0]):
        torch.bmm(a[row], b[row], out=out[row])
    return out


class EncDecSDPA(SDPABackend):
    """``sdpa`` for this family: :class:`BiasedAttention` for a biased spec on CPU whose every
    query sees a key (self-attention), torch SDPA otherwise."""

    def prepare(self, spec, q_len, kv_len, device):
        if spec.bias is None or spec.may_have_empty_rows or torch.device(device).type != "cpu":
            return super().prepare(spec, q_len, kv_len, device)
        visible = dense_mask(spec, q_len, kv_len, device)
        additive = torch.where(visible, spec.bias.detach(), float("-inf"))
        return BiasedPlan(spec.bias, additive, spec.scale)

    def attend(self, q, k, v, plan) -> torch.Tensor:
        if not isinstance(plan, BiasedPlan):
            return super().attend(q, k, v, plan)
        heads = q.shape[1]
        scale = q.shape[-1] ** -0.5 if plan.scale is None else plan.scale
        return BiasedAttention.apply(q, expand_kv(k, heads), expand_kv(v, heads), plan.bias, plan.additive, scale)


def family_backend(backend: AttentionBackend) -> AttentionBackend:
    """This family's version of a backend: :class:`EncDecSDPA` for torch SDPA, else itself."""
    return EncDecSDPA() if type(backend) is SDPABackend else backend
