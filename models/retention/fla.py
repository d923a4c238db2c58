"""flash-linear-attention's chunked "simple GLA" kernel (Triton, CUDA only) for the training
forward of gated retention, when the package is installed; models/retention/forms.py is the
reference it is tested against (tests/models/test_retention.py, on a GPU)."""

from __future__ import annotations

import importlib.util

import torch


def fla_usable(x: torch.Tensor) -> bool:
    """True when ``x`` is on a CUDA device and the ``fla`` package is installed."""
    return x.is_cuda and importlib.util.find_spec("fla") is not None


def fla_retention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, segments: torch.Tensor | None
) -> torch.Tensor:
    """Outputs [B, H, S, Dv] of the same inputs as ``parallel_retention`` (keys already scaled,
    so the kernel's scale is 1). Packed documents become variable-length sequences of one
    flattened row (``cu_seqlens``), each starting from a zero state."""
    from fla.ops.simple_gla import chunk_simple_gla

    batch, heads, seq, _ = q.shape
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, S, H, D]
    g = log_decay.transpose(1, 2).float()
    if segments is None:
        out, _ = chunk_simple_gla(q=q, k=k, v=v, g=g, scale=1.0)
        return out.transpose(1, 2)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    offsets = torch.nonzero(starts.flatten()).flatten()
    cu_seqlens = torch.cat([offsets, offsets.new_tensor([batch * seq])])
    flat = [t.reshape(1, batch * seq, *t.shape[2:]) for t in (q, k, v, g)]
    out, _ = chunk_simple_gla(q=flat[0], k=flat[1], v=flat[2], g=flat[3], scale=1.0, cu_seqlens=cu_seqlens)
    return out.reshape(batch, seq, heads, -1).transpose(1, 2)
