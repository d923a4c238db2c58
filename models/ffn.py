"""SwiGLU feed-forward (the ``swiglu`` FFN): w2(silu(w1·x) ⊙ w3·x).

``w1`` is the gate projection, ``w3`` the up projection (both [d_ff, d]), ``w2`` the down
projection [d, d_ff] — Meta Llama's names; HF calls them gate_proj, up_proj, down_proj.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.linear import Linear


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w1 = Linear(d_model, d_ff)
        self.w3 = Linear(d_model, d_ff)
        self.w2 = Linear(d_ff, d_model)

    def init_weights(self, init_std: float, out_std: float) -> None:
        nn.init.normal_(self.w1.weight, std=init_std)
        nn.init.normal_(self.w3.weight, std=init_std)
        nn.init.normal_(self.w2.weight, std=out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
