"""T5's relative position bias (Raffel et al. 2020; ../shared/REFERENCES.md §5).

A query at position i and a key at position j get the learned per-head scalar of the bucket of
their offset r = j − i. Buckets (``n`` of them, ``max_distance`` M):

- bidirectional (encoder): half the buckets for r > 0 (offset by n/2), half for r ≤ 0, each
  half over |r|; causal (decoder self-attention): all n over max(−r, 0), so every later key
  (masked anyway) falls in bucket 0;
- within a half of h buckets, distances below h/2 have a bucket each; larger ones are
  log-spaced: h/2 + ⌊log(d / (h/2)) / log(M / (h/2)) · (h − h/2)⌋, capped at h − 1.

Positions come from the batch (they restart at 0 at each packed example), so a row of packed
examples gets the same bias per example as each example alone.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from models.plans import Colwise


def relative_bucket(offset: torch.Tensor, bidirectional: bool, n_buckets: int = 32, max_distance: int = 128) -> torch.Tensor:
    """Bucket ids (int64) of key-minus-query offsets ``offset`` (any shape)."""
    base = torch.zeros_like(offset)
    if bidirectional:
        n_buckets //= 2
        base = (offset > 0).long() * n_buckets
        distance = offset.abs()
    else:
        distance = (-offset).clamp(min=0)
    exact = n_buckets // 2
    scaled = torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    far = (exact + (scaled * (n_buckets - exact)).long()).clamp(max=n_buckets - 1)
    return base + torch.where(distance < exact, distance, far)


class RelativeBias(nn.Module):
    """``table.weight`` [buckets, heads]: the bias table of one stack, shared by its layers. The
    table is an embedding over buckets, so tensor parallelism shards it over heads like the
    attention projections (``Colwise``: each rank looks up its own heads' biases)."""

    def __init__(self, n_buckets: int, max_distance: int, n_heads: int, bidirectional: bool):
        super().__init__()
        self.n_buckets, self.max_distance, self.bidirectional = n_buckets, max_distance, bidirectional
        self.table = nn.Embedding(n_buckets, n_heads)

    def reset_parameters(self, std: float) -> None:
        nn.init.normal_(self.table.weight, std=std)

    def tp_plan(self) -> dict:
        return {"table": Colwise()}

    def forward(self, q_positions: torch.Tensor, k_positions: torch.Tensor) -> torch.Tensor:
        """Bias [B, H, Sq, Sk] (this rank's heads under TP) for query positions [B, Sq] and key
        positions [B, Sk]."""
        offset = k_positions[:, None, :] - q_positions[:, :, None]
        buckets = relative_bucket(offset, self.bidirectional, self.n_buckets, self.max_distance)
        return self.table(buckets).permute(0, 3, 1, 2)
