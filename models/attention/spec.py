"""The attention spec: which keys each query may see, the softmax scale and an additive bias,
built once per forward by the model family and handed to every attention layer.

Every backend computes ``softmax(scale · q·kᵀ + bias + mask) · v`` for

    q [B, H, Sq, D], k and v [B, Hkv, Sk, D]  →  [B, H, Sq, D]     (H a multiple of Hkv: GQA)

Queries and keys are aligned bottom-right: query i sits at position ``i + Sk − Sq`` of the key
axis (Sq = Sk in training; Sq < Sk when decoding after a cache; for cross-attention the two
sequences are unrelated and ``causal`` is False). Query i may see key j when all of these hold:

- ``causal``: ``j ≤ i + Sk − Sq``;
- ``window`` W: ``|i + Sk − Sq − j| < W`` (causal: the W keys ending at the query, itself
  included);
- ``segments`` [B, Sk] (self-attention over packed documents): ``segments[b, j] ==
  segments[b, i + Sk − Sq]``;
- ``q_segments`` [B, Sq] and ``k_segments`` [B, Sk] (cross-attention, padding): equal ids.

``bias`` [B or 1, H or 1, Sq, Sk] is added to the scaled scores (T5's relative position bias;
it may require a gradient). ``scale`` None means 1/√D. A query that sees no key at all (possible
only with ``q_segments``) gets a zero output, never NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class AttentionSpecError(ValueError):
    """A backend cannot compute this attention spec; the message names the backend to use."""


@dataclass(frozen=True)
class AttentionSpec:
    causal: bool = True
    window: int | None = None
    scale: float | None = None
    bias: torch.Tensor | None = None
    segments: torch.Tensor | None = None
    q_segments: torch.Tensor | None = None
    k_segments: torch.Tensor | None = None

    def __post_init__(self):
        if (self.q_segments is None) != (self.k_segments is None):
            raise AttentionSpecError("q_segments and k_segments go together (cross-attention); give both or neither")
        if self.segments is not None and self.q_segments is not None:
            raise AttentionSpecError("give segments (self-attention) or q_segments/k_segments (cross), not both")
        if self.window is not None and self.window < 1:
            raise AttentionSpecError(f"an attention window must be >= 1, got {self.window}")

    def softmax_scale(self, head_dim: int) -> float:
        return head_dim**-0.5 if self.scale is None else self.scale

    @property
    def may_have_empty_rows(self) -> bool:
        return self.q_segments is not None

    def describe(self) -> str:
        parts = ["causal" if self.causal else "bidirectional"]
        if self.window is not None:
            parts.append(f"window {self.window}")
        if self.scale is not None:
            parts.append(f"scale {self.scale:g}")
        if self.bias is not None:
            parts.append("additive bias")
        if self.segments is not None:
            parts.append("segments")
        if self.q_segments is not None:
            parts.append("query/key segments")
        return ", ".join(parts)


def dense_mask(spec: AttentionSpec, q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """Boolean mask, True = may attend: [1, 1, Sq, Sk] without segments, else [B, 1, Sq, Sk]."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    if spec.causal:
        mask = mask & (k_pos <= q_pos)
    if spec.window is not None:
        mask = mask & ((q_pos - k_pos).abs() < spec.window)
    mask = mask[None, None]
    if spec.segments is not None:
        same = spec.segments[:, -q_len:, None] == spec.segments[:, None, :]
        mask = mask & same[:, None]
    if spec.q_segments is not None:
        same = spec.q_segments[:, :, None] == spec.k_segments[:, None, :]
        mask = mask & same[:, None]
    return mask
