"""Activation memory per block, measured with saved-tensor hooks (the derivation it is checked
against lives with the model family: models/decoder/activations.py).

``ActivationMeter``: during one forward, every tensor autograd saves for backward passes through
a pack hook and is attributed to the block (the family's ``block_names()``) running at that
moment; tensors the ``op`` recomputation policy keeps are seen through its policy. A block's
bytes are those of the distinct storages it keeps (a DTensor counts its local shard: bytes per
rank), excluding parameters and the per-forward tensors every block shares (RoPE tables, masks).
"""


from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel
from torch.utils.checkpoint import CheckpointPolicy


def _storage(t: torch.Tensor) -> tuple[int, int]:
    local = t.to_local() if isinstance(t, DTensor) else t
    if isinstance(local, AsyncCollectiveTensor):  # a collective's output not waited for yet
        local = local.wait()
    storage = local.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


class ActivationMeter:
    """Attributes saved tensors to the blocks of ``model`` during ``measure()``."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.current: str | None = None
        self.saved: dict[str, dict[int, int]] = defaultdict(dict)

    def _note(self, tensor: torch.Tensor) -> None:
        if self.current is not None and isinstance(tensor, torch.Tensor):
            ptr, nbytes = _storage(tensor)
            self.saved[self.current][ptr] = nbytes

    def recording(self, policy):
        """``policy`` (an op-level recomputation rule) that also notes the outputs it keeps."""

        def observed(ctx, op, *args, **kwargs):
            decision = policy(ctx, op, *args, **kwargs)
            if decision == CheckpointPolicy.MUST_SAVE and not ctx.is_recompute:
                outputs = ctx.op_output if isinstance(ctx.op_output, (tuple, list)) else (ctx.op_output,)
                for output in outputs:
                    self._note(output)
            return decision

        return observed

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        def enter(key):
            def hook(module, args):
                self.current = key

            return hook

        def leave(module, args, output):
            self.current = None

        def pack(tensor):
            self._note(tensor)
            return tensor

        handles = []
        for key in self.model.block_names():
            block = self.model.get_submodule(key)
            handles.append(block.register_forward_pre_hook(enter(key)))
            handles.append(block.register_forward_hook(leave))
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                yield
        finally:
            for handle in handles:
                handle.remove()

    def per_layer(self) -> dict[str, int]:
        """Bytes each block keeps, without parameters and tensors shared by several blocks."""
        params = {_storage(p)[0] for p in self.model.parameters()}
        owners: dict[int, int] = defaultdict(int)
        for storages in self.saved.values():
            for ptr in storages:
                owners[ptr] += 1
        return {
            key: sum(n for ptr, n in storages.items() if ptr not in params and owners[ptr] == 1)
            for key, storages in self.saved.items()
        }


def measure_activations(config, batch: int, seq: int, mode: str = "none", dtype: torch.dtype = torch.float32,
                        tp_mesh=None, sp: bool = False, doc_ids: torch.Tensor | None = None) -> dict[str, int]:
    """Saved activation bytes per block (``ActivationMeter.per_layer``) of one forward of a fresh
    model built from ``config``, with recompute ``mode`` and optionally TP(+SP) on ``tp_mesh``."""
    from models.spec import build_model
    from pretrain.parallel.recompute import apply_ac, op_policy
    from pretrain.parallel.tp import apply_tp

    with torch.device("meta"):
        model = build_model(config)
    if tp_mesh is not None:
        apply_tp(model, tp_mesh, sp)
    meter = ActivationMeter(model)
    apply_ac(model, mode, policy=meter.recording(op_policy))
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    model.to(dtype)
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    with meter.measure(), loss_parallel() if tp_mesh is not None else contextlib.nullcontext():
        model(ids, doc_ids=doc_ids)
    return meter.per_layer()
