"""Gated retention (YOCO's self-decoder mixer; flash-linear-attention's "simple GLA") in three
forms that compute the same function:

    S_t = γ_t · S_{t−1} + k_tᵀ v_t          (state [Dk, Dv] per head; γ_t = exp(g_t), g_t ≤ 0)
    o_t = q_t · S_t

- ``recurrent_retention``: the recurrence itself, one position at a time (decoding, reference);
- ``parallel_retention``: every position at once, o = ((q kᵀ) ⊙ D) v with
  D[t, s] = exp(G_t − G_s) for s ≤ t, G the cumulative sum of g (training, short sequences);
- ``chunkwise_retention``: the parallel form inside chunks of C positions and the state carried
  between chunks (training, long sequences: linear in length, O(C) memory per position).

Packed documents (``segments``: document ids [B, S], contiguous per document) reset the state at
each document's first position: no query sees a key of another document. An ``initial`` state
[B, H, Dk, Dv] (a generation's state) is what precedes position 0. Keys arrive already scaled by
Dk^-½. Everything is computed in fp32; outputs and states are fp32.
"""

from __future__ import annotations

import torch


def parallel_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    segments: torch.Tensor | None = None,
    initial: torch.Tensor | None = None,
    initial_segment: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(outputs [B, H, S, Dv], state after the last position [B, H, Dk, Dv]) for q, k [B, H, S,
    Dk], v [B, H, S, Dv] and ``log_decay`` g [B, H, S]. ``initial`` reaches the positions whose
    document is ``initial_segment`` [B] (default: the document of position 0)."""
    q, k, v, g = q.float(), k.float(), v.float(), log_decay.float()
    seq = q.shape[2]
    cumulative = g.cumsum(-1)
    visible = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
    if segments is not None:
        visible = visible & (segments[:, None, :, None] == segments[:, None, None, :])
    decay = (cumulative[..., :, None] - cumulative[..., None, :]).masked_fill(~visible, float("-inf")).exp()
    out = (q @ k.transpose(-1, -2) * decay) @ v
    state = (k * decay[..., -1, :, None]).transpose(-1, -2) @ v
    if initial is not None:
        carry = cumulative.exp()  # [B, H, S]: how much of the state before position 0 reaches t
        if segments is not None:
            first = segments[:, :1] if initial_segment is None else initial_segment[:, None]
            carry = carry * (segments == first)[:, None, :]
        out = out + carry[..., None] * (q @ initial.float())
        state = state + carry[..., -1, None, None] * initial.float()
    return out, state


def chunkwise_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    chunk_size: int,
    segments: torch.Tensor | None = None,
    initial: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The parallel form over chunks of ``chunk_size`` positions, each starting from the state
    the previous one left (only for the positions still in that state's document)."""
    outputs, state, state_segment = [], initial, None
    for start in range(0, q.shape[2], chunk_size):
        part = slice(start, start + chunk_size)
        chunk_segments = segments[:, part] if segments is not None else None
        out, state = parallel_retention(
            q[:, :, part], k[:, :, part], v[:, :, part], log_decay[:, :, part], chunk_segments, state, state_segment
        )
        state_segment = chunk_segments[:, -1] if chunk_segments is not None else None
        outputs.append(out)
    return torch.cat(outputs, dim=2), state


def recurrent_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    segments: torch.Tensor | None = None,
    initial: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence, position by position."""
    batch, heads, seq, key_dim = q.shape
    state = initial.float() if initial is not None else q.new_zeros(batch, heads, key_dim, v.shape[-1], dtype=torch.float32)
    outputs = []
    for t in range(seq):
        keep = log_decay[:, :, t].float().exp()
        if segments is not None and t > 0:
            keep = keep * (segments[:, t] == segments[:, t - 1])[:, None]
        state = keep[..., None, None] * state + k[:, :, t, :, None].float() * v[:, :, t, None, :].float()
        outputs.append((q[:, :, t, None, :].float() @ state).squeeze(-2))
    return torch.stack(outputs, dim=2), state
