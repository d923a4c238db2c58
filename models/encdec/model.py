"""T5-style encoder-decoder (the ``encdec`` family): embed → encoder blocks → RMSNorm = memory;
embed → decoder blocks (self-attention, cross-attention to the memory, FFN) → RMSNorm → head.

Parameter names (stable; pipeline stages keep them): ``embed.weight`` (shared by both stacks),
``encoder_bias.table.weight`` and ``decoder_bias.table.weight`` (relative position bias tables
[buckets, heads], with ``position: relative``), ``encoder.<i>.{mixer_norm,mixer,ffn_norm,ffn}.*``,
``encoder_norm.weight``, ``decoder.<i>.{mixer_norm,mixer,cross_norm,cross,ffn_norm,ffn}.*``,
``decoder_norm.weight``, ``head.weight`` (the embedding's Parameter with ``tie_embeddings``; the
decoder output is then scaled by d_model^-½ first, as T5).

The relative bias is computed once per forward for the row's indices, [1, heads, Sq, Sk]: inside
one packed example the offset of two row indices is the offset of their positions, and pairs
from different examples are masked. Batches of packed examples pass positions that restart at 0
per example (for RoPE) and segment ids
(``doc_ids`` for the encoder, ``decoder_doc_ids`` for the decoder; equal ids = one example):
self-attention stays inside an example and cross-attention reaches only the same example's
encoder positions, so each example's output equals the example run alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.attention.backends import get_backend

from models.attention.spec import AttentionSpec
from models.context import DecodeState
from models.encdec.attention import family_backend
from models.encdec.layers import DecoderBlock, EncDecContext, EncoderBlock, MemoryInput, T5Attention
from models.encdec.position import RelativeBias, relative_bucket
from models.kernels import apply_kernels
from models.linear import Linear
from models.norm import RMSNorm
from models.plans import Tokenwise, VocabEmbedding, VocabHead
from models.rope import rope_tables
from models.spec import build_ffn


def _positions(positions: torch.Tensor | None, batch: int, start: int, length: int, device) -> torch.Tensor:
    if positions is not None:
        return positions
    return torch.arange(start, start + length, device=device).expand(batch, length)


class EncoderDecoder(nn.Module):
    seq2seq = True  # generation answers an input (``generate``) rather than continuing a prompt

    def __init__(self, config):
        super().__init__()
        self.config = config
        d, heads, head_dim = config.d_model, config.n_heads, config.resolved_head_dim
        n_enc = config.encoder_layers
        ffns = config.layers().ffns
        self.embed = nn.Embedding(config.vocab_size, d)
        relative = config.position == "relative"
        buckets, distance = config.relative_buckets, config.relative_max_distance
        self.encoder_bias = RelativeBias(buckets, distance, heads, bidirectional=True) if relative else None
        self.encoder = nn.ModuleDict({
            str(i): EncoderBlock(
                T5Attention(d, heads, head_dim, config.backend, "encoder", i), build_ffn(ffns[i], d, i), d,
                config.norm_eps,
            )
            for i in range(n_enc)
        })
        self.encoder_norm = RMSNorm(d, config.norm_eps)
        self.memory_input = MemoryInput()
        self.decoder_bias = RelativeBias(buckets, distance, heads, bidirectional=False) if relative else None
        self.decoder = nn.ModuleDict({
            str(i): DecoderBlock(
                T5Attention(d, heads, head_dim, config.backend, "decoder", i),
                T5Attention(d, heads, head_dim, config.backend, "cross", i),
                build_ffn(ffns[n_enc + i], d, n_enc + i), d, config.norm_eps,
            )
            for i in range(config.decoder_layers)
        })
        self.decoder_norm = RMSNorm(d, config.norm_eps)
        self.head = Linear(d, config.vocab_size)
        apply_kernels(self, config.kernels)
        for block in [*self.encoder.values(), *self.decoder.values()]:
            for attention in block.attentions():
                attention.backend = family_backend(attention.backend)
        self.init_weights()

    # ------------------------------------------------------------ structure
    def block_names(self) -> list[str]:
        return [f"encoder.{k}" for k in self.encoder] + [f"decoder.{k}" for k in self.decoder]

    def pipeline_units(self) -> list[tuple[str, ...]]:
        """One unit per block; the first also holds the embedding (both stacks embed on the first
        stage) and the bias tables, the last encoder block the encoder's norm, the last decoder
        block the decoder's norm and the head."""
        units = [(name,) for name in self.block_names()]
        n_enc = self.config.encoder_layers
        tables = ("encoder_bias", "decoder_bias") if self.config.position == "relative" else ()
        units[0] = ("embed", *tables, *units[0])
        units[n_enc - 1] = (*units[n_enc - 1], "encoder_norm")
        units[-1] = (*units[-1], "decoder_norm", "head")
        return units

    def tp_plan(self) -> dict:
        return {"embed": VocabEmbedding(), "encoder_norm": Tokenwise(), "decoder_norm": Tokenwise(),
                "head": VocabHead()}

    def tie_weights(self) -> None:
        if self.config.tie_embeddings and self.embed is not None and self.head is not None:
            self.head.weight = self.embed.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """T5's init (factor f): embedding ~ N(0, f), attention as ``T5Attention.init_weights``,
        FFN inputs ~ N(0, f/√d) and outputs ~ N(0, f/√d_ff), bias tables ~ N(0, f/√d); the untied
        head ~ N(0, f/√d) (unit-variance logits at init); norm gains 1."""
        self.tie_weights()
        config, factor = self.config, self.config.init_factor
        d = config.d_model
        d_ff = getattr(config.ffn, "d_ff", d)
        if self.embed is not None:
            nn.init.normal_(self.embed.weight, std=factor)
        for bias in (self.encoder_bias, self.decoder_bias):
            if bias is not None:
                bias.reset_parameters(factor * d**-0.5)
        for block in [*self.encoder.values(), *self.decoder.values()]:
            block.init_weights(factor, d, d_ff)
        for norm in (self.encoder_norm, self.decoder_norm):
            if norm is not None:
                norm.reset_parameters()
        if self.head is not None and not config.tie_embeddings:
            nn.init.normal_(self.head.weight, std=factor * d**-0.5)

    # ----------------------------------------------------------- generation
    def new_decode_state(self, batch: int, max_len: int, dtype: torch.dtype, device) -> DecodeState:
        """Per decoder layer a growing self-attention cache and a static cross-attention cache."""
        if max_len > self.config.max_target_len:
            raise ValueError(f"generating {max_len} positions exceeds model.max_target_len={self.config.max_target_len}")
        layers = {}
        for block in self.decoder.values():
            for attention in block.attentions():
                layers[attention.state_key] = attention.new_state(batch, max_len, dtype, device)
        return DecodeState(layers, max_len)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **options) -> torch.Tensor:
        """Decoder tokens [B, 1 + n] answering encoder inputs [B, Se] (models/encdec/generate.py)."""
        from models.encdec.generate import generate

        return generate(self, input_ids, max_new_tokens, **options)

    # -------------------------------------------------------------- forward
    def _attention(self, role: str, spec: AttentionSpec, q_len: int, kv_len: int, device) -> dict:
        backend = family_backend(get_backend(self.config.attention_backend))
        return {(role, backend.name): backend.prepare(spec, q_len, kv_len, device)}

    def _rope(self, positions: torch.Tensor, dtype) -> dict:
        if self.config.position != "rope":
            return {}
        head_dim = self.config.resolved_head_dim
        return {head_dim: rope_tables(positions, head_dim, self.config.rope_theta, dtype)}

    def _bias(self, module: RelativeBias | None, table: torch.Tensor | None, bidirectional: bool, q_pos, k_pos):
        """The relative bias from this stage's table module, or from a table received from the
        first pipeline stage (None without relative positions)."""
        if module is not None:
            return module(q_pos, k_pos)
        if table is None:
            return None
        buckets = relative_bucket(
            k_pos[:, None, :] - q_pos[:, :, None], bidirectional, self.config.relative_buckets,
            self.config.relative_max_distance,
        )
        return F.embedding(buckets, table).permute(0, 3, 1, 2)

    def _encoder_blocks(self, h, position_ids, doc_ids, table, token_ids) -> torch.Tensor:
        batch, seq = h.shape[:2]
        if seq > self.config.max_seq_len:
            raise ValueError(f"encoder input of {seq} positions exceeds model.max_seq_len={self.config.max_seq_len}")
        positions = _positions(position_ids, batch, 0, seq, h.device)
        offsets = _positions(None, 1, 0, seq, h.device)
        bias = self._bias(self.encoder_bias, table, True, offsets, offsets)
        spec = AttentionSpec(causal=False, scale=self.config.attention_scale, bias=bias, segments=doc_ids)
        ctx = EncDecContext(
            rope=self._rope(positions, h.dtype), attention=self._attention("encoder", spec, seq, seq, h.device),
            segments=doc_ids, token_ids=token_ids,
        )
        for block in self.encoder.values():
            h = block(h, ctx)
        return h

    def _decoder_blocks(
        self, h, memory, decoder_input_ids, position_ids, decoder_doc_ids, doc_ids, table, state
    ) -> torch.Tensor:
        if (doc_ids is None) != (decoder_doc_ids is None):
            raise ValueError("packed batches need both doc_ids (encoder) and decoder_doc_ids, or neither")
        if state is not None and doc_ids is not None:
            raise ValueError("segment ids with a decode state are not supported: decode one example per row")
        if self.memory_input is not None:
            memory = self.memory_input(memory)
        batch, seq = h.shape[:2]
        past = state.length if state is not None else 0
        if past + seq > self.config.max_target_len:
            raise ValueError(
                f"decoder input of {past + seq} positions exceeds model.max_target_len={self.config.max_target_len}"
            )
        positions = _positions(position_ids, batch, past, seq, h.device)
        queries, keys = _positions(None, 1, past, seq, h.device), _positions(None, 1, 0, past + seq, h.device)
        bias = self._bias(self.decoder_bias, table, False, queries, keys)
        scale = self.config.attention_scale
        self_spec = AttentionSpec(causal=True, scale=scale, bias=bias, segments=decoder_doc_ids)
        cross = AttentionSpec(causal=False, scale=scale, q_segments=decoder_doc_ids, k_segments=doc_ids)
        attention = self._attention("decoder", self_spec, seq, past + seq, h.device)
        attention.update(self._attention("cross", cross, seq, memory.shape[1], h.device))
        ctx = EncDecContext(
            rope=self._rope(positions, h.dtype), attention=attention, segments=decoder_doc_ids, state=state,
            token_ids=decoder_input_ids, memory=memory,
        )
        for block in self.decoder.values():
            h = block(h, ctx)
        if state is not None:
            state.advance(seq)
        return h

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        h = self.decoder_norm(h)
        if self.config.tie_embeddings:
            h = h * self.config.d_model**-0.5
        return self.head(h)

    def encode(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The memory [B, Se, d]: encoder output after its final norm."""
        h = self._encoder_blocks(self.embed(input_ids), position_ids, doc_ids, None, input_ids)
        return self.encoder_norm(h)

    def decode(
        self, decoder_input_ids: torch.Tensor, memory: torch.Tensor, decoder_position_ids: torch.Tensor | None = None,
        decoder_doc_ids: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None,
        state: DecodeState | None = None,
    ) -> torch.Tensor:
        """Logits [B, Sd, vocab] of the decoder over ``memory``. ``doc_ids`` are the encoder's
        segment ids (for cross-attention; with ``decoder_doc_ids``)."""
        h = self._decoder_blocks(
            self.embed(decoder_input_ids), memory, decoder_input_ids, decoder_position_ids, decoder_doc_ids, doc_ids,
            None, state,
        )
        return self._head(h)

    def _tables(self) -> tuple:
        """The bias tables the first pipeline stage sends on: copies (a schedule may free what
        crosses a boundary in place) of this rank's part — its heads' columns under tensor
        parallelism, whose gradients flow back into the sharded table."""
        tables = []
        for bias in (self.encoder_bias, self.decoder_bias):
            if bias is not None:
                weight = bias.table.weight
                tables.append((weight.to_local() if hasattr(weight, "to_local") else weight).clone())
        return tuple(tables)

    @property
    def boundary_residual(self) -> tuple[bool, ...] | None:
        """Which inputs of a pipeline stage after the first are residual streams (sequence-
        sharded under SP): the encoder and decoder states, not the bias tables."""
        if self.embed is not None or self.config.position != "relative":
            return None
        return (True, True, False, False)

    def forward(
        self,
        input_ids: torch.Tensor,
        *carried: torch.Tensor,
        decoder_input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        decoder_position_ids: torch.Tensor | None = None,
        decoder_doc_ids: torch.Tensor | None = None,
    ):
        """Logits [B, Sd, vocab] for encoder inputs [B, Se] and ``decoder_input_ids`` [B, Sd].

        A pipeline stage (modules of other stages removed) returns, until the head, the tuple
        (encoder hidden states — the memory once the encoder is done —, decoder hidden states,
        then the relative bias tables of the encoder and the decoder): the first stage embeds
        both inputs and holds the tables; later stages take that tuple positionally."""
        if self.embed is not None:
            h, dec = self.embed(input_ids), self.embed(decoder_input_ids)
            tables = (None, None)
        else:
            h, dec, *received = (input_ids, *carried)
            tables = tuple(received) if received else (None, None)
        if self.encoder or self.encoder_norm is not None:
            token_ids = input_ids if self.embed is not None else None
            h = self._encoder_blocks(h, position_ids, doc_ids, tables[0], token_ids)
            if self.encoder_norm is not None:
                h = self.encoder_norm(h)
        if self.decoder:  # stages are contiguous: the encoder is done here, h is the memory
            dec = self._decoder_blocks(
                dec, h, decoder_input_ids, decoder_position_ids, decoder_doc_ids, doc_ids, tables[1], None
            )
        if self.head is not None:
            return self._head(dec)
        sent = self._tables() if self.embed is not None else tuple(t for t in tables if t is not None)
        return (h.contiguous(), dec.contiguous(), *sent)
