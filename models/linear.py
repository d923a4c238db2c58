"""Bias-free linear layer whose fp32 CPU matrix products run on oneDNN where that was measured faster.

On CPU, aten's fp32 ``mm`` calls MKL's sgemm. Which library is faster depends on the CPU
(``python bench/cpu_gemm.py``, tables in docs/benchmarks.md):
- on the development machine of 2026-11-24 (recorded as AMD EPYC Zen 4, AVX-512), oneDNN's
  forward and input-gradient products of the tiny and 125m presets were 5-15% faster than aten's
  in isolation (most shapes), ~5% over a real tiny step;
- on an AVX2-only AMD EPYC VM (2026-12-04, ``--presets tiny --tokens 2048 --repeats 10``, three
  runs), aten's forward and input-gradient products of the tiny preset took 0.90-0.975 of
  oneDNN's time, and a whole T5 step (``bench/encdec_step.py --steps 6``, six runs on the quiet
  VM) ran 1.04-1.12x faster with aten's.
So oneDNN is used only when torch reports AVX-512 (``PREFER_ONEDNN``, decided once at import);
elsewhere the layer is ``F.linear``. Where it is used, the forward product x·Wᵀ and the input
gradient g·W run on oneDNN; the weight gradient gᵀ·x stays on aten, where oneDNN is no
faster (it would need transposed copies of both operands). For g·W oneDNN first copies Wᵀ;
that transposed copy is cheap while W fits in cache and slow beyond (in the 125m preset's real
step: 0.3 ms for a 768×768 weight, 17.6 ms for 2560×768), so for weights over ``LARGE_WEIGHT``
elements aten computes g·W.

Under torch.compile both oneDNN products are one custom op, ``models::mm_nt`` (a·bᵀ), with its
own autograd formula and a shape-only fake implementation: inductor keeps it as an opaque kernel
and fuses the elementwise code around it. Eager code runs the same kernels from an
autograd.Function. FlopCounterMode and the ``op`` recompute policy know both ops (GEMM_OPS).

Everywhere else (CPUs without AVX-512, CUDA, dtypes other than fp32, CPU autocast, DTensor-sharded
weights under tensor parallelism, builds without oneDNN) the layer is exactly ``nn.Linear(bias=False)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import register_flop_formula

ONEDNN_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
PREFER_ONEDNN = ONEDNN_AVAILABLE and torch.backends.cpu.get_cpu_capability() == "AVX512"
_PLAIN = (torch.Tensor, nn.Parameter)
LARGE_WEIGHT = 1 << 20


def _onednn_mm_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] · bᵀ for b [N, K] → [M, N] by oneDNN's inner-product kernel (fp32, CPU)."""
    return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")


class _MmNT(torch.autograd.Function):
    """Eager path: a·bᵀ with gradients g·b (oneDNN) and gᵀ·a (aten)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        return _onednn_mm_nt(a, b)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, b = ctx.saved_tensors
        grad_a = _input_grad(grad, b, _onednn_mm_nt) if ctx.needs_input_grad[0] else None
        grad_b = grad.t().mm(a) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


def _input_grad(grad: torch.Tensor, weight: torch.Tensor, product) -> torch.Tensor:
    """g·W: by ``product`` (a oneDNN a·bᵀ) unless W is large, then by aten."""
    return grad.mm(weight) if weight.numel() > LARGE_WEIGHT else product(grad, weight.t())


@torch.library.custom_op("models::mm_nt", mutates_args=())
def mm_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The same product as one custom op, for torch.compile (eager calls cost ~60 µs more than
    the autograd.Function's, about 2% of a tiny-preset step, so eager code does not use it)."""
    return _onednn_mm_nt(a, b)


@mm_nt.register_fake
def _mm_nt_fake(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.new_empty(a.shape[0], b.shape[0])


def _mm_nt_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _mm_nt_backward(ctx, grad: torch.Tensor):
    a, b = ctx.saved_tensors
    grad_a = _input_grad(grad, b, mm_nt) if ctx.needs_input_grad[0] else None
    grad_b = grad.t().mm(a) if ctx.needs_input_grad[1] else None
    return grad_a, grad_b


mm_nt.register_autograd(_mm_nt_backward, setup_context=_mm_nt_setup_context)

# The two ops these products run as (compiled, eager): FlopCounterMode gets their formula below,
# and the ``op`` recompute policy (pretrain/parallel/recompute.py) saves their outputs like mm's.
GEMM_OPS = (torch.ops.models.mm_nt.default, torch.ops.mkldnn._linear_pointwise.default) if ONEDNN_AVAILABLE else ()


def _mm_nt_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[0]


for _op in GEMM_OPS:
    register_flop_formula(_op.overloadpacket)(_mm_nt_flops)


def uses_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``linear(x, weight)`` takes the oneDNN path."""
    return (
        PREFER_ONEDNN
        and type(x) in _PLAIN
        and type(weight) in _PLAIN
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.numel() > 0
        and not torch.is_autocast_enabled("cpu")
    )


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` (no bias), by oneDNN for plain fp32 CPU tensors on AVX-512 CPUs."""
    if not uses_onednn(x, weight):
        return F.linear(x, weight)
    product = mm_nt if torch.compiler.is_compiling() else _MmNT.apply
    return product(x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` without bias (same parameter, ``weight`` [out, in]; tensor-parallel plans
    and checkpoints see an ordinary Linear) whose forward is :func:`linear`."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)
