"""RMSNorm computed in fp32 and cast back to the input dtype before the gain (as HF Llama).

For backward it keeps only its input (in the input's dtype) and the per-token inverse RMS
(fp32), and recomputes the normalised activations: the plain ops would keep an fp32 copy of a
bf16 input, the fp32 normalised tensor and its cast — 3 tensors of the block's width instead
of 1 (docs/benchmarks.md, "Activation memory"). The forward is the same ops as the plain form,
and backward runs the ops autograd would, so outputs and gradients are bit-identical
(tests/models/test_norm.py). In fp32 both write into as few fresh tensors as they can (products
and sums commute, so the bits stay the same): on CPU a fresh activation-sized tensor costs its
page faults (forward and backward of a [8, 256, 256] input: 4.1 instead of 10.8 ms, one thread).
DTensor inputs (tensor/sequence parallelism) run the plain ops.

``model.kernels.norm`` (models/kernels.py) may pick instead the plain ops through torch.compile
(``compile``) or liger-kernel's RMSNorm (``liger``, CUDA; its "llama" casting mode is this
module's arithmetic).
"""

from __future__ import annotations

import torch
from torch import nn

from models.kernels import compiled, liger_function


def _normalise(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    x32 = x.float()
    inv_rms = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return x32 * inv_rms, inv_rms


class _LeanRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        normed, inv_rms = _normalise(x, eps)
        ctx.save_for_backward(x, weight, inv_rms)
        if x.dtype == weight.dtype == torch.float32:
            return normed.mul_(weight)  # = weight * normed, without a second fresh tensor
        return weight * normed.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # The ops autograd runs for the plain form, with x/rms recomputed: the same bits.
        x, weight, inv_rms = ctx.saved_tensors
        if x.dtype == grad.dtype == weight.dtype == torch.float32:
            return _fp32_backward(ctx, grad, x, weight, inv_rms) + (None,)
        x32 = x.float()
        normed = x32 * inv_rms
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed.to(x.dtype)).sum_to_size(weight.shape).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_normed = (grad * weight).to(x.dtype).float()  # the cast normed is in x.dtype
            grad_inv_rms = (grad_normed * x32).sum(-1, keepdim=True)
            grad_mean_sq = -0.5 * grad_inv_rms * inv_rms.pow(3)
            grad_sq = grad_mean_sq.expand_as(x32) / x32.shape[-1]
            grad_x = (grad_normed * inv_rms + grad_sq * (2 * x32)).to(x.dtype)
        return grad_x, grad_weight, None


def _fp32_backward(ctx, grad, x, weight, inv_rms) -> tuple:
    """The same products and sums as the general backward, in the same order (IEEE products and
    sums commute, so the bits agree), written into two fresh tensors instead of nine: on CPU
    each fresh activation-sized tensor costs its page faults."""
    scratch = x * inv_rms  # normed
    grad_weight = None
    if ctx.needs_input_grad[1]:
        grad_weight = scratch.mul_(grad).sum_to_size(weight.shape)
    if not ctx.needs_input_grad[0]:
        return None, grad_weight
    grad_normed = grad * weight
    grad_inv_rms = torch.mul(grad_normed, x, out=scratch).sum(-1, keepdim=True)
    grad_mean_sq = -0.5 * grad_inv_rms * inv_rms.pow(3)
    grad_sq = grad_mean_sq / x.shape[-1]  # one value per row: the general form expands it first
    grad_sq_term = torch.mul(x, 2, out=scratch).mul_(grad_sq)
    return grad_normed.mul_(inv_rms).add_(grad_sq_term), grad_weight


def _plain_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    normed, _ = _normalise(x, eps)
    return weight * normed.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, kernel: str = "torch") -> torch.Tensor:
    """``weight · (x / rms(x))``, normalised in fp32; lean in memory for plain tensors; by the
    ``kernel`` of ``model.kernels.norm`` (plain tensors only)."""
    if type(x) is torch.Tensor and type(weight) in (torch.Tensor, nn.Parameter):
        if kernel == "compile":
            return compiled(_plain_rms_norm)(x, weight, eps)
        if kernel == "liger":
            liger_rms_norm = liger_function("liger_rms_norm", x.device, "model.kernels.norm")
            return liger_rms_norm(x, weight, eps, casting_mode="llama", in_place=False)
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            return _LeanRMSNorm.apply(x, weight, eps)
    return _plain_rms_norm(x, weight, eps)


class RMSNorm(nn.Module):
    kernel_slot = "norm"  # model.kernels.norm chooses ``kernel`` (models/kernels.py)

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.kernel = "torch"
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.kernel)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
