"""Gated retention (Sun et al. 2024, YOCO's self-decoder mixer): the ``retention`` mixer kind.

Per head h with head dimension D (docs/yoco.md):

    q, k = RoPE(x·W_q), RoPE(x·W_k)·D^-½;  v = x·W_v;  log γ_t = logsigmoid(x_t·W_decay)/τ
    o = retention(q, k, v, γ)            (models/retention/forms.py; state reset per document)
    y = W_o · (silu(x·W_gate) ⊙ RMSNorm_per-head(o))      (the norm has no weight)

Projections: ``wq``, ``wk``, ``wv``, ``wgate`` [H·D, d], ``wdecay`` [H, d], ``wo`` [d, H·D], no
biases. Training runs the chunkwise form (the parallel form when the sequence fits one chunk),
or flash-linear-attention's kernel on a GPU where installed; a generation keeps one [H, D, D]
fp32 state per layer, whatever the length (prompt chunks: chunkwise from the state; single
tokens: the recurrence).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.config import MixerConfig
from models.context import ForwardContext
from models.linear import Linear
from models.plans import Colwise, Rowwise
from models.retention.fla import fla_retention, fla_usable
from models.retention.forms import chunkwise_retention, recurrent_retention
from models.rope import apply_rope
from models.spec import register_mixer


@dataclass
class RetentionConfig(MixerConfig):
    """``chunk_size``: positions per chunk of the chunkwise form (256 in YOCO);
    ``gate_temperature`` τ: log γ = logsigmoid(x·W_decay)/τ (16 in YOCO)."""

    kind: str = "retention"
    n_heads: int = 8
    chunk_size: int = 256
    gate_temperature: float = 16.0
    head_norm_eps: float = 1e-5

    def resolved_head_dim(self, d_model: int) -> int:
        return d_model // max(1, self.n_heads)

    def context_parallel_errors(self, prefix: str) -> list[str]:
        return [
            f"{prefix} (kind retention) carries a recurrent state along the sequence, which context parallelism "
            "cannot split; set parallel.cp=1"
        ]

    def problems(self, prefix: str, d_model: int) -> list[str]:
        errors = []
        for name in ("n_heads", "chunk_size"):
            if getattr(self, name) <= 0:
                errors.append(f"{prefix}.{name} must be a positive integer, got {getattr(self, name)}")
        if self.gate_temperature <= 0:
            errors.append(f"{prefix}.gate_temperature must be > 0, got {self.gate_temperature}")
        if self.head_norm_eps <= 0:
            errors.append(f"{prefix}.head_norm_eps must be > 0, got {self.head_norm_eps}")
        if errors:
            return errors
        if d_model % self.n_heads:
            errors.append(
                f"model.d_model ({d_model}) must be divisible by {prefix}.n_heads ({self.n_heads}); "
                f"e.g. n_heads={max(h for h in range(1, self.n_heads + 1) if d_model % h == 0)}"
            )
        elif self.resolved_head_dim(d_model) % 2:
            errors.append(
                f"the head dimension ({self.resolved_head_dim(d_model)}) must be even for rotary embeddings; "
                f"change model.d_model or {prefix}.n_heads"
            )
        return errors

    def tp_sizes(self, prefix: str, d_model: int) -> dict[str, int]:
        return {f"{prefix}.n_heads": self.n_heads}

    def decode_state_bytes(self, d_model: int, batch: int, length: int, element_bytes: int) -> int:
        """One fp32 [H, D, D] state per row, whatever the length and the model's dtype."""
        head_dim = self.resolved_head_dim(d_model)
        return 4 * batch * self.n_heads * head_dim * head_dim


class RetentionState:
    """A generation's retention state [B, H, D, D] (fp32); it cannot be rewound."""

    def __init__(self, batch: int, n_heads: int, head_dim: int, device):
        self.memory = torch.zeros(batch, n_heads, head_dim, head_dim, dtype=torch.float32, device=device)

    def rewind(self, n: int) -> None:
        raise ValueError(
            "a retention state has folded in the positions a rewind would remove: speculative decoding works "
            "with full-attention layers only"
        )

    def nbytes(self) -> int:
        return self.memory.nbytes


class GatedRetention(nn.Module):
    def __init__(self, d_model: int, config: RetentionConfig, layer_id: int):
        super().__init__()
        self.head_dim = config.resolved_head_dim(d_model)
        self.n_heads = config.n_heads
        self.chunk_size = config.chunk_size
        self.gate_temperature = config.gate_temperature
        self.eps = config.head_norm_eps
        self.layer_id = layer_id
        inner = config.n_heads * self.head_dim
        self.wq, self.wk, self.wv, self.wgate = (Linear(d_model, inner) for _ in range(4))
        self.wdecay = Linear(d_model, config.n_heads)
        self.wo = Linear(inner, d_model)

    def init_weights(self, init_std: float, out_std: float) -> None:
        for linear in (self.wq, self.wk, self.wv, self.wgate, self.wdecay):
            nn.init.normal_(linear.weight, std=init_std)
        nn.init.normal_(self.wo.weight, std=out_std)

    def tp_plan(self) -> dict:
        return {name: Colwise() for name in ("wq", "wk", "wv", "wgate", "wdecay")} | {"wo": Rowwise()}

    def core_flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs outside the projections, chunkwise form with chunk C = min(chunk_size,
        S): q·kᵀ and ·v over C/2 keys on average, 4·H·D·C/2, plus, when there is more than one
        chunk, q·S and the state update kᵀv, 2·H·D² each."""
        chunk = min(self.chunk_size, seq_len)
        flops = 2 * self.n_heads * self.head_dim * chunk
        if seq_len > self.chunk_size:
            flops += 4 * self.n_heads * self.head_dim**2
        return flops

    def new_state(self, batch: int, max_len: int, dtype: torch.dtype, device) -> RetentionState:
        return RetentionState(batch, self.n_heads, self.head_dim, device)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, -1, self.head_dim)
        k = self.wk(x).view(batch, seq, -1, self.head_dim)
        v = self.wv(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        cos, sin = ctx.rope[self.head_dim]
        q = apply_rope(q, cos, sin).transpose(1, 2)
        k = apply_rope(k, cos, sin).transpose(1, 2) * self.head_dim**-0.5
        log_decay = (F.logsigmoid(self.wdecay(x).float()) / self.gate_temperature).transpose(1, 2)
        if ctx.state is not None:
            state = ctx.state.layers[self.layer_id]
            if seq == 1:
                out, state.memory = recurrent_retention(q, k, v, log_decay, initial=state.memory)
            else:
                out, state.memory = chunkwise_retention(q, k, v, log_decay, self.chunk_size, initial=state.memory)
        elif fla_usable(x):
            out = fla_retention(q, k, v, log_decay, ctx.segments)
        else:
            out, _ = chunkwise_retention(q, k, v, log_decay, self.chunk_size, ctx.segments)
        out = F.rms_norm(out.float(), (self.head_dim,), eps=self.eps).to(x.dtype)
        out = out.transpose(1, 2).reshape(batch, seq, -1)
        return self.wo(F.silu(self.wgate(x)) * out)


register_mixer("retention", RetentionConfig, lambda config, d_model, layer_id: GatedRetention(d_model, config, layer_id))
