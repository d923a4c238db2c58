"""Grouped-query self-attention with rotary embeddings (the ``attention`` mixer).

Projections: ``wq`` [H·D, d], ``wk``/``wv`` [Hkv·D, d], ``wo`` [d, H·D], no biases — the same
layout as HF Llama's q/k/v/o_proj. Head counts are inferred from the projection outputs (view
with -1), so tensor-parallel sharding of the projections along heads needs no change here.
"""

from __future__ import annotations

import torch
from torch import nn

from models.attention_backends import get_backend
from models.context import ForwardContext
from models.linear import Linear
from models.rope import apply_rope


class Attention(nn.Module):
    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        backend: str,
        layer_id: int,
        window: int | None = None,
    ):
        super().__init__()
        self.head_dim = d_model // n_heads
        self.layer_id = layer_id
        self.window = window
        self.backend = get_backend(backend)
        self.wq = Linear(d_model, n_heads * self.head_dim)
        self.wk = Linear(d_model, n_kv_heads * self.head_dim)
        self.wv = Linear(d_model, n_kv_heads * self.head_dim)
        self.wo = Linear(n_heads * self.head_dim, d_model)

    def init_weights(self, init_std: float, out_std: float) -> None:
        for linear in (self.wq, self.wk, self.wv):
            nn.init.normal_(linear.weight, std=init_std)
        nn.init.normal_(self.wo.weight, std=out_std)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, -1, self.head_dim)
        k = self.wk(x).view(batch, seq, -1, self.head_dim)
        v = self.wv(x).view(batch, seq, -1, self.head_dim)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if ctx.kv_cache is not None:
            k, v = ctx.kv_cache.update(self.layer_id, k, v)
        out = self.backend.attend(q, k, v, ctx.mask(self.backend, self.window))
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))
