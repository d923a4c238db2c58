"""Pre-norm residual block: x += mixer(norm(x), ctx); x += ffn(norm(x)).

The block knows nothing about what its mixer or FFN is: any module with ``forward(x, ctx)``
(mixer) or ``forward(x)`` (FFN; ``forward(x, ctx)`` if it sets ``takes_context = True``, as the
MoE layer does for routers that read token ids) and ``init_weights(init_std, out_std)`` fits. Its tensor-parallel
plan covers its own modules: the norms work per token, the mixer and FFN each take one gathered
copy of their input (their own plans shard their projections).
"""

from __future__ import annotations

import torch
from torch import nn

from models.context import ForwardContext
from models.norm import RMSNorm
from models.plans import GatherInputs, Tokenwise


class Block(nn.Module):
    def __init__(self, mixer: nn.Module, ffn: nn.Module, d_model: int, norm_eps: float):
        super().__init__()
        self.mixer_norm = RMSNorm(d_model, norm_eps)
        self.mixer = mixer
        self.ffn_norm = RMSNorm(d_model, norm_eps)
        self.ffn = ffn
        self.ffn_context = getattr(ffn, "takes_context", False)

    def init_weights(self, init_std: float, out_std: float) -> None:
        self.mixer_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.mixer.init_weights(init_std, out_std)
        self.ffn.init_weights(init_std, out_std)

    def tp_plan(self) -> dict:
        return {
            "mixer_norm": Tokenwise(),
            "mixer": GatherInputs((True, False)),  # (x, ctx)
            "ffn_norm": Tokenwise(),
            "ffn": GatherInputs((True, False) if self.ffn_context else (True,)),
        }

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.mixer(self.mixer_norm(x), ctx)
        h = self.ffn_norm(x)
        return x + (self.ffn(h, ctx) if self.ffn_context else self.ffn(h))
