"""Grouped-query self-attention with rotary embeddings and an optional sliding window: the
``attention`` mixer kind.

Projections: ``wq`` [H·D, d], ``wk``/``wv`` [Hkv·D, d], ``wo`` [d, H·D], no biases — the same
layout as HF Llama's q/k/v/o_proj. Head counts are inferred from the projection outputs (view
with -1), so tensor-parallel sharding of the projections along heads needs no change here.

The layer reads its prepared attention spec from the forward context under its
``attention_key`` (backend, window); the family prepares one per distinct key with
:func:`prepare_self_attention`. With a decode state it appends to its cache: a growing
``KVCache``, or a ``WindowKVCache`` that keeps only what the window can still see.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from models.attention.backends import BACKENDS, get_backend
from models.attention.cache import KVCache, WindowKVCache
from models.attention.spec import AttentionSpec
from models.config import MixerConfig
from models.context import ForwardContext
from models.linear import Linear
from models.norm import RMSNorm
from models.plans import Colwise, Rowwise
from models.rope import rotate_qk
from models.spec import register_mixer


@dataclass
class AttentionConfig(MixerConfig):
    """``head_dim`` None: d_model / n_heads. ``window`` W: each query sees the W keys ending at
    itself (None: all earlier keys). ``backend``: math | sdpa | flex | flash | cudnn
    (``model.kernels.attention``, when set, overrides it). ``qk_norm_eps``: an
RMSNorm with a learned gain over each head's query and key before RoPE (Qwen3, OLMoE), with
this epsilon; None: none."""

    kind: str = "attention"
    n_heads: int = 8
    n_kv_heads: int = 4
    head_dim: int | None = None
    window: int | None = None
    backend: str = "sdpa"
    qk_norm_eps: float | None = None

    def resolved_head_dim(self, d_model: int) -> int:
        return self.head_dim or d_model // max(1, self.n_heads)

    def context_parallel_errors(self, prefix: str) -> list[str]:
        return []  # causal, windowed and document masks over the whole sequence (pretrain/parallel/context)

    def problems(self, prefix: str, d_model: int) -> list[str]:
        errors = []
        for name in ("n_heads", "n_kv_heads"):
            if getattr(self, name) <= 0:
                errors.append(f"{prefix}.{name} must be a positive integer, got {getattr(self, name)}")
        if self.backend not in BACKENDS:
            errors.append(f"{prefix}.backend {self.backend!r} is unknown; choose one of {sorted(BACKENDS)}")
        if self.qk_norm_eps is not None and self.qk_norm_eps <= 0:
            errors.append(f"{prefix}.qk_norm_eps must be > 0 (or null for no query/key norm), got {self.qk_norm_eps}")
        if self.window is not None and self.window < 1:
            errors.append(f"{prefix}.window must be >= 1 (or null for full attention), got {self.window}")
        if errors:
            return errors
        if self.n_heads % self.n_kv_heads:
            choices = [k for k in range(1, self.n_heads + 1) if self.n_heads % k == 0]
            errors.append(
                f"{prefix}.n_heads ({self.n_heads}) must be a multiple of {prefix}.n_kv_heads ({self.n_kv_heads}) "
                f"for grouped-query attention; set n_kv_heads to one of {choices}"
            )
        if self.head_dim is None and d_model % self.n_heads:
            errors.append(
                f"model.d_model ({d_model}) must be divisible by {prefix}.n_heads ({self.n_heads}), or set "
                f"{prefix}.head_dim; e.g. d_model={d_model // self.n_heads * self.n_heads or self.n_heads}"
            )
        elif self.resolved_head_dim(d_model) % 2 or self.resolved_head_dim(d_model) <= 0:
            errors.append(
                f"the head dimension ({self.resolved_head_dim(d_model)}) must be even and positive for rotary "
                f"embeddings; change model.d_model, {prefix}.n_heads or {prefix}.head_dim"
            )
        return errors

    def tp_sizes(self, prefix: str, d_model: int) -> dict[str, int]:
        return {f"{prefix}.n_heads": self.n_heads, f"{prefix}.n_kv_heads": self.n_kv_heads}

    def decode_state_bytes(self, d_model: int, batch: int, length: int, element_bytes: int) -> int:
        """K and V of every position (caches sized for ``length``), or of the last W − 1 with a
        window W < length."""
        per_position = 2 * self.n_kv_heads * self.resolved_head_dim(d_model) * element_bytes * batch
        return per_position * (length if self.window is None or self.window >= length else self.window - 1)


class Attention(nn.Module):
    kernel_slot = "rope"  # model.kernels.rope chooses ``kernel``, the RoPE implementation (models/kernels.py)

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        backend: str,
        layer_id: int,
        window: int | None = None,
        qk_norm_eps: float | None = None,
    ):
        super().__init__()
        self.head_dim = head_dim
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.layer_id = layer_id
        self.window = window
        self.kernel = "torch"
        self.backend = get_backend(backend)
        self.wq = Linear(d_model, n_heads * head_dim)
        self.wk = Linear(d_model, n_kv_heads * head_dim)
        self.wv = Linear(d_model, n_kv_heads * head_dim)
        self.wo = Linear(n_heads * head_dim, d_model)
        # Per-head query/key norms: no tensor-parallel plan (their gains would need gradients
        # summed over the head shards), so tensor parallelism refuses them by name.
        self.q_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.k_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None

    @property
    def attention_key(self) -> tuple:
        return (self.backend.name, self.window)

    def init_weights(self, init_std: float, out_std: float) -> None:
        for linear in (self.wq, self.wk, self.wv):
            nn.init.normal_(linear.weight, std=init_std)
        nn.init.normal_(self.wo.weight, std=out_std)
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.reset_parameters()

    def tp_plan(self) -> dict:
        return {"wq": Colwise(), "wk": Colwise(), "wv": Colwise(), "wo": Rowwise()}

    def core_flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs of q·kᵀ and probabilities·v per token (the projections are counted as
        linear layers): 4·H·D per visible key, with the mean number of visible keys counted
        as S/2 (causal) or W − W²/(2S) (a window W < S), the usual convention."""
        keys = seq_len / 2 if self.window is None or self.window >= seq_len else self.window - self.window**2 / (
            2 * seq_len
        )
        return round(4 * self.n_heads * self.head_dim * keys)

    def new_state(self, batch: int, max_len: int, dtype: torch.dtype, device) -> KVCache | WindowKVCache:
        if self.window is not None and self.window < max_len:
            return WindowKVCache(self.window)
        return KVCache(batch, self.n_kv_heads, self.head_dim, max_len, dtype, device)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, -1, self.head_dim)
        k = self.wk(x).view(batch, seq, -1, self.head_dim)
        v = self.wv(x).view(batch, seq, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = ctx.rope[self.head_dim]
        q, k = rotate_qk(q, k, cos, sin, self.kernel)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if ctx.state is not None:
            k, v = ctx.state.layers[self.layer_id].append(k, v)
        out = self.backend.attend(q, k, v, ctx.attention[self.attention_key])
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


def prepare_self_attention(
    mixers: Iterable[nn.Module], q_len: int, past: int, segments: torch.Tensor | None, device
) -> dict:
    """Causal self-attention specs of every distinct ``attention_key`` among ``mixers``
    (other modules are skipped), prepared by their backends: the context's ``attention``.
    ``past`` positions precede the ``q_len`` new ones; ``segments`` [B, Sk] are document ids."""
    prepared = {}
    for mixer in mixers:
        key = getattr(mixer, "attention_key", None)
        if key is None or key in prepared:
            continue
        window = mixer.window
        kept = past if window is None else min(past, window - 1)  # what the layer's cache returns
        spec = AttentionSpec(causal=True, window=window, segments=segments)
        prepared[key] = mixer.backend.prepare(spec, q_len, kept + q_len, device)
    return prepared


def _build(config: AttentionConfig, d_model: int, layer_id: int) -> Attention:
    return Attention(
        d_model, config.n_heads, config.n_kv_heads, config.resolved_head_dim(d_model), config.backend, layer_id,
        config.window, config.qk_norm_eps,
    )


register_mixer("attention", AttentionConfig, _build)
