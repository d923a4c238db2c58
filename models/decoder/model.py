"""Decoder-only language model (the ``decoder`` family): embed → blocks → RMSNorm → head.

Parameter names (stable; pipeline stages keep them): ``embed.weight``,
``layers.<i>.{mixer_norm,mixer,ffn_norm,ffn}.*``, ``norm.weight``, ``head.weight``. With
``tie_embeddings`` the head shares the embedding's Parameter (``head.weight is embed.weight``).

Pipeline stages are this same module with parts removed (``pipeline_units``): without ``embed``
a stage takes hidden states [B, S, d] instead of token ids; without ``norm``/``head`` it returns
hidden states; blocks of other stages are deleted from ``layers`` and the rest keep their keys.

Init (``init_weights``, also the way to initialise a model built on the meta device after
``to_empty``, whose new Parameters it re-ties first): embedding, untied head and the blocks'
input projections ~ N(0, init_std); the residual-stream output projections (attention ``wo``,
FFN ``w2``) ~ N(0, init_std/√(2·n_layers)) so the residual's variance does not grow with depth;
RMSNorm gains = 1.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from models.attention.layer import prepare_self_attention
from models.block import Block
from models.context import DecodeState, ForwardContext, forward_positions
from models.kernels import apply_kernels, head_loss
from models.linear import Linear
from models.norm import RMSNorm
from models.plans import Tokenwise, VocabEmbedding, VocabHead
from models.rope import rope_tables
from models.spec import LossSettings, build_ffn, build_mixer


class Decoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        layers = config.layers()
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleDict(
            {
                str(i): Block(
                    build_mixer(mixer, config.d_model, i), build_ffn(ffn, config.d_model, i), config.d_model,
                    config.norm_eps,
                )
                for i, (mixer, ffn) in enumerate(zip(layers.mixers, layers.ffns))
            }
        )
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.head = Linear(config.d_model, config.vocab_size)
        self.loss_settings = LossSettings()  # the trainer's, set by the runner (fused loss head)
        apply_kernels(self, config.kernels)
        self.init_weights()

    @property
    def fused_loss(self) -> bool:
        """Whether a forward with labels returns per-token loss contributions (models/kernels.py)."""
        return self.config.kernels.fused_loss

    # ------------------------------------------------------------ structure
    def block_names(self) -> list[str]:
        return [f"layers.{key}" for key in self.layers]

    def pipeline_units(self) -> list[tuple[str, ...]]:
        units = [(name,) for name in self.block_names()]
        units[0] = ("embed", *units[0])
        units[-1] = (*units[-1], "norm", "head")
        return units

    def tp_plan(self) -> dict:
        return {"embed": VocabEmbedding(), "norm": Tokenwise(), "head": VocabHead()}

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

    # ----------------------------------------------------------- generation
    def new_decode_state(self, batch: int, max_len: int, dtype: torch.dtype, device) -> DecodeState:
        if max_len > self.config.max_seq_len:
            raise ValueError(f"generating {max_len} positions exceeds model.max_seq_len={self.config.max_seq_len}")
        mixers = (block.mixer for block in self.layers.values())
        return DecodeState({m.layer_id: m.new_state(batch, max_len, dtype, device) for m in mixers}, max_len)

    # -------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        state: DecodeState | None = None,
        token_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, S, vocab] in the head's dtype (the model's dtype; fp32 for an fp32 model);
        with ``labels`` (and ``loss_mask``) [B, S] and a fused loss head (``model.kernels.loss``),
        per-token loss contributions [B, S, 3] instead (models/fused_loss.py).

        ``input_ids`` [B, S] (or hidden states [B, S, d] when ``embed`` is None).
        ``position_ids`` [B, S] default to 0..S-1 after the state's length; packed data passes
        positions restarting at each document. ``doc_ids`` [B, S] restrict attention to
        positions of the same document. ``state``: a decode state (``new_decode_state``) whose
        positions precede these S tokens; it is extended by S. ``token_ids`` [B, S]: the token
        ids for routers that read them (hash MoE routing), default ``input_ids`` where this
        module embeds them; the spec passes them to every pipeline stage.
        """
        h = self.embed(input_ids) if self.embed is not None else input_ids
        batch, seq = h.shape[:2]
        past, position_ids = forward_positions(h, self.config.max_seq_len, position_ids, doc_ids, state)
        mixers = [block.mixer for block in self.layers.values()]
        head_dims = {m.head_dim for m in mixers if hasattr(m, "head_dim")}
        ctx = ForwardContext(
            rope={
                d: rope_tables(position_ids, d, self.config.rope_theta, h.dtype, self.config.rope_interpolation)
                for d in head_dims
            },
            attention=prepare_self_attention(mixers, seq, past, doc_ids, h.device),
            segments=doc_ids,
            state=state,
            token_ids=token_ids if token_ids is not None or self.embed is None else input_ids,
        )
        for block in self.layers.values():
            h = block(h, ctx)
        if state is not None:
            state.advance(seq)
        if self.norm is not None:
            h = self.norm(h)
        if self.head is not None:
            if labels is not None and self.fused_loss:
                kind, z_loss = self.config.kernels.loss, self.loss_settings.z_loss
                return head_loss(kind, h, self.head.weight, labels, loss_mask, z_loss)
            h = self.head(h)
        return h
