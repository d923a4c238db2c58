"""Attention kernels behind one interface, each computing an :class:`AttentionSpec`
(models/attention/spec.py) or refusing it with a message that names a backend that can.

A backend ``prepare``s a spec once per forward (masks, block masks, sequence offsets), which every
layer sharing that spec then ``attend``s with. Nothing is cached inside a layer.

Which to use: ``sdpa`` everywhere by default (CPU and GPU; the flash kernel on GPU for plain
causal rows, the memory-efficient kernel with a mask otherwise); ``flex`` on GPUs for packed
documents, windows and biases (block-sparse, compiled; no backward on CPU); ``flash`` on GPUs
with the flash_attn package (varlen kernel for packed documents; no bias, no cross-attention
segments); ``cudnn`` is torch SDPA restricted to its cuDNN kernel (CUDA GPUs with cuDNN, fp16/bf16;
no fallback to another kernel, so a measurement of it measures cuDNN); ``math`` is the fp32 reference the tests compare against — slow, memory O(S²).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from models.attention.spec import AttentionSpec, AttentionSpecError, dense_mask


def expand_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[B, Hkv, S, D] → [B, H, S, D]: each KV head serves n_heads/Hkv consecutive query heads."""
    return x.repeat_interleave(n_heads // x.shape[1], dim=1) if x.shape[1] != n_heads else x


class AttentionBackend:
    """Interface: ``prepare(spec, q_len, kv_len, device)`` → whatever ``attend(q, k, v,
    prepared)`` needs. ``prepare`` raises AttentionSpecError for a spec it cannot compute."""

    name = ""

    def prepare(self, spec: AttentionSpec, q_len: int, kv_len: int, device: torch.device) -> Any:
        raise NotImplementedError

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prepared: Any) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class DenseMask:
    """A boolean mask [B|1, 1, Sq, Sk] (True = visible), the bias, the scale."""

    mask: torch.Tensor
    bias: torch.Tensor | None
    scale: float | None


def math_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Explicit fp32 attention; rows with no visible key give 0 (not NaN)."""
    k, v = expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.float()
    # A finite fill keeps a fully masked row's softmax finite (uniform); it is then zeroed.
    scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1) * mask.any(dim=-1, keepdim=True)
    return (probs @ v.float()).to(q.dtype)


class MathBackend(AttentionBackend):
    name = "math"

    def prepare(self, spec, q_len, kv_len, device) -> DenseMask:
        return DenseMask(dense_mask(spec, q_len, kv_len, device), spec.bias, spec.scale)

    def attend(self, q, k, v, prepared: DenseMask) -> torch.Tensor:
        return math_attention(q, k, v, prepared.mask, prepared.bias, prepared.scale)


@dataclass(frozen=True)
class SDPAPlan:
    """``causal``: no mask, ``is_causal``; ``mask`` None and not causal: every key visible;
    else a boolean or additive mask. ``empty_rows`` [B, 1, Sq, 1]: rows to zero afterwards."""

    causal: bool
    mask: torch.Tensor | None
    scale: float | None
    empty_rows: torch.Tensor | None = None


class SDPABackend(AttentionBackend):
    """torch SDPA. Plain causal self-attention runs with ``is_causal`` (flash-eligible, native
    GQA); anything else passes an explicit mask (boolean, or additive with the bias), with KV
    heads expanded so that the memory-efficient kernel (which takes masks) applies on GPUs. Rows
    with no visible key see key 0 inside the kernel and are zeroed after it, so neither the
    output nor the gradient is ever NaN."""

    name = "sdpa"

    def prepare(self, spec, q_len, kv_len, device) -> SDPAPlan:
        plain = spec.segments is None and spec.q_segments is None and spec.bias is None
        if plain and spec.causal and spec.window is None and q_len == kv_len:
            return SDPAPlan(True, None, spec.scale)
        sees_all = spec.causal and q_len == 1 and (spec.window is None or kv_len <= spec.window)
        if plain and (sees_all or (not spec.causal and spec.window is None)):
            return SDPAPlan(False, None, spec.scale)
        mask = dense_mask(spec, q_len, kv_len, device)
        empty = None
        if spec.may_have_empty_rows:
            empty = ~mask.any(dim=-1, keepdim=True)
            first_key = torch.arange(kv_len, device=device) == 0
            mask = mask | (empty & first_key)
        if spec.bias is not None:
            mask = spec.bias.float().masked_fill(~mask, float("-inf"))
        return SDPAPlan(False, mask, spec.scale, empty)

    def attend(self, q, k, v, plan: SDPAPlan) -> torch.Tensor:
        n_heads = q.shape[1]
        gqa = k.shape[1] != n_heads
        if plan.mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=plan.causal, scale=plan.scale, enable_gqa=gqa)
        mask = plan.mask if plan.mask.dtype == torch.bool else plan.mask.to(q.dtype)
        out = F.scaled_dot_product_attention(
            q, expand_kv(k, n_heads), expand_kv(v, n_heads), attn_mask=mask, scale=plan.scale
        )
        return out if plan.empty_rows is None else out.masked_fill(plan.empty_rows, 0.0)


class CudnnBackend(SDPABackend):
    """The SDPA plans (masks, bias, empty rows as ``sdpa``) run inside
    ``sdpa_kernel(SDPBackend.CUDNN_ATTENTION)``, KV heads always expanded. Refused at ``prepare``
    (the first forward) where there is no CUDA device or no cuDNN, and at ``attend`` when cuDNN
    has no kernel for the inputs (e.g. fp32)."""

    name = "cudnn"

    def prepare(self, spec, q_len, kv_len, device) -> SDPAPlan:
        refusal = cudnn_refusal(device)
        if refusal is not None:
            raise AttentionSpecError(f"attention backend 'cudnn' cannot run: {refusal}; use sdpa")
        return super().prepare(spec, q_len, kv_len, device)

    def attend(self, q, k, v, plan: SDPAPlan) -> torch.Tensor:
        n_heads = q.shape[1]
        mask = plan.mask if plan.mask is None or plan.mask.dtype == torch.bool else plan.mask.to(q.dtype)
        try:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                out = F.scaled_dot_product_attention(
                    q, expand_kv(k, n_heads), expand_kv(v, n_heads), attn_mask=mask, is_causal=plan.causal,
                    scale=plan.scale,
                )
        except RuntimeError as e:
            if "No available kernel" not in str(e):
                raise
            raise AttentionSpecError(
                f"attention backend 'cudnn' has no cuDNN kernel for these inputs ({q.dtype}, head_dim {q.shape[-1]}, "
                f"{'no mask' if mask is None else 'a mask'}); cuDNN attention takes fp16/bf16; use sdpa"
            ) from None
        return out if plan.empty_rows is None else out.masked_fill(plan.empty_rows, 0.0)


def cudnn_refusal(device: torch.device) -> str | None:
    """Why torch's cuDNN attention cannot run on ``device`` (None when it can)."""
    if device.type != "cuda":
        return f"torch's cuDNN attention needs a CUDA GPU, and this model runs on {device.type}"
    if not torch.backends.cudnn.is_available():
        return "this torch build has no cuDNN"
    return None


@dataclass(frozen=True)
class FlexPlan:
    block_mask: Any
    score_mod: Any
    scale: float | None


def _bias_score_mod(bias: torch.Tensor):
    batch_shared, heads_shared = bias.shape[0] == 1, bias.shape[1] == 1

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[0 if batch_shared else b, 0 if heads_shared else h, q_idx, kv_idx]

    return score_mod


class FlexBackend(AttentionBackend):
    """FlexAttention with a block-sparse mask (causal, window, segments) and the bias as a
    ``score_mod``. Compiled on GPUs. FlexAttention has no backward on CPU: there it runs only
    without gradients (eager, unfused), e.g. for inference or to check masks."""

    name = "flex"
    _compiled = None

    def prepare(self, spec, q_len, kv_len, device) -> FlexPlan:
        offset = kv_len - q_len
        causal, window = spec.causal, spec.window
        segments, q_segments, k_segments = spec.segments, spec.q_segments, spec.k_segments

        def mask_mod(b, h, q_idx, kv_idx):
            q_abs = q_idx + offset
            allowed = kv_idx >= 0
            if causal:
                allowed = allowed & (kv_idx <= q_abs)
            if window is not None:
                allowed = allowed & ((q_abs - kv_idx).abs() < window)
            if segments is not None:
                allowed = allowed & (segments[b, kv_idx] == segments[b, q_abs])
            if q_segments is not None:
                allowed = allowed & (k_segments[b, kv_idx] == q_segments[b, q_idx])
            return allowed

        with_batch = segments is not None or q_segments is not None
        batch = (segments if segments is not None else q_segments).shape[0] if with_batch else None
        block_mask = create_block_mask(mask_mod, batch, None, q_len, kv_len, device=device)
        score_mod = None if spec.bias is None else _bias_score_mod(spec.bias)
        return FlexPlan(block_mask, score_mod, spec.scale)

    def attend(self, q, k, v, plan: FlexPlan) -> torch.Tensor:
        gqa = k.shape[1] != q.shape[1]
        kwargs = dict(score_mod=plan.score_mod, block_mask=plan.block_mask, scale=plan.scale, enable_gqa=gqa)
        if q.device.type == "cpu":
            if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
                raise AttentionSpecError(
                    "attention backend 'flex' cannot train on CPU: FlexAttention has no backward there. "
                    "Use sdpa on CPU (model.kernels.attention=sdpa, or the layer's backend); flex is for CUDA devices"
                )
            return flex_attention(q, k, v, **kwargs)
        if FlexBackend._compiled is None:
            FlexBackend._compiled = torch.compile(flex_attention, dynamic=False)
        return FlexBackend._compiled(q, k, v, **kwargs)


@dataclass(frozen=True)
class FlashPlan:
    causal: bool
    window: tuple[int, int]
    scale: float | None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0


class FlashBackend(AttentionBackend):
    """flash_attn (CUDA, fp16/bf16). Packed documents use the varlen kernel with cu_seqlens cut at
    every document start; a window W maps to window_size (W − 1, 0), or (W − 1, W − 1) without
    causality. Causal alignment is bottom-right, as the interface requires."""

    name = "flash"

    def prepare(self, spec, q_len, kv_len, device) -> FlashPlan:
        _flash_attn()
        refusal = self._refusal(spec, q_len, kv_len, device)
        if refusal:
            raise AttentionSpecError(f"attention backend 'flash' cannot compute {refusal}; use sdpa or flex")
        w = -1 if spec.window is None else spec.window - 1
        window = (w, 0 if spec.causal else w)
        if spec.segments is None:
            return FlashPlan(spec.causal, window, spec.scale)
        batch, seq = spec.segments.shape
        starts = torch.ones_like(spec.segments, dtype=torch.bool)
        starts[:, 1:] = spec.segments[:, 1:] != spec.segments[:, :-1]
        offsets = starts.flatten().nonzero().flatten()
        cu = torch.cat([offsets, offsets.new_tensor([batch * seq])]).to(torch.int32)
        return FlashPlan(spec.causal, window, spec.scale, cu, int((cu[1:] - cu[:-1]).max()))

    @staticmethod
    def _refusal(spec, q_len, kv_len, device) -> str | None:
        if device.type != "cuda":
            return "on a CPU (flash_attn runs on CUDA devices only)"
        if spec.bias is not None:
            return "an additive bias (flash_attn takes none)"
        if spec.q_segments is not None:
            return "query/key segments (cross-attention with segments)"
        if spec.segments is not None and q_len != kv_len:
            return "segments with a KV cache (decode one document per row)"
        return None

    def attend(self, q, k, v, plan: FlashPlan) -> torch.Tensor:
        flash_attn = _flash_attn()
        batch, n_heads, q_len, dim = q.shape
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        kwargs = dict(causal=plan.causal, window_size=plan.window, softmax_scale=plan.scale)
        if plan.cu_seqlens is None:
            out = flash_attn.flash_attn_func(q, k, v, **kwargs)
        else:
            cu, longest = plan.cu_seqlens, plan.max_seqlen
            flat = (t.reshape(-1, t.shape[2], dim) for t in (q, k, v))
            out = flash_attn.flash_attn_varlen_func(*flat, cu, cu, longest, longest, **kwargs)
            out = out.view(batch, q_len, n_heads, dim)
        return out.transpose(1, 2)


def _flash_attn():
    try:
        import flash_attn
    except ImportError:
        raise AttentionSpecError(
            "attention backend 'flash' needs the flash_attn package (pip install flash-attn, CUDA only); "
            "use model.mixer.backend=sdpa or flex otherwise"
        ) from None
    return flash_attn


BACKENDS = {
    backend.name: backend for backend in (MathBackend(), SDPABackend(), FlexBackend(), FlashBackend(), CudnnBackend())
}


def get_backend(name: str) -> AttentionBackend:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {sorted(BACKENDS)}")
    return BACKENDS[name]
