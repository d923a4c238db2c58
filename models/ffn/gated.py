"""T5's feed-forward kinds, for any family (the ``encdec`` family's default is ``gated_gelu``):

- ``gated_gelu`` (T5 v1.1): ``w2(gelu_tanh(w1·x) ⊙ w3·x)``; ``w1`` the gate, ``w3`` the up
  projection (HF T5's ``wi_0``, ``wi_1``), ``w2`` the down projection (``wo``);
- ``relu`` (the original T5): ``w2(relu(w1·x))`` (HF T5's ``wi``, ``wo``).

GELU is the tanh approximation, HF's ``gelu_new``, which T5 v1.1 checkpoints use. On CPU it is
computed as x·σ(2z) (= ½x(1 + tanh z), z = √(2/π)(x + 0.044715x³)): torch's CPU ``tanh`` costs
3.6× its ``sigmoid`` (4.4 vs 1.2 ms over 2048×640 fp32 values, one thread of the AVX2 test VM),
and ``F.gelu(approximate="tanh")`` 2× this form (5.8 vs 2.9 ms), which agrees with it to a few
ulp. With autograd the gated product ``gelu_tanh(gate) ⊙ up`` is one Function (``_GatedGELU``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.config import FFNConfig
from models.ffn.swiglu import SwiGLU
from models.linear import Linear
from models.plans import Colwise, Rowwise
from models.spec import register_ffn


@dataclass
class GatedGELUConfig(FFNConfig):
    kind: str = "gated_gelu"
    d_ff: int = 1024

    def problems(self, prefix: str, d_model: int) -> list[str]:
        return [] if self.d_ff > 0 else [f"{prefix}.d_ff must be a positive integer, got {self.d_ff}"]

    def tp_sizes(self, prefix: str, d_model: int) -> dict[str, int]:
        return {f"{prefix}.d_ff": self.d_ff}


@dataclass
class ReLUConfig(GatedGELUConfig):
    kind: str = "relu"


TWO_C = 2 * math.sqrt(2 / math.pi)  # 2z = TWO_C·(x + CUBIC·x³)
CUBIC = 0.044715


def _sigmoid_2z(x: torch.Tensor) -> torch.Tensor:
    """σ(2z) for z = √(2/π)(x + 0.044715x³), so that gelu_tanh(x) = x·σ(2z)."""
    return (x * x).mul_(TWO_C * CUBIC).add_(TWO_C).mul_(x).sigmoid_()


class _GatedGELU(torch.autograd.Function):
    """gelu_tanh(gate) ⊙ up on CPU, keeping gate, up and σ(2z) (as many tensors as autograd keeps
    for the plain ops). d gelu_tanh / dx = s + x·s(1 − s)·2z′, with s = σ(2z) and
    2z′ = TWO_C(1 + 3·CUBIC·x²)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        sig = _sigmoid_2z(gate)
        ctx.save_for_backward(gate, up, sig)
        return (gate * sig).mul_(up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up, sig = ctx.saved_tensors
        grad_up = (gate * sig).mul_(grad) if ctx.needs_input_grad[1] else None
        grad_gate = None
        if ctx.needs_input_grad[0]:
            slope = (gate * gate).mul_(3 * TWO_C * CUBIC).add_(TWO_C).mul_(gate)
            grad_gate = slope.addcmul_(slope, sig, value=-1).add_(1).mul_(sig).mul_(grad).mul_(up)  # slope·(1 − s)
        return grad_gate, grad_up


def gated_gelu_product(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(gate) ⊙ up``: by x·σ(2z) on CPU (one Function under autograd for plain
    tensors), by ``F.gelu(approximate="tanh")`` elsewhere."""
    if gate.device.type != "cpu":
        return F.gelu(gate, approximate="tanh") * up
    if type(gate) is torch.Tensor and type(up) is torch.Tensor and torch.is_grad_enabled():
        return _GatedGELU.apply(gate, up)
    # _sigmoid_2z's ops in its order, out of place (DTensors, no autograd): the Function's bits.
    return gate * torch.sigmoid((gate * gate * (TWO_C * CUBIC) + TWO_C) * gate) * up


class GatedGELU(SwiGLU):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(gated_gelu_product(self.w1(x), self.w3(x)))


class ReLUFFN(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w1 = Linear(d_model, d_ff)
        self.w2 = Linear(d_ff, d_model)

    def init_weights(self, init_std: float, out_std: float) -> None:
        nn.init.normal_(self.w1.weight, std=init_std)
        nn.init.normal_(self.w2.weight, std=out_std)

    def tp_plan(self) -> dict:
        return {"w1": Colwise(), "w2": Rowwise()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.relu(self.w1(x)))


register_ffn("gated_gelu", GatedGELUConfig, lambda config, d_model, layer_id: GatedGELU(d_model, config.d_ff))
register_ffn("relu", ReLUConfig, lambda config, d_model, layer_id: ReLUFFN(d_model, config.d_ff))
