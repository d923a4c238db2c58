"""T5's gated-GELU product on CPU (x·σ(2z), one autograd Function) against torch's own
``F.gelu(approximate="tanh")`` in fp64: values, gradients, and an fp64 gradcheck."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.ffn.gated import gated_gelu_product


def _inputs(dtype, requires_grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate = (torch.randn(64, 48, generator=g, dtype=torch.float64) * 3).to(dtype)
    up = torch.randn(64, 48, generator=g, dtype=torch.float64).to(dtype)
    return gate.requires_grad_(requires_grad), up.requires_grad_(requires_grad)


def test_matches_torch_tanh_gelu_in_fp64_values_and_gradients():
    gate, up = _inputs(torch.float32)
    grad = torch.randn(64, 48, generator=torch.Generator().manual_seed(1))
    out = gated_gelu_product(gate, up)
    out.backward(grad)
    gate64, up64 = (t.detach().double().requires_grad_() for t in (gate, up))
    ref = F.gelu(gate64, approximate="tanh") * up64
    ref.backward(grad.double())
    # fp32 arithmetic: errors of a few ulp of the values' scale.
    for ours, theirs in ((out, ref), (gate.grad, gate64.grad), (up.grad, up64.grad)):
        scale = theirs.abs().max().item()
        assert (ours.double() - theirs).abs().max().item() <= 8 * torch.finfo(torch.float32).eps * scale
    with torch.no_grad():
        assert (gated_gelu_product(gate, up).double() - ref).abs().max().item() <= 8e-7 * ref.abs().max().item()


def test_gradcheck_in_fp64():
    gate, up = _inputs(torch.float64)
    assert torch.autograd.gradcheck(gated_gelu_product, (gate[:6, :5], up[:6, :5]))


def test_fp64_values_equal_the_tanh_form():
    gate, up = _inputs(torch.float64, requires_grad=False)
    torch.testing.assert_close(gated_gelu_product(gate, up), F.gelu(gate, approximate="tanh") * up,
                               rtol=1e-13, atol=1e-13)
