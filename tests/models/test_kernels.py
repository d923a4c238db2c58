"""The kernel switch (models/kernels.py): every choice of ``model.kernels.{norm, swiglu, rope}``
equals the pure-torch path (outputs and gradients), ``compile`` here, ``liger`` on a GPU (those
tests skip on CPU with the reason); liger is refused with a clear error where it cannot run; the
config names unknown choices."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from models import causal_lm
from models.decoder.config import DecoderConfig
from models.ffn.swiglu import gated_product
from models.kernels import KernelsConfig
from models.norm import rms_norm
from models.rope import apply_rope, rope_tables, rotate_qk
from models.spec import build_model
from tests.parallel.workloads import TINY, global_batch

GPU = torch.cuda.is_available()


def _inputs(device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 24, 8, 16, generator=g)  # [B, S, heads, head_dim]
    k = torch.randn(2, 24, 4, 16, generator=g)
    weight = 1 + 0.1 * torch.randn(16, generator=g)
    cos, sin = rope_tables(torch.arange(24).repeat(2, 1), 16, 10000.0, torch.float32)
    tensors = [t.to(device, dtype) for t in (x, k, weight, cos, sin)]
    return [t.requires_grad_() if i < 3 else t for i, t in enumerate(tensors)]


def _reference(kind: str, x, k, weight, cos, sin):
    """The plain ops autograd differentiates (no kernel switch involved)."""
    if kind == "norm":
        x32 = x.float()
        return (weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype),)
    if kind == "swiglu":
        return (F.silu(x) * k.repeat(1, 1, 2, 1),)
    return apply_rope(x, cos, sin), apply_rope(k, cos, sin)


def _switched(kind: str, kernel: str, x, k, weight, cos, sin):
    if kind == "norm":
        return (rms_norm(x, weight, 1e-5, kernel),)
    if kind == "swiglu":
        return (gated_product(x, k.repeat(1, 1, 2, 1), kernel),)
    return rotate_qk(x, k, cos, sin, kernel)


def _check(kind: str, kernel: str, device: str, dtype, rtol: float, atol: float):
    results = []
    for run in (_reference, lambda *a: _switched(kind, kernel, *a)):
        x, k, weight, cos, sin = _inputs(device, dtype)
        outs = run(kind, x, k, weight, cos, sin) if run is _reference else run(x, k, weight, cos, sin)
        seeded = [torch.Generator().manual_seed(i) for i in range(len(outs))]
        probes = [torch.randn(o.shape, generator=g).to(device, dtype) for o, g in zip(outs, seeded)]
        sum(((o * p).float().sum() for o, p in zip(outs, probes))).backward()
        grads = [t.grad for t in (x, k, weight) if t.grad is not None]
        results.append(([o.detach() for o in outs], grads))
    (want, want_grads), (got, got_grads) = results
    assert len(got_grads) == len(want_grads)
    for a, b in zip(got + got_grads, want + want_grads):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("kind", ["norm", "swiglu", "rope"])
def test_torch_and_compiled_kernels_equal_the_plain_ops(kind):
    _check(kind, "torch", "cpu", torch.float32, 0, 0)
    _check(kind, "compile", "cpu", torch.float32, 1e-5, 1e-6)


@pytest.mark.skipif(GPU, reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("kind", ["norm", "swiglu", "rope"])
def test_liger_is_refused_without_a_gpu(kind):
    x, k, weight, cos, sin = _inputs()
    refusal = rf"model.kernels.{kind}=liger cannot run: .*CUDA GPU.*use model.kernels.{kind}=torch"
    with pytest.raises(RuntimeError, match=refusal):
        _switched(kind, "liger", x, k, weight, cos, sin)


def test_the_switch_reaches_every_module_and_names_unknown_choices():
    kernels = KernelsConfig(norm="compile", swiglu="liger", rope="compile", loss="chunked")
    model = build_model(dataclasses.replace(TINY, kernels=kernels))
    chosen = {(m.kernel_slot, m.kernel) for m in model.modules() if hasattr(m, "kernel_slot")}
    assert chosen == {("norm", "compile"), ("swiglu", "liger"), ("rope", "compile")}
    # Per block: 2 norms, the attention (RoPE) and the FFN; then the final norm.
    assert sum(hasattr(m, "kernel_slot") for m in model.modules()) == 4 * 4 + 1
    unknown = r"model.kernels.rope 'triton' is unknown; choose one of \['torch', 'compile', 'liger'\]"
    with pytest.raises(ValueError, match=unknown):
        DecoderConfig.from_dict({"family": "decoder", "kernels": {"rope": "triton"}})


@pytest.mark.skipif(not GPU, reason="liger-kernel's Triton kernels need a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["norm", "swiglu", "rope"])
def test_liger_kernels_equal_the_plain_ops_on_gpu(kind, dtype):
    pytest.importorskip("liger_kernel", reason="liger-kernel is not installed")
    tolerance = (1e-5, 1e-5) if dtype == torch.float32 else (2e-2, 2e-2)
    _check(kind, "liger", "cuda", dtype, *tolerance)


@pytest.mark.skipif(not GPU, reason="the GPU kernels need a CUDA GPU")
@pytest.mark.parametrize("kernel", ["compile", "liger"])
def test_a_model_on_gpu_with_every_kernel_switched_matches_the_torch_path(kernel):
    if kernel == "liger":
        pytest.importorskip("liger_kernel", reason="liger-kernel is not installed")
    loss_kernel = "liger" if kernel == "liger" else "chunked"
    losses, grads = [], []
    for kernels in (KernelsConfig(), KernelsConfig(norm=kernel, swiglu=kernel, rope=kernel, loss=loss_kernel)):
        torch.manual_seed(0)
        model = build_model(dataclasses.replace(TINY, kernels=kernels)).cuda()
        model.loss_settings = dataclasses.replace(model.loss_settings, fused_head=kernels.fused_loss)
        batch = {key: value.cuda() for key, value in global_batch(0, batch=2).items()}
        args, kwargs = causal_lm.inputs_with_token_ids(batch)
        loss, _ = causal_lm.loss(model(*args, **kwargs), causal_lm.targets(batch), None, model.loss_settings)
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    assert float((grads[1] - grads[0]).norm() / grads[0].norm()) < 1e-4
