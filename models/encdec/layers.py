"""The encoder-decoder's attention layers and decoder block.

``T5Attention``: projections ``wq`` [H·D, d], ``wk``/``wv`` [H·D, d], ``wo`` [d, H·D], no
biases (HF T5's q, k, v, o). Its ``role`` says where it sits: ``encoder`` (bidirectional
self-attention), ``decoder`` (causal self-attention, a growing KV cache when generating) or
``cross`` (queries from the decoder, keys and values from the encoder output ``ctx.memory``;
when generating they are projected once and kept in a static cache). The family prepares one
attention spec per role (models/encdec/model.py) holding the scale, the shared relative bias and
the segment ids; RoPE (``position: rope``) rotates self-attention queries and keys only.

``DecoderBlock``: x += self(norm(x)); x += cross(norm(x), memory); x += ffn(norm(x)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.attention.backends import get_backend
from models.attention.cache import KVCache
from models.context import ForwardContext
from models.linear import Linear
from models.norm import RMSNorm
from models.plans import Colwise, GatherInputs, Rowwise, Tokenwise
from models.rope import rotate_qk

ROLES = ("encoder", "decoder", "cross")


@dataclass(frozen=True)
class EncDecContext(ForwardContext):
    """The forward context plus ``memory``: the encoder output [B, Se, d] that cross-attention
    reads (None in the encoder)."""

    memory: torch.Tensor | None = None


class MemoryInput(nn.Module):
    """The encoder output as the decoder's cross-attentions read it: under tensor parallelism one
    replicated copy (a single all-gather under SP) that every layer's K/V projections share, and
    whose gradient is reduced once."""

    def tp_plan(self) -> dict:
        return {"": GatherInputs((True,))}

    def forward(self, memory: torch.Tensor) -> torch.Tensor:
        return memory


class StaticKV:
    """Cross-attention keys and values of one decoder layer, projected once from the encoder
    output at the first decoding step and reused by every later one."""

    def __init__(self):
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def rewind(self, n: int) -> None:
        """Nothing to forget: the encoder output does not grow with the generated tokens."""

    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class T5Attention(nn.Module):
    kernel_slot = "rope"  # model.kernels.rope chooses ``kernel``, the self-attention RoPE (models/kernels.py)

    def __init__(self, d_model: int, n_heads: int, head_dim: int, backend: str, role: str, layer_id: int):
        super().__init__()
        if role not in ROLES:
            raise ValueError(f"attention role {role!r} is not one of {ROLES}")
        self.n_heads, self.head_dim, self.role, self.layer_id = n_heads, head_dim, role, layer_id
        self.window = None
        self.kernel = "torch"
        self.backend = get_backend(backend)
        self.wq = Linear(d_model, n_heads * head_dim)
        self.wk = Linear(d_model, n_heads * head_dim)
        self.wv = Linear(d_model, n_heads * head_dim)
        self.wo = Linear(n_heads * head_dim, d_model)

    @property
    def attention_key(self) -> tuple:
        return (self.role, self.backend.name)

    @property
    def state_key(self):
        """This layer's key in a decode state."""
        return ("cross", self.layer_id) if self.role == "cross" else self.layer_id

    def init_weights(self, factor: float, d_model: int) -> None:
        """T5's init: q ~ N(0, f/√(d·D)), k and v ~ N(0, f/√d), o ~ N(0, f/√(H·D))."""
        nn.init.normal_(self.wq.weight, std=factor * (d_model * self.head_dim) ** -0.5)
        nn.init.normal_(self.wk.weight, std=factor * d_model**-0.5)
        nn.init.normal_(self.wv.weight, std=factor * d_model**-0.5)
        nn.init.normal_(self.wo.weight, std=factor * (self.n_heads * self.head_dim) ** -0.5)

    def tp_plan(self) -> dict:
        return {"wq": Colwise(), "wk": Colwise(), "wv": Colwise(), "wo": Rowwise()}

    def core_flops_per_token(self, seq_len: int, kv_len: int | None = None) -> int:
        """Forward FLOPs of q·kᵀ and probabilities·v per query: 4·H·D per visible key — S/2 in
        causal self-attention, all ``kv_len`` keys otherwise (default: ``seq_len``, the generic
        per-token count's assumption of equal encoder and decoder lengths)."""
        keys = seq_len / 2 if self.role == "decoder" else (seq_len if kv_len is None else kv_len)
        return round(4 * self.n_heads * self.head_dim * keys)

    def new_state(self, batch: int, max_len: int, dtype: torch.dtype, device):
        if self.role == "cross":
            return StaticKV()
        return KVCache(batch, self.n_heads, self.head_dim, max_len, dtype, device)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], -1, self.head_dim)

    def forward(self, x: torch.Tensor, ctx: EncDecContext) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self._heads(self.wq(x))
        state = ctx.state.layers[self.state_key] if ctx.state is not None else None
        if self.role == "cross":
            if state is not None and state.keys is not None:
                k, v = state.keys, state.values
            else:
                k = self._heads(self.wk(ctx.memory)).transpose(1, 2)
                v = self._heads(self.wv(ctx.memory)).transpose(1, 2)
                if state is not None:
                    state.keys, state.values = k, v
            q = q.transpose(1, 2)
        else:
            k, v = self._heads(self.wk(x)), self._heads(self.wv(x))
            if self.head_dim in ctx.rope:
                cos, sin = ctx.rope[self.head_dim]
                q, k = rotate_qk(q, k, cos, sin, self.kernel)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            if state is not None:
                k, v = state.append(k, v)
        out = self.backend.attend(q, k, v, ctx.attention[self.attention_key])
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


def residual(x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """x + branch, written into ``branch`` when it is a sublayer's fresh plain output in eager
    code (not a view: an MoE layer returns a view made inside its autograd Function, which must
    not change in place; compiled code fuses the add anyway; DTensors keep the plain add):
    addition commutes, so the bits are x + branch's, and on CPU a fresh activation-sized tensor
    costs its page faults."""
    if torch.compiler.is_compiling() or type(branch) is not torch.Tensor or branch._is_view():
        return x + branch
    return branch.add_(x)


class EncoderBlock(nn.Module):
    """x += attention(norm(x)); x += ffn(norm(x)) (bidirectional self-attention)."""

    def __init__(self, mixer: T5Attention, ffn: nn.Module, d_model: int, norm_eps: float):
        super().__init__()
        self.mixer_norm = RMSNorm(d_model, norm_eps)
        self.mixer = mixer
        self.ffn_norm = RMSNorm(d_model, norm_eps)
        self.ffn = ffn
        self.ffn_context = getattr(ffn, "takes_context", False)

    def norms(self) -> list[RMSNorm]:
        return [self.mixer_norm, self.ffn_norm]

    def attentions(self) -> list[T5Attention]:
        return [self.mixer]

    def init_weights(self, factor: float, d_model: int, d_ff: int) -> None:
        for norm in self.norms():
            norm.reset_parameters()
        for attention in self.attentions():
            attention.init_weights(factor, d_model)
        self.ffn.init_weights(factor * d_model**-0.5, factor * d_ff**-0.5)

    def tp_plan(self) -> dict:
        return {
            "mixer_norm": Tokenwise(),
            "mixer": GatherInputs((True, False)),
            "ffn_norm": Tokenwise(),
            "ffn": GatherInputs((True, False) if self.ffn_context else (True,)),
        }

    def _ffn(self, x: torch.Tensor, ctx: EncDecContext) -> torch.Tensor:
        h = self.ffn_norm(x)
        return residual(x, self.ffn(h, ctx) if self.ffn_context else self.ffn(h))

    def forward(self, x: torch.Tensor, ctx: EncDecContext) -> torch.Tensor:
        x = residual(x, self.mixer(self.mixer_norm(x), ctx))
        return self._ffn(x, ctx)


class DecoderBlock(EncoderBlock):
    """x += self(norm(x)); x += cross(norm(x)) over ``ctx.memory``; x += ffn(norm(x))."""

    def __init__(self, mixer: T5Attention, cross: T5Attention, ffn: nn.Module, d_model: int, norm_eps: float):
        super().__init__(mixer, ffn, d_model, norm_eps)
        self.cross_norm = RMSNorm(d_model, norm_eps)
        self.cross = cross

    def norms(self) -> list[RMSNorm]:
        return [self.mixer_norm, self.cross_norm, self.ffn_norm]

    def attentions(self) -> list[T5Attention]:
        return [self.mixer, self.cross]

    def tp_plan(self) -> dict:
        return {**super().tp_plan(), "cross_norm": Tokenwise(), "cross": GatherInputs((True, False))}

    def forward(self, x: torch.Tensor, ctx: EncDecContext) -> torch.Tensor:
        x = residual(x, self.mixer(self.mixer_norm(x), ctx))
        x = residual(x, self.cross(self.cross_norm(x), ctx))
        return self._ffn(x, ctx)
