"""The routed experts: E SwiGLUs stored as three stacked weights, run on tokens grouped by
expert, either as one grouped GEMM per projection (``torch._grouped_mm``) or as a loop over the
experts (the reference, and the fallback where the grouped GEMM is not supported).

Weights (per expert e, the layout of a SwiGLU's Linear weights stacked on a leading dim):
``w1`` [E, f, d] gate, ``w3`` [E, f, d] up, ``w2`` [E, d, f] down; expert e computes
w2[e] · (silu(w1[e] · x) ⊙ w3[e] · x).

``torch._grouped_mm`` (verified on torch 2.13 CPU, docs/moe.md) takes the token rows [N, d],
the weights as [E, d, f] (a transposed view is fine) and ``offs`` = the cumulative counts
(int32). It is used for plain tensors on CPU in fp32/bf16 whose rows are 16-byte aligned, and on
CUDA in bf16 from compute capability 9.0; otherwise (DTensor weights under tensor parallelism,
other dtypes or devices, torch.compile, where the fp32 meta kernel is missing) the loop runs.
Under autocast the grouped GEMM's operands are cast to the autocast dtype first (autocast does
not cover ``_grouped_mm``; the loop's products are autocast as usual).

Expert parallelism is installed from outside (pretrain/parallel/ep.py) as an ``exchange``
(:class:`ExpertExchange`): the rows grouped by all E experts go to the ranks holding their
experts, this rank's experts run on what arrives, and the outputs come back in the original
order. The model itself holds no process group.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from models.linear import linear
from models.plans import Replicated


class ExpertExchange(Protocol):
    """How rows reach the experts when they are spread over ranks (expert parallelism)."""

    def dispatch(self, x: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, object]:
        """Rows ``x`` grouped by all E experts with ``counts`` [E] → the rows for this rank's
        experts grouped by local expert, their counts, and what ``combine`` needs."""

    def combine(self, y: torch.Tensor, state: object) -> torch.Tensor:
        """This rank's expert outputs → the outputs of the rows ``dispatch`` took, in their order."""

    def local_weights(self, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """This rank's experts' slices of the stacked weights, as plain tensors."""


def grouped_mm_supported(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` runs these operands (checked per call: device, dtype,
    alignment, plain tensors, not compiling)."""
    tensors = (x, *weights)
    if not hasattr(torch, "_grouped_mm") or torch.compiler.is_compiling():
        return False
    if any(type(t) not in (torch.Tensor, nn.Parameter) for t in tensors):
        return False
    if len({t.dtype for t in tensors}) != 1 or len({t.device for t in tensors}) != 1:
        return False
    if x.device.type == "cpu":
        if x.dtype not in (torch.float32, torch.bfloat16):
            return False
    elif x.device.type == "cuda":
        if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (9, 0):
            return False
    else:
        return False
    row_bytes = [t.shape[-1] * t.element_size() for t in tensors] + [w.shape[-2] * w.element_size() for w in weights]
    return all(b % 16 == 0 for b in row_bytes)


class _GroupedSwiGLU(torch.autograd.Function):
    """The experts' chain w2·(silu(w1·x) ⊙ w3·x) by grouped GEMMs, forward and backward, keeping
    x, gate, up and the hidden product for backward (autograd's ops would also keep silu(gate));
    the backward writes its elementwise results into buffers it owns instead of new ones."""

    @staticmethod
    def forward(ctx, x, w1, w3, w2, offs):
        gate = torch._grouped_mm(x, w1.transpose(1, 2), offs)
        up = torch._grouped_mm(x, w3.transpose(1, 2), offs)
        hidden = F.silu(gate).mul_(up)
        ctx.save_for_backward(x, w1, w3, w2, offs, gate, up, hidden)
        return torch._grouped_mm(hidden, w2.transpose(1, 2), offs)

    @staticmethod
    def backward(ctx, grad):
        x, w1, w3, w2, offs, gate, up, hidden = ctx.saved_tensors
        grad = grad.contiguous()
        grad_w2 = torch._grouped_mm(grad.t(), hidden, offs) if ctx.needs_input_grad[3] else None
        grad_hidden = torch._grouped_mm(grad, w2, offs)
        grad_up = F.silu(gate).mul_(grad_hidden)
        grad_gate = torch.ops.aten.silu_backward(grad_hidden.mul_(up), gate)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch._grouped_mm(grad_gate, w1, offs).add_(torch._grouped_mm(grad_up, w3, offs))
        grad_w1 = torch._grouped_mm(grad_gate.t(), x, offs) if ctx.needs_input_grad[1] else None
        grad_w3 = torch._grouped_mm(grad_up.t(), x, offs) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w1, grad_w3, grad_w2, None


def grouped_swiglu(x: torch.Tensor, w1, w3, w2, counts: torch.Tensor) -> torch.Tensor:
    """All experts by three grouped GEMMs: ``x`` [N, d] grouped by expert, ``counts`` [E]."""
    offs = torch.cumsum(counts, 0).to(torch.int32)
    return _GroupedSwiGLU.apply(x, w1, w3, w2, offs)


def looped_swiglu(x: torch.Tensor, w1, w3, w2, counts: list[int]) -> torch.Tensor:
    """The same, one expert at a time (experts with no rows are skipped)."""
    outputs, start = [], 0
    for e, n in enumerate(counts):
        if n:
            rows = x[start : start + n]
            outputs.append(linear(F.silu(linear(rows, w1[e])) * linear(rows, w3[e]), w2[e]))
        start += n
    if not outputs:
        return x.new_zeros(0, w2.shape[1])
    return torch.cat(outputs)


class GroupedExperts(nn.Module):
    """E SwiGLU experts of width ``d_ff``; ``forward(x, counts=...)`` runs rows grouped by expert."""

    def __init__(self, n_experts: int, d_model: int, d_ff: int, grouped_gemm: bool, exchangeable: bool = True):
        super().__init__()
        self.n_experts, self.d_model, self.d_ff = n_experts, d_model, d_ff
        self.grouped_gemm = grouped_gemm
        self.exchangeable = exchangeable  # False: some forward runs every expert on every row (compete)
        self.exchange: ExpertExchange | None = None
        self.w1 = nn.Parameter(torch.empty(n_experts, d_ff, d_model))
        self.w3 = nn.Parameter(torch.empty(n_experts, d_ff, d_model))
        self.w2 = nn.Parameter(torch.empty(n_experts, d_model, d_ff))

    def init_weights(self, init_std: float, out_std: float) -> None:
        nn.init.normal_(self.w1, std=init_std)
        nn.init.normal_(self.w3, std=init_std)
        nn.init.normal_(self.w2, std=out_std)

    def tp_plan(self) -> dict:
        return {"": Replicated()}

    def forward(self, x: torch.Tensor, *, counts: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` [N, d] grouped by expert with ``counts`` [E] rows each → [N, d]; without
        ``counts``, every expert on every row → [E, N, d] (CompeteSMoE's competition).
        ``counts`` is a keyword argument, so a tensor-parallel wrapper leaves it a plain tensor."""
        if counts is None:
            return self._all_experts(x)
        weights = (self.w1, self.w3, self.w2)
        if self.exchange is None:
            return self._grouped(x, weights, counts)
        x, counts, state = self.exchange.dispatch(x, counts)
        return self.exchange.combine(self._grouped(x, self.exchange.local_weights(*weights), counts), state)

    def ep_errors(self, ep: int, name: str) -> list[str]:
        """What spreading these experts over ``ep`` ranks needs."""
        errors = []
        if self.n_experts % ep:
            errors.append(f"{name}: {self.n_experts} experts cannot be split over parallel.ep={ep}; use an ep that divides them")
        if not self.exchangeable:
            errors.append(f"{name}: the compete router runs every expert on every token, which expert parallelism "
                          "cannot; use parallel.ep=1 or another router")
        return errors

    def _grouped(self, x: torch.Tensor, weights: tuple, counts: torch.Tensor) -> torch.Tensor:
        plain = weights
        if torch.is_autocast_enabled(x.device.type):  # autocast does not cover _grouped_mm: cast as it would
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weights = x.to(dtype), tuple(w.to(dtype) for w in weights)
        if self.grouped_gemm and grouped_mm_supported(x, *weights):
            return grouped_swiglu(x, *weights, counts)
        return looped_swiglu(x, *plain, counts.tolist())

    def _all_experts(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.unsqueeze(0).expand(self.n_experts, *x.shape)
        hidden = F.silu(torch.bmm(rows, self.w1.transpose(1, 2))) * torch.bmm(rows, self.w3.transpose(1, 2))
        return torch.bmm(hidden, self.w2.transpose(1, 2))

    def extra_repr(self) -> str:
        return f"{self.n_experts} experts, d_model={self.d_model}, d_ff={self.d_ff}, grouped_gemm={self.grouped_gemm}"
