"""T5's feed-forward kinds, for any family (the ``encdec`` family's default is ``gated_gelu``):

- ``gated_gelu`` (T5 v1.1): ``w2(gelu_tanh(w1·x) ⊙ w3·x)``; ``w1`` the gate, ``w3`` the up
  projection (HF T5's ``wi_0``, ``wi_1``), ``w2`` the down projection (``wo``);
- ``relu`` (the original T5): ``w2(relu(w1·x))`` (HF T5's ``wi``, ``wo``).

GELU is the tanh approximation, HF's ``gelu_new``, which T5 v1.1 checkpoints use.
"""

from __future__ import annotations

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


class GatedGELU(SwiGLU):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x), approximate="tanh") * self.w3(x))


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
