"""Activation recomputation (Korthikanti et al. 2022), applied per block from outside the model.

Modes (``train.recompute``):

- ``none``: autograd keeps everything the backward needs.
- ``selective``: only the core attention (QKᵀ, softmax, ·V: the attention kernel) is recomputed
  in backward; its inputs q, k, v are kept. With an unfused kernel this drops the O(a·s²)
  scores and probabilities; with a fused one (SDPA flash) it drops the kernel's output and
  log-sum-exp.
- ``op``: an op-level policy over the whole block: outputs of matrix multiplies (aten's and the
  oneDNN CPU product of models/linear.py), of the attention kernel and of reducing collectives
  (reduce-scatter, all-reduce) are saved, everything else (norms, RoPE, SiLU and products, all-gathers) is recomputed — under sequence
  parallelism the backward gathers the sequence again, as Megatron does. A row-parallel GEMM's
  unreduced output is not kept (its reduced result is).
- ``full``: only the block's input is kept; the whole block runs again in backward.

``every`` = k applies the mode to blocks whose index is a multiple of k (k = 1: all blocks).
Recomputation never changes results: forward and backward compute the same values.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from models.linear import GEMM_OPS

RECOMPUTE_MODES = ("none", "selective", "op", "full")

_aten = torch.ops.aten
SAVED_OPS = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    *GEMM_OPS,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
    torch.ops._c10d_functional.all_reduce.default,
}


def _partial(output) -> bool:
    """A row-parallel GEMM's unreduced output: the reduced one is kept instead."""
    return isinstance(output, DTensor) and any(p.is_partial() for p in output.placements)


def op_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """The ``op`` mode's rule: keep GEMM, attention-kernel and reducing-collective outputs."""
    if op in SAVED_OPS and not _partial(ctx.op_output):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


class RecomputedKernel:
    """An attention backend whose ``attend`` is recomputed in backward (mask building is not)."""

    def __init__(self, backend):
        self.inner = backend
        self.name = backend.name

    def prepare(self, *args):
        return self.inner.prepare(*args)

    def attend(self, q, k, v, mask):
        return checkpoint(self.inner.attend, q, k, v, mask, use_reentrant=False)


def _recompute_core_attention(block: nn.Module) -> None:
    mixer = block.mixer
    if not hasattr(getattr(mixer, "backend", None), "attend"):
        raise NotImplementedError(
            f"train.recompute=selective: mixer {type(mixer).__name__} has no attention kernel (.backend) to "
            "recompute; use train.recompute=op or full"
        )
    if not isinstance(mixer.backend, RecomputedKernel):
        mixer.backend = RecomputedKernel(mixer.backend)


def apply_ac(model: nn.Module, mode: str, every: int = 1, policy=op_policy) -> None:
    """Apply recomputation ``mode`` to the blocks of ``model`` (a decoder or pipeline stage)
    whose index is a multiple of ``every``, in place. Call after tensor parallelism and before
    compile and FSDP. ``policy`` is the ``op`` mode's rule (pretrain/parallel/memory.py wraps it
    to see what it keeps)."""
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"unknown recompute mode {mode!r}; choose one of {RECOMPUTE_MODES}")
    if every < 1:
        raise ValueError(f"recompute every must be >= 1, got {every}")
    if mode == "none":
        return
    for key, block in list(model.layers.items()):
        if int(key) % every:
            continue
        if mode == "selective":
            _recompute_core_attention(block)
        elif mode == "full":
            model.layers[key] = checkpoint_wrapper(block, preserve_rng_state=False)
        else:
            context_fn = functools.partial(create_selective_checkpoint_contexts, policy)
            model.layers[key] = checkpoint_wrapper(block, preserve_rng_state=False, context_fn=context_fn)
