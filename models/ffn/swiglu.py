"""SwiGLU feed-forward (the ``swiglu`` FFN kind): w2(silu(w1·x) ⊙ w3·x).

``w1`` is the gate projection, ``w3`` the up projection (both [d_ff, d]), ``w2`` the down
projection [d, d_ff] — Meta Llama's names; HF calls them gate_proj, up_proj, down_proj.
``model.kernels.swiglu`` (models/kernels.py) picks the gated product's implementation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.config import FFNConfig
from models.kernels import compiled, liger_function
from models.linear import Linear
from models.plans import Colwise, Rowwise
from models.spec import register_ffn


@dataclass
class SwiGLUConfig(FFNConfig):
    kind: str = "swiglu"
    d_ff: int = 1024

    def problems(self, prefix: str, d_model: int) -> list[str]:
        return [] if self.d_ff > 0 else [f"{prefix}.d_ff must be a positive integer, got {self.d_ff}"]

    def tp_sizes(self, prefix: str, d_model: int) -> dict[str, int]:
        return {f"{prefix}.d_ff": self.d_ff}


class _GatedProduct(torch.autograd.Function):
    """silu(gate) ⊙ up, keeping only gate and up for backward (silu(gate) is recomputed): one
    tensor of the FFN's width less than the plain ops keep."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # autograd's own ops for silu(gate) * up, with silu(gate) recomputed: the same bits.
        # Products commute, so writing into fresh results instead of making new ones keeps the bits.
        gate, up = ctx.saved_tensors
        grad_gate = None
        if ctx.needs_input_grad[0]:
            grad_gate = grad * up
            torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)
        grad_up = F.silu(gate).mul_(grad) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


def _plain_gated_product(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def gated_product(gate: torch.Tensor, up: torch.Tensor, kernel: str = "torch") -> torch.Tensor:
    """``silu(gate) * up``; lean in memory for plain tensors under autograd; by the ``kernel``
    of ``model.kernels.swiglu`` (plain tensors only)."""
    if type(gate) is torch.Tensor and type(up) is torch.Tensor:
        if kernel == "compile":
            return compiled(_plain_gated_product)(gate, up)
        if kernel == "liger":
            return liger_function("liger_swiglu", gate.device, "model.kernels.swiglu")(gate, up)
        if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
            return _GatedProduct.apply(gate, up)
    return _plain_gated_product(gate, up)


class SwiGLU(nn.Module):
    kernel_slot = "swiglu"  # model.kernels.swiglu chooses ``kernel`` (models/kernels.py)

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.kernel = "torch"
        self.w1 = self.projection(d_model, d_ff, hidden_dim=0)
        self.w3 = self.projection(d_model, d_ff, hidden_dim=0)
        self.w2 = self.projection(d_ff, d_model, hidden_dim=1)

    def projection(self, in_features: int, out_features: int, hidden_dim: int) -> nn.Module:
        """One of the three projections; ``hidden_dim`` is its weight's hidden-unit axis
        (subclasses that narrow the hidden units use it: models/ffn/matformer)."""
        return Linear(in_features, out_features)

    def init_weights(self, init_std: float, out_std: float) -> None:
        nn.init.normal_(self.w1.weight, std=init_std)
        nn.init.normal_(self.w3.weight, std=init_std)
        nn.init.normal_(self.w2.weight, std=out_std)

    def tp_plan(self) -> dict:
        return {"w1": Colwise(), "w3": Colwise(), "w2": Rowwise()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(gated_product(self.w1(x), self.w3(x), self.kernel))


register_ffn("swiglu", SwiGLUConfig, lambda config, d_model, layer_id: SwiGLU(d_model, config.d_ff))
