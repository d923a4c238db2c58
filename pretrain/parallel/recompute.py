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

``every`` = k applies the mode to blocks whose index (in the whole model's block order) is a
multiple of k (k = 1: all blocks). Blocks are the family's ``block_names()``; ``selective``
finds the attention kernels inside them (any submodule's ``backend`` attribute that is an
attention backend, models/attention/backends.py) and leaves blocks without one as they are.
Recomputation never changes results: forward and backward compute the same values.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from models.attention.backends import AttentionBackend
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
    # torch.compile's policy context has no op_output before torch 2.13; it traces plain
    # tensors there, where no output is a partial DTensor.
    if op in SAVED_OPS and not _partial(getattr(ctx, "op_output", None)):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def keep_seeded_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Keep the outputs of ops torch tags as random (``nondeterministic_seeded``: SDPA's fused
    kernels, for their dropout), recompute the rest."""
    if torch.Tag.nondeterministic_seeded in getattr(op, "tags", ()):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


class RecomputedKernel(AttentionBackend):
    """An attention backend whose ``attend`` is recomputed in backward (``prepare``, once per
    forward, is not).

    ``keep_seeded`` (set by pretrain/parallel/compile.py for compiled blocks): a kernel torch
    tags as random is kept instead (its output and log-sum-exp; an unfused kernel's scores and
    probabilities are still recomputed). Recomputing a random op inside a compiled graph makes
    torch 2.13's partitioner save its RNG state behind the graph's saved non-tensors
    (``functionalize_rng_ops`` skips only the saved symints, not the DeviceMesh objects that
    DTensor parameters bring under tensor parallelism), and the compiled forward then fails
    with "expected all tensors_saved_with_vc_check to be Tensors".
    """

    def __init__(self, backend: AttentionBackend):
        self.inner = backend
        self.name = backend.name
        self.keep_seeded = False

    def prepare(self, *args):
        return self.inner.prepare(*args)

    def attend(self, q, k, v, prepared):
        if self.keep_seeded:
            context_fn = functools.partial(create_selective_checkpoint_contexts, keep_seeded_policy)
            return checkpoint(self.inner.attend, q, k, v, prepared, use_reentrant=False, context_fn=context_fn)
        return checkpoint(self.inner.attend, q, k, v, prepared, use_reentrant=False)


def _recompute_core_attention(block: nn.Module) -> int:
    """Wrap the attention kernels inside ``block``; returns how many there are."""
    kernels = [m for m in block.modules() if isinstance(getattr(m, "backend", None), AttentionBackend)]
    for module in kernels:
        if not isinstance(module.backend, RecomputedKernel):
            module.backend = RecomputedKernel(module.backend)
    return len(kernels)


def apply_ac(
    model: nn.Module, mode: str, every: int = 1, policy=op_policy, block_order: list[str] | None = None
) -> None:
    """Apply recomputation ``mode`` to the blocks of ``model`` (a whole model or a pipeline
    stage) whose index in ``block_order`` (default: this model's blocks) is a multiple of
    ``every``, in place. Call after tensor parallelism and before compile and FSDP. ``policy``
    is the ``op`` mode's rule (tools/activation_meter.py wraps it to see what it keeps)."""
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"unknown recompute mode {mode!r}; choose one of {RECOMPUTE_MODES}")
    if every < 1:
        raise ValueError(f"recompute every must be >= 1, got {every}")
    if mode == "none":
        return
    names = model.block_names()
    order = block_order or names
    kernels = 0
    for name in names:
        if order.index(name) % every:
            continue
        block = model.get_submodule(name)
        if mode == "selective":
            kernels += _recompute_core_attention(block)
        elif mode == "full":
            model.set_submodule(name, checkpoint_wrapper(block, preserve_rng_state=False))
        else:
            context_fn = functools.partial(create_selective_checkpoint_contexts, policy)
            model.set_submodule(name, checkpoint_wrapper(block, preserve_rng_state=False, context_fn=context_fn))
    if mode == "selective" and names and not kernels:
        raise NotImplementedError(
            f"train.recompute=selective: the blocks of {type(model).__name__} have no attention kernel to recompute; "
            "use train.recompute=op or full"
        )
