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
    gradient of ``additive`` goes to ``bias`` (their values agree wherever a key is visible)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, additive, scale: float):
        batch, heads, q_len, dim = q.shape
        kv_len = k.shape[2]
        q3, k3, v3 = (t.reshape(batch * heads, -1, dim) for t in (q, k, v))
        base = additive.to(q.dtype).expand(batch, heads, q_len, kv_len).reshape(batch * heads, q_len, kv_len)
        probs = torch.baddbmm(base, q3, k3.transpose(1, 2), alpha=scale).softmax(-1)
        ctx.save_for_backward(q3, k3, v3, probs)
        ctx.scale, ctx.bias_shape = scale, bias.shape
        return torch.bmm(probs, v3).view(batch, heads, q_len, dim)

    @staticmethod
    def backward(ctx, grad_out):
        q3, k3, v3, probs = ctx.saved_tensors
        batch, heads, q_len, dim = grad_out.shape
        grad3 = grad_out.reshape(batch * heads, q_len, dim)
        grad_v = torch.bmm(probs.transpose(1, 2), grad3)
        grad_scores = torch._softmax_backward_data(torch.bmm(grad3, v3.transpose(1, 2)), probs, -1, probs.dtype)
        grad_q = torch.bmm(grad_scores, k3)
        grad_k = torch.bmm(grad_scores.transpose(1, 2), q3)
        if ctx.scale != 1.0:
            grad_q.mul_(ctx.scale)
            grad_k.mul_(ctx.scale)
        grad_bias = None
        if ctx.needs_input_grad[3]:
            grad_bias = grad_scores.view(batch, heads, q_len, -1).sum_to_size(ctx.bias_shape)
        shape = (batch, heads, -1, dim)
        return grad_q.view(shape), grad_k.view(shape), grad_v.view(shape), grad_bias, None, None


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
