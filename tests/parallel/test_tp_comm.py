"""Tensor-parallel communication pattern, per layer: counts from CommDebugMode (forward and
backward, attributed to modules) and the order of collectives around the GEMMs in forward.

Megatron's pattern: with sequence parallelism, an all-gather before the column-parallel GEMMs of
the mixer and of the FFN and a reduce-scatter after each row-parallel GEMM (the reverse in
backward); without it, one all-reduce after each row-parallel GEMM forward and one for the
column-parallel input gradients backward. The loss adds three all-reduces of [tokens] vectors
(max, sum of exponentials, target logit), never a gather of the logits.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.debug import CommDebugMode
from torch.distributed.tensor.parallel import loss_parallel
from torch.utils._python_dispatch import TorchDispatchMode

from models.loss import language_model_loss
from pretrain.parallel.config import ParallelConfig
from pretrain.parallel.mesh import build_mesh, check_layout
from pretrain.parallel.parallelize import build_parts
from tests.parallel.launch import run_ranks
from tests.parallel.workloads import SEQ, TINY, global_batch

AG, RS, AR = "all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce"
MM, ATTN = "mm", "_scaled_dot_product_flash_attention_for_cpu"


class LocalOpLog(TorchDispatchMode):
    """Names of the ops run on plain local tensors (what DTensor desugars into): collectives,
    matrix multiplies and the attention kernel."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t is DTensor for t in types):
            return NotImplemented  # let DTensor desugar; its local ops come back here
        if all(t in (torch.Tensor, torch.nn.Parameter) for t in types):  # not sharding propagation's fakes
            name = func._overloadpacket.__name__
            if name in (AG, RS, AR, MM, ATTN):
                self.names.append(name)
        return func(*args, **(kwargs or {}))


def _counts(table: dict) -> dict:
    return {op.__name__ if hasattr(op, "__name__") else str(op).split(".")[-1]: n for op, n in table.items()}


def trace(rank: int, world: int, sp: bool) -> dict:
    parallel = ParallelConfig(tp=2, sp=sp)
    dims = check_layout(parallel, TINY, world, global_batch=2, micro_batch=2, seq_len=SEQ)
    model = build_parts(TINY, parallel, dims, build_mesh(dims, "cpu"), torch.device("cpu")).parts[0]
    batch = global_batch(0, batch=2)
    args = (batch["input_ids"],)
    kwargs = {"position_ids": batch["position_ids"]}
    comm = CommDebugMode()
    with comm, loss_parallel():
        loss, _ = language_model_loss(model(*args, **kwargs), batch["labels"], batch["loss_mask"], normalizer=64.0)
        loss.backward()
    per_module = {
        fqn: {phase: _counts(table[phase]) for phase in ("forward", "backward")}
        for fqn, table in comm.comm_module_counts.items()
    }
    with LocalOpLog() as log, loss_parallel(), torch.no_grad():
        language_model_loss(model(*args, **kwargs), batch["labels"], batch["loss_mask"], normalizer=64.0)
    return {"modules": per_module, "forward_order": log.names}


@pytest.fixture(scope="module", params=[True, False], ids=["sp", "tp_only"])
def traced(request):
    return request.param, run_ranks(2, trace, request.param)[0]


def test_counts_per_layer(traced):
    sp, result = traced
    modules = result["modules"]
    for i in range(TINY.n_layers):
        layer = modules[f"Decoder.layers.{i}"]
        if sp:
            assert layer["forward"] == {AG: 2, RS: 2} and layer["backward"] == {AG: 2, RS: 2}, layer
            # The gather belongs to the mixer/FFN entry (shared by its column-parallel GEMMs) and
            # the reduce-scatter to the row-parallel projection's output.
            assert modules[f"Decoder.layers.{i}.mixer"]["forward"] == {AG: 1, RS: 1}
            assert modules[f"Decoder.layers.{i}.mixer.wo"]["forward"] == {RS: 1}
            assert modules[f"Decoder.layers.{i}.ffn.w2"]["forward"] == {RS: 1}
        else:
            assert layer["forward"] == {AR: 2} and layer["backward"] == {AR: 2}, layer
            assert modules[f"Decoder.layers.{i}.mixer.wo"]["forward"] == {AR: 1}
        for column in ("mixer.wq", "mixer.wk", "mixer.wv", "ffn.w1", "ffn.w3"):  # absent when silent
            assert not modules.get(f"Decoder.layers.{i}.{column}", {}).get("forward")
    assert modules["Decoder.embed"]["forward"] == ({RS: 1} if sp else {AR: 1})
    assert modules["Decoder.head"]["forward"] == ({AG: 1} if sp else {})
    total = modules["Global"]["forward"]
    layers = TINY.n_layers
    expected = {AG: 2 * layers + 1, RS: 2 * layers + 1, AR: 3} if sp else {AR: 2 * layers + 1 + 3}
    assert total == expected


def test_forward_order(traced):
    sp, result = traced
    mixer = [MM, MM, MM, ATTN, MM]
    ffn = [MM, MM, MM]
    if sp:
        layer = [AG, *mixer, RS, AG, *ffn, RS]
        expected = [RS, *layer * TINY.n_layers, AG, MM, AR, AR, AR]
    else:
        layer = [*mixer, AR, *ffn, AR]
        expected = [AR, *layer * TINY.n_layers, MM, AR, AR, AR]
    assert result["forward_order"] == expected
