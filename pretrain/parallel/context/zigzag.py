"""The load-balanced ("zigzag") split of a sequence over ``cp`` ranks.

The sequence is cut into 2·cp equal chunks; rank r holds chunks r and 2·cp−1−r, in that order.
Under a causal mask a query at position p sees p+1 keys, so pairing an early chunk with a late one
gives every rank the same number of visible query–key pairs (``causal_pairs``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def zigzag_positions(seq_len: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """Positions [seq_len / cp] of the sequence held by ``rank`` (chunks r and 2·cp−1−r)."""
    if seq_len % (2 * cp):
        raise ValueError(f"a sequence of {seq_len} positions cannot be cut into 2 x cp = {2 * cp} equal chunks")
    chunk = seq_len // (2 * cp)
    first = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    second = torch.arange((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk, device=device)
    return torch.cat([first, second])


def shard_sequence(batch: Mapping[str, torch.Tensor], cp: int, rank: int) -> dict[str, torch.Tensor]:
    """This rank's part of a batch of [B, S] tensors (input ids, labels, positions, document ids,
    loss mask): the zigzag positions of dimension 1; per-sequence entries [B] (a dataset id) are
    kept whole. Position ids are added (0..S−1 before the cut) when the batch has none, so rotary
    embeddings see the global positions."""
    seq = batch["input_ids"].shape[1]
    full = dict(batch)
    if "position_ids" not in full:
        full["position_ids"] = torch.arange(seq, device=batch["input_ids"].device).expand_as(batch["input_ids"])
    index = zigzag_positions(seq, cp, rank, batch["input_ids"].device)
    out = {}
    for key, value in full.items():
        if value.dim() == 1:
            out[key] = value
            continue
        if value.shape[1] != seq:
            raise ValueError(f"batch entry {key!r} of shape {tuple(value.shape)} is not [B, S={seq}]: cannot cut it")
        out[key] = value.index_select(1, index)
    return out


def causal_pairs(seq_len: int, cp: int, rank: int) -> int:
    """Visible query–key pairs of ``rank``'s queries under a causal mask over the whole sequence."""
    return int((zigzag_positions(seq_len, cp, rank) + 1).sum())
