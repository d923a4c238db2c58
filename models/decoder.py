"""Decoder-only language model (the ``decoder`` family): embed → blocks → RMSNorm → head.

Parameter names (stable; pipeline stages keep them): ``embed.weight``,
``layers.<i>.{mixer_norm,mixer,ffn_norm,ffn}.*``, ``norm.weight``, ``head.weight``. With
``tie_embeddings`` the head shares the embedding's Parameter (``head.weight is embed.weight``).

Pipeline stages are this same module with parts removed: set ``embed`` to None and the stage
takes hidden states [B, S, d] instead of token ids; set ``norm``/``head`` to None and it returns
hidden states; delete entries of ``layers`` and the others keep their keys.

Init (``init_weights``, also the way to initialise a model built on the meta device after
``to_empty``, whose new Parameters it re-ties first): embedding, untied head and q/k/v/w1/w3
~ N(0, init_std); the residual-stream output projections (attention ``wo``, FFN ``w2``)
~ N(0, init_std/√(2·n_layers)) so the residual's variance does not grow with depth; RMSNorm
gains = 1.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from models.block import Block
from models.context import ForwardContext
from models.factories import build_ffn, build_mixer
from models.kv_cache import KVCache
from models.linear import Linear
from models.norm import RMSNorm
from models.rope import rope_tables


class Decoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        config.validate()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleDict(
            {
                str(i): Block(build_mixer(config, i), build_ffn(config, i), config.d_model, config.norm_eps)
                for i in range(config.n_layers)
            }
        )
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.head = Linear(config.d_model, config.vocab_size)
        self.init_weights()

    def tie_weights(self) -> None:
        """Make ``head.weight`` the embedding's Parameter when ``tie_embeddings`` (and both exist).
        ``to_empty`` and other Parameter-replacing conversions undo the sharing; ``init_weights``
        calls this first."""
        if self.config.tie_embeddings and self.embed is not None and self.head is not None:
            self.head.weight = self.embed.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        self.tie_weights()
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        if self.embed is not None:
            nn.init.normal_(self.embed.weight, std=std)
        for block in self.layers.values():
            block.init_weights(std, out_std)
        if self.norm is not None:
            self.norm.reset_parameters()
        if self.head is not None and not self.config.tie_embeddings:
            nn.init.normal_(self.head.weight, std=std)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Logits [B, S, vocab] in the head's dtype (the model's dtype; fp32 for an fp32 model).

        ``input_ids`` [B, S] (or hidden states [B, S, d] when ``embed`` is None).
        ``position_ids`` [B, S] default to 0..S-1 after the cache's length; packed data passes
        positions restarting at each document. ``doc_ids`` [B, S] restrict attention to
        positions of the same document. ``kv_cache``: positions already cached precede these
        S tokens; the cache is extended by S.
        """
        h = self.embed(input_ids) if self.embed is not None else input_ids
        batch, seq = h.shape[:2]
        past = kv_cache.length if kv_cache is not None else 0
        if past + seq > self.config.max_seq_len:
            raise ValueError(f"sequence of {past + seq} positions exceeds model.max_seq_len={self.config.max_seq_len}")
        if doc_ids is not None and kv_cache is not None:
            raise ValueError("doc_ids with a kv_cache are not supported: decode one document per row")
        if position_ids is None:
            position_ids = torch.arange(past, past + seq, device=h.device).expand(batch, seq)
        cos, sin = rope_tables(position_ids, self.config.head_dim, self.config.rope_theta, h.dtype)
        ctx = ForwardContext(cos, sin, doc_ids, q_len=seq, kv_len=past + seq, kv_cache=kv_cache)
        for block in self.layers.values():
            h = block(h, ctx)
        if kv_cache is not None:
            kv_cache.advance(seq)
        if self.norm is not None:
            h = self.norm(h)
        if self.head is not None:
            h = self.head(h)
        return h
