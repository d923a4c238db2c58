"""Rotary position embeddings, rotate-half convention (HF Llama), so q/k projection weights map
to and from Hugging Face checkpoints without permutation.

The tables are computed from ``position_ids`` on every forward (no buffers), so a model built on
the meta device needs nothing recomputed after ``to_empty``, and positions may restart at 0 at
each packed document.

Context extension: a larger ``theta`` (slower rotations) and position interpolation
(``interpolation`` s > 1: positions divided by s, so a model trained on S positions sees S·s
within the angles it knows; Chen et al. 2023, Hugging Face's ``rope_type: linear``, factor s).
"""

from __future__ import annotations

import torch

from models.kernels import compiled, liger_function


def rope_tables(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype, interpolation: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [B, S, head_dim] for integer ``position_ids`` [B, S] divided by
    ``interpolation``; angles in fp32."""
    exponents = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents) / interpolation
    angles = position_ids[..., None].float() * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, S, heads, head_dim] by the tables [B, S, head_dim]."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + rotate_half(x) * sin


def rotate_qk(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kernel: str = "torch"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``apply_rope`` on q and k [B, S, heads, head_dim] by the ``kernel`` of
    ``model.kernels.rope``: the plain ops, them through torch.compile, or liger-kernel's RoPE
    (CUDA; it takes [B, heads, S, head_dim] views, the same rotate-half convention)."""
    if kernel == "compile":
        return compiled(apply_rope)(q, cos, sin), compiled(apply_rope)(k, cos, sin)
    if kernel == "liger":
        liger_rope = liger_function("liger_rope", q.device, "model.kernels.rope")
        q, k = liger_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kernel: str = "torch") -> torch.Tensor:
    """``apply_rope`` on one tensor [B, S, heads, head_dim] (YOCO's cross-decoder queries, its
    global keys) by the ``kernel`` of ``model.kernels.rope``. liger-kernel's RoPE rotates a query
    and a key tensor together; here the key is one zero head, rotated and dropped."""
    if kernel == "compile":
        return compiled(apply_rope)(x, cos, sin)
    if kernel == "liger":
        liger_rope = liger_function("liger_rope", x.device, "model.kernels.rope")
        rotated, _ = liger_rope(x.transpose(1, 2), x.new_zeros(x.shape[0], 1, x.shape[1], x.shape[3]), cos, sin)
        return rotated.transpose(1, 2)
    return apply_rope(x, cos, sin)
