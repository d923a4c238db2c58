"""Per-forward inputs shared by the blocks of a model, and the decode state of a generation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


class DecodeState:
    """Generation state: one entry per stateful mixer (a KV cache, a window cache, a recurrent
    state, a static cross-attention KV), keyed by the mixer's ``layer_id``, plus the number of
    positions already processed. The family advances ``length`` after each forward.

    ``prefill`` is set by the caller while it feeds a prompt (in one or several chunks): only
    each forward's last position's logits are needed, so a family may compute just those (YOCO's
    early exit). Otherwise every position's logits are returned (speculative verification)."""

    def __init__(self, layers: dict[Any, Any], max_len: int):
        self.layers = layers
        self.max_len = max_len
        self.length = 0
        self.prefill = False

    def advance(self, n: int) -> None:
        self.length += n

    def rewind(self, n: int) -> None:
        """Forget the last ``n`` positions in every layer (layers whose state cannot: ValueError)."""
        for state in self.layers.values():
            state.rewind(n)
        self.length -= n

    def nbytes(self) -> int:
        """Bytes held by the layers' states (what a cache-size formula is checked against)."""
        return sum(state.nbytes() for state in self.layers.values())


@dataclass(frozen=True)
class ForwardContext:
    """What every block of one forward shares, computed once before the first block:

    - ``rope``: rotary tables ``(cos, sin)`` [B, S, head_dim] by head dimension;
    - ``attention``: each attention spec, prepared by its backend, keyed by the mixers'
      ``attention_key`` (models/attention/layer.py);
    - ``segments``: document ids [B, S] of packed rows (for mixers that must not carry state
      across documents), or None;
    - ``state``: the decode state when generating, else None;
    - ``token_ids``: the input token ids [B, S] where the model embedded them (its first
      pipeline stage), else None (routers that map token ids to experts read them);
    - ``shared_kv``: keys and values [B, Hkv, Sk, D] that several layers attend to (YOCO's one
      global K,V for its cross-decoder), or None.
    """

    rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    attention: dict[Any, Any] = field(default_factory=dict)
    segments: torch.Tensor | None = None
    state: DecodeState | None = None
    token_ids: torch.Tensor | None = None
    shared_kv: tuple[torch.Tensor, torch.Tensor] | None = None


def forward_positions(
    h: torch.Tensor, max_seq_len: int, position_ids: torch.Tensor | None, doc_ids: torch.Tensor | None,
    state: DecodeState | None,
) -> tuple[int, torch.Tensor]:
    """(positions already in ``state``, the position ids [B, S] of hidden states ``h`` [B, S, d])
    for a language model's forward: positions default to the ones after the state's; raises on a
    sequence beyond ``max_seq_len`` and on document ids with a decode state."""
    batch, seq = h.shape[:2]
    past = state.length if state is not None else 0
    if past + seq > max_seq_len:
        raise ValueError(f"sequence of {past + seq} positions exceeds model.max_seq_len={max_seq_len}")
    if doc_ids is not None and state is not None:
        raise ValueError("doc_ids with a decode state are not supported: decode one document per row")
    if position_ids is None:
        position_ids = torch.arange(past, past + seq, device=h.device).expand(batch, seq)
    return past, position_ids
