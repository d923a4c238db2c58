"""Key/value caches of one attention layer for incremental decoding.

``KVCache`` grows: it keeps every position (preallocated to the generation's length).
``WindowKVCache`` evicts: a sliding-window layer of window W needs only the last W − 1 positions
before the new ones, so its memory stays constant however long the generation runs.

Both ``append(k, v)`` the new positions [B, Hkv, S, D] and return the keys and values to attend
over, oldest first, ending with the new ones (the attention spec's bottom-right alignment).
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, batch: int, n_kv_heads: int, head_dim: int, max_len: int, dtype, device):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    def kv_len(self, new: int) -> int:
        """Keys an ``append`` of ``new`` positions returns."""
        return self.length + new

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        if end > self.keys.shape[2]:
            raise ValueError(f"KV cache holds {self.keys.shape[2]} positions; {end} requested")
        self.keys[:, :, self.length : end] = k
        self.values[:, :, self.length : end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def rewind(self, n: int) -> None:
        """Forget the last ``n`` positions (speculative decoding's rejected drafts)."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot rewind {n} of {self.length} cached positions")
        self.length -= n

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


class WindowKVCache:
    """The last ``window − 1`` keys and values (a query sees W keys including itself)."""

    def __init__(self, window: int):
        self.keep = window - 1
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def kv_len(self, new: int) -> int:
        return self.length + new

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys is not None:
            k, v = torch.cat([self.keys, k], dim=2), torch.cat([self.values, v], dim=2)
        start = max(0, k.shape[2] - self.keep)
        self.keys, self.values = k[:, :, start:].clone(), v[:, :, start:].clone()
        return k, v

    def rewind(self, n: int) -> None:
        raise ValueError(
            "a sliding-window cache has evicted what a rewind would need: speculative decoding works with "
            "full-attention layers only"
        )

    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes
