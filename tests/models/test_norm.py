"""The lean RMSNorm (models/norm.py) and SwiGLU product (models/ffn/swiglu.py) against the plain
ops under autograd: the same outputs and gradients, bit for bit, in fp32 and bf16 (their backward
runs the ops autograd runs, on recomputed intermediates)."""

from __future__ import annotations

import pytest
import torch

from models.norm import RMSNorm


def plain(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lean_norm_equals_the_plain_ops(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(4, 7, 64, generator=g)).to(dtype).requires_grad_()
    norm = RMSNorm(64, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64, generator=g))
    out = norm(x)
    weight = norm.weight.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    ref = plain(x_ref, weight, 1e-5)
    assert out.dtype == ref.dtype and torch.equal(out, ref)
    grad = torch.randn(ref.shape, generator=g).to(ref.dtype)
    out.backward(grad)
    ref.backward(grad)
    assert torch.equal(x.grad, x_ref.grad) and torch.equal(norm.weight.grad, weight.grad)
    assert x.grad.dtype == dtype and norm.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_gated_product_equals_the_plain_ops(dtype):
    from models.ffn.swiglu import gated_product

    g = torch.Generator().manual_seed(2)
    gate = (3 * torch.randn(4, 9, 32, generator=g)).to(dtype).requires_grad_()
    up = torch.randn(4, 9, 32, generator=g).to(dtype).requires_grad_()
    gate_ref, up_ref = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    out, ref = gated_product(gate, up), torch.nn.functional.silu(gate_ref) * up_ref
    assert torch.equal(out, ref)
    grad = torch.randn(ref.shape, generator=g).to(dtype)
    out.backward(grad)
    ref.backward(grad)
    assert torch.equal(gate.grad, gate_ref.grad) and torch.equal(up.grad, up_ref.grad)  # autograd's own ops
