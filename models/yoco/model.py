"""YOCO decoder-decoder (the ``yoco`` family): embed → self-decoder blocks (sliding-window
attention) → one global K,V → cross-decoder blocks (attention to that K,V only) → RMSNorm → head.

Parameter names: ``embed.weight``, ``self_layers.<i>.*`` and ``cross_layers.<i>.*`` (pre-norm
blocks: ``mixer_norm``, ``mixer``, ``ffn_norm``, ``ffn``; cross mixers hold only ``wq``, ``wo``),
``kv_norm.weight``, ``kv.wk.weight``, ``kv.wv.weight`` (the one K/V projection pair),
``norm.weight``, ``head.weight``.

The global K,V: K = RoPE(RMSNorm(X)·W_K), V = RMSNorm(X)·W_V from the self-decoder's output X,
with GQA heads (``cross.n_kv_heads``); the cross-decoder's residual stream starts at X and each
cross block attends causally (document-masked) to K,V with its own queries.

Generation (``state``): the self-decoder keeps a constant-size state per layer (a window cache
or a retention state), the model one growing cache of the global K,V. A forward that feeds a
prompt chunk (``state.prefill``) runs the cross-decoder for the chunk's last position only —
early exit: the prompt's other positions need only the self-decoder and the K,V projection —
and returns [B, 1, vocab].
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from models.attention.backends import get_backend
from models.attention.cache import KVCache
from models.attention.layer import prepare_self_attention
from models.attention.spec import AttentionSpec
from models.block import Block
from models.context import DecodeState, ForwardContext, forward_positions
from models.kernels import apply_kernels, head_loss
from models.linear import Linear
from models.norm import RMSNorm
from models.plans import Colwise, GatherInputs, Rowwise, Tokenwise, VocabEmbedding, VocabHead
from models.rope import rope_tables, rotate
from models.spec import LossSettings, build_ffn, build_mixer

GLOBAL_KV = "global_kv"  # the decode state's key of the global K,V cache


class CrossAttention(nn.Module):
    """Queries of this block against the shared K,V of the forward context (no K/V weights)."""

    kernel_slot = "rope"  # model.kernels.rope chooses ``kernel``, the query RoPE (models/kernels.py)

    def __init__(self, d_model: int, n_heads: int, head_dim: int, backend: str):
        super().__init__()
        self.head_dim, self.n_heads, self.window = head_dim, n_heads, None
        self.kernel = "torch"
        self.backend = get_backend(backend)
        self.wq = Linear(d_model, n_heads * head_dim)
        self.wo = Linear(n_heads * head_dim, d_model)

    @property
    def attention_key(self) -> tuple:
        return ("cross", self.backend.name)

    def init_weights(self, init_std: float, out_std: float) -> None:
        nn.init.normal_(self.wq.weight, std=init_std)
        nn.init.normal_(self.wo.weight, std=out_std)

    def tp_plan(self) -> dict:
        return {"wq": Colwise(), "wo": Rowwise()}

    def core_flops_per_token(self, seq_len: int) -> int:
        """q·kᵀ and probabilities·v over S/2 keys per query on average (causal)."""
        return round(4 * self.n_heads * self.head_dim * seq_len / 2)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, -1, self.head_dim)
        cos, sin = ctx.rope[self.head_dim]
        q = rotate(q, cos, sin, self.kernel).transpose(1, 2)
        k, v = ctx.shared_kv
        out = self.backend.attend(q, k, v, ctx.attention[self.attention_key])
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


class GlobalKV(nn.Module):
    """The one K/V projection pair: [B, Hkv, S, D] keys (with RoPE) and values."""

    kernel_slot = "rope"  # model.kernels.rope chooses ``kernel``, the key RoPE (models/kernels.py)

    def __init__(self, d_model: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        self.kernel = "torch"
        self.wk = Linear(d_model, n_kv_heads * head_dim)
        self.wv = Linear(d_model, n_kv_heads * head_dim)

    def tp_plan(self) -> dict:
        return {"": GatherInputs((True, False, False)), "wk": Colwise(), "wv": Colwise()}

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, seq, _ = x.shape
        k = rotate(self.wk(x).view(batch, seq, -1, self.head_dim), cos, sin, self.kernel)
        v = self.wv(x).view(batch, seq, -1, self.head_dim)
        return k.transpose(1, 2), v.transpose(1, 2)


class Yoco(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        d, n_self = config.d_model, config.n_self
        ffns = config.layers().ffns
        self.head_dim = d // config.cross.n_heads
        self.embed = nn.Embedding(config.vocab_size, d)
        self.self_layers = nn.ModuleDict({
            str(i): Block(build_mixer(config.mixer, d, i), build_ffn(ffns[i], d, i), d, config.norm_eps)
            for i in range(n_self)
        })
        self.kv_norm = RMSNorm(d, config.norm_eps)
        self.kv = GlobalKV(d, config.cross.n_kv_heads, self.head_dim)
        self.cross_layers = nn.ModuleDict({
            str(i): Block(CrossAttention(d, config.cross.n_heads, self.head_dim, config.cross.backend),
                          build_ffn(ffns[i], d, i), d, config.norm_eps)
            for i in range(n_self, config.n_layers)
        })
        self.norm = RMSNorm(d, config.norm_eps)
        self.head = Linear(d, config.vocab_size)
        self.loss_settings = LossSettings()  # the trainer's, set by the runner (fused loss head)
        apply_kernels(self, config.kernels)
        self.init_weights()

    @property
    def fused_loss(self) -> bool:
        """Whether a forward with labels returns per-token loss contributions (models/kernels.py)."""
        return self.config.kernels.fused_loss

    # ------------------------------------------------------------ structure
    def block_names(self) -> list[str]:
        return [f"self_layers.{k}" for k in self.self_layers] + [f"cross_layers.{k}" for k in self.cross_layers]

    def pipeline_units(self) -> list[tuple[str, ...]]:
        units = [(name,) for name in self.block_names()]
        units[0] = ("embed", *units[0])
        units[self.config.n_self - 1] = (*units[self.config.n_self - 1], "kv_norm", "kv")
        units[-1] = (*units[-1], "norm", "head")
        return units

    def tp_plan(self) -> dict:
        return {"embed": VocabEmbedding(), "kv_norm": Tokenwise(), "norm": Tokenwise(), "head": VocabHead()}

    def tie_weights(self) -> None:
        if self.config.tie_embeddings and self.embed is not None and self.head is not None:
            self.head.weight = self.embed.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        self.tie_weights()
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        if self.embed is not None:
            nn.init.normal_(self.embed.weight, std=std)
        for block in [*self.self_layers.values(), *self.cross_layers.values()]:
            block.init_weights(std, out_std)
        if self.kv is not None:
            self.kv_norm.reset_parameters()
            nn.init.normal_(self.kv.wk.weight, std=std)
            nn.init.normal_(self.kv.wv.weight, std=std)
        if self.norm is not None:
            self.norm.reset_parameters()
        if self.head is not None and not self.config.tie_embeddings:
            nn.init.normal_(self.head.weight, std=std)

    # ----------------------------------------------------------- generation
    def new_decode_state(self, batch: int, max_len: int, dtype: torch.dtype, device) -> DecodeState:
        if max_len > self.config.max_seq_len:
            raise ValueError(f"generating {max_len} positions exceeds model.max_seq_len={self.config.max_seq_len}")
        layers = {b.mixer.layer_id: b.mixer.new_state(batch, max_len, dtype, device) for b in self.self_layers.values()}
        layers[GLOBAL_KV] = KVCache(batch, self.config.cross.n_kv_heads, self.head_dim, max_len, dtype, device)
        return DecodeState(layers, max_len)

    @property
    def boundary_residual(self) -> tuple[bool, ...] | None:
        """Which inputs of a pipeline stage are the residual stream (sequence-sharded under SP):
        a stage that starts in the cross-decoder receives (hidden, K, V)."""
        return (True, False, False) if self.embed is None and self.kv is None else None

    # -------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor,
        k: torch.Tensor | None = None,
        v: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        state: DecodeState | None = None,
        token_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
    ):
        """Logits [B, S, vocab] (a prompt chunk with ``state.prefill``: [B, 1, vocab], see the
        module doc); with ``labels`` (and ``loss_mask``) [B, S] and a fused loss head
        (``model.kernels.loss``), per-token loss contributions [B, S, 3] instead
        (models/fused_loss.py).

        A pipeline stage (modules of other stages removed) takes what the previous one returned:
        hidden states [B, S, d] while inside the self-decoder, then (hidden, K, V); it returns
        the same until the head. ``token_ids``: for FFN routers that read them (default
        ``input_ids`` where this module embeds them)."""
        h = self.embed(input_ids) if self.embed is not None else input_ids
        batch, seq = h.shape[:2]
        past, position_ids = forward_positions(h, self.config.max_seq_len, position_ids, doc_ids, state)
        mixers = [block.mixer for block in self.self_layers.values()]
        head_dims = {m.head_dim for m in mixers} | {self.head_dim}
        theta, interpolation = self.config.rope_theta, self.config.rope_interpolation
        rope = {d: rope_tables(position_ids, d, theta, h.dtype, interpolation) for d in head_dims}
        ctx = ForwardContext(
            rope=rope, attention=prepare_self_attention(mixers, seq, past, doc_ids, h.device), segments=doc_ids,
            state=state, token_ids=token_ids if token_ids is not None or self.embed is None else input_ids,
        )
        for block in self.self_layers.values():
            h = block(h, ctx)
        if self.kv is not None:
            k, v = self.kv(self.kv_norm(h), *rope[self.head_dim])
            if state is not None:
                k, v = state.layers[GLOBAL_KV].append(k, v)
                state.advance(seq)
        if k is None:  # a stage that ends inside the self-decoder
            return h
        if state is not None and state.prefill:  # early exit for all but the chunk's last position
            h = h[:, -1:]
            rope = {d: (cos[:, -1:], sin[:, -1:]) for d, (cos, sin) in rope.items()}
            if ctx.token_ids is not None:
                ctx = dataclasses.replace(ctx, token_ids=ctx.token_ids[:, -1:])
        if self.cross_layers:
            cross = next(iter(self.cross_layers.values())).mixer
            spec = AttentionSpec(causal=True, segments=doc_ids)
            prepared = {cross.attention_key: cross.backend.prepare(spec, h.shape[1], k.shape[2], h.device)}
            ctx = dataclasses.replace(ctx, rope=rope, attention=prepared, shared_kv=(k, v))
            for block in self.cross_layers.values():
                h = block(h, ctx)
        if self.head is None:  # to the next pipeline stage (point-to-point sends need contiguous tensors)
            return h, k.contiguous(), v.contiguous()
        if labels is not None and self.fused_loss:
            return head_loss(self.config.kernels.loss, self.norm(h), self.head.weight, labels, loss_mask,
                             self.loss_settings.z_loss)
        return self.head(self.norm(h))
