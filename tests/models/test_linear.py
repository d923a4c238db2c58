"""models/linear.py: the oneDNN CPU path against F.linear (aten's GEMM) in outputs and gradients,
eager and traced by torch.compile, its FLOP count, and the cases that must fall back; oneDNN is
chosen only on AVX-512 CPUs, and elsewhere the layer is exactly F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import models.linear
from models.linear import ONEDNN_AVAILABLE, Linear, linear, uses_onednn

pytestmark = pytest.mark.skipif(not ONEDNN_AVAILABLE, reason="this torch build has no oneDNN")
CHOSEN = models.linear.PREFER_ONEDNN  # read before the fixture below sets it


@pytest.fixture(autouse=True)
def onednn_path(monkeypatch):
    """The oneDNN path is tested wherever oneDNN exists, also on CPUs where it is not chosen."""
    monkeypatch.setattr(models.linear, "PREFER_ONEDNN", True)


def test_onednn_is_chosen_only_on_avx512_cpus():
    assert CHOSEN == (torch.backends.cpu.get_cpu_capability() == "AVX512")


def test_without_onednn_the_layer_is_f_linear(monkeypatch):
    """Where oneDNN is not chosen, the layer runs aten's GEMMs only, with F.linear's exact values."""
    monkeypatch.setattr(models.linear, "PREFER_ONEDNN", False)
    torch.manual_seed(0)
    layer = Linear(64, 96)
    x = torch.randn(3, 10, 64, requires_grad=True)
    grad = torch.randn(3, 10, 96)
    assert not uses_onednn(x, layer.weight)
    names = ops_run(lambda: layer(x).backward(grad))
    assert "mkldnn::_linear_pointwise" not in names and "aten::mm" in names
    out = layer(x)
    x.grad = layer.weight.grad = None
    out.backward(grad)
    ref_out, ref_x_grad, ref_w_grad = reference(x, layer.weight, grad)
    assert torch.equal(out, ref_out) and torch.equal(x.grad, ref_x_grad) and torch.equal(layer.weight.grad, ref_w_grad)


def reference(x, weight, grad):
    x, weight = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    out = F.linear(x, weight)
    out.backward(grad)
    return out.detach(), x.grad, weight.grad


def ops_run(fn) -> set[str]:
    with torch.profiler.profile() as prof:
        fn()
    return {event.name for event in prof.events()}


# The last weight is over LARGE_WEIGHT: its input gradient is aten's.
@pytest.mark.parametrize("shape", [(7, 33, 65), (2, 9, 256, 512), (1, 1, 4096, 256), (300, 768, 2560), (64, 1024, 1025)])
def test_matches_aten_in_outputs_and_gradients(shape):
    *lead, d_in, d_out = shape
    torch.manual_seed(0)
    layer = Linear(d_in, d_out)
    x = torch.randn(*lead, d_in, requires_grad=True)
    grad = torch.randn(*lead, d_out)
    names = ops_run(lambda: layer(x).backward(grad))
    assert "mkldnn::_linear_pointwise" in names
    out = layer(x)
    x.grad = layer.weight.grad = None
    out.backward(grad)
    ref_out, ref_x_grad, ref_w_grad = reference(x, layer.weight, grad)
    scale = d_in**0.5
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(x.grad, ref_x_grad, rtol=1e-5, atol=1e-5 * d_out**0.5)
    torch.testing.assert_close(layer.weight.grad, ref_w_grad, rtol=1e-5, atol=1e-5 * x[..., 0].numel() ** 0.5)


def test_falls_back_to_f_linear():
    torch.manual_seed(0)
    weight = torch.randn(48, 32)
    x = torch.randn(5, 32)
    assert uses_onednn(x, weight)
    for x_, w_ in [(x.bfloat16(), weight.bfloat16()), (x.double(), weight.double()), (x[:0], weight)]:
        assert not uses_onednn(x_, w_)
        assert torch.equal(linear(x_, w_), F.linear(x_, w_))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not uses_onednn(x, weight)
        assert linear(x, weight).dtype == torch.bfloat16


def test_traced_by_compile_as_one_opaque_op():
    """Under torch.compile the product is the models::mm_nt custom op (forward and input
    gradient), with the same values as eager."""
    torch.manual_seed(0)
    layer = Linear(64, 96)
    x = torch.randn(3, 10, 64, requires_grad=True)
    graphs = []

    def backend(gm, example_inputs):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        def record(graph, _):
            graphs.append(graph)
            return make_boxed_func(graph)

        return aot_autograd(fw_compiler=record, bw_compiler=record)(gm, example_inputs)

    compiled = torch.compile(lambda t: F.silu(layer(t)), backend=backend, fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    targets = [str(node.target) for graph in graphs for node in graph.graph.nodes]
    assert targets.count("models.mm_nt.default") == 2  # x·Wᵀ in forward, g·W in backward
    eager_x = x.detach().clone().requires_grad_()
    eager = F.silu(layer(eager_x))
    eager.sum().backward()
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, eager_x.grad, rtol=0, atol=0)


def test_flop_counter_counts_every_product():
    layer, x = Linear(64, 96), torch.randn(15, 64, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        layer(x).sum().backward()
    assert counter.get_total_flops() == 3 * 2 * 15 * 64 * 96
