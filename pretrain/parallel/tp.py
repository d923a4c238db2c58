"""Tensor parallelism (Megatron-style) with optional sequence parallelism, from the plans the
modules declare (``tp_plan()``, models/plans.py), as DTensor styles.

The projections that read a block's input (column-parallel: heads, FFN hidden units) and the
ones that write back into the residual stream (row-parallel) need one collective per mixer and
FFN forward. The embedding is vocab-parallel and the head column-parallel over the vocabulary,
leaving logits sharded for the vocab-parallel loss (models/loss.py): the full [tokens, vocab]
logits never exist on one rank.

Without sequence parallelism the residual stream is replicated (plain tensors) and row-parallel
outputs are all-reduced. With it (``sp``), the residual stream, the norms and the residual adds
run on sequence shards (DTensor ``Shard(1)``): a module's gathered inputs are all-gathered once
before its column-parallel GEMMs and the row-parallel output reduce-scattered back to sequence
shards — the same volume as the all-reduce, with the norm/residual activations divided by tp.
Parameters of token-wise modules stay replicated; DTensor all-reduces their gradients.

Every parameter must end up a DTensor: one no plan covers is an error naming its module.
Parameters shared by several modules (a tied head) are shared again after sharding.
"""

from __future__ import annotations

from collections import defaultdict

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.distributed.tensor.parallel.style import ParallelStyle

from models.plans import (
    Colwise, GatherInputs, LocalInputs, Replicated, Rowwise, Tokenwise, VocabEmbedding, VocabHead,
)


class ReplicateParallel(ParallelStyle):
    """A module computed redundantly on every TP rank (the norms without sequence parallelism):
    its parameters become Replicate DTensors, so that every parameter of a TP model is a DTensor
    (one kind of tensor for the optimizer, FSDP and clipping); it takes and returns plain
    tensors."""

    @staticmethod
    def _replicate(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        for key, param in list(module.named_parameters(recurse=False)):
            replicated = DTensor.from_local(param, mesh, [Replicate()], run_check=False)
            module.register_parameter(key, nn.Parameter(replicated))

    @staticmethod
    def _inputs(module, inputs, mesh):
        return tuple(DTensor.from_local(x, mesh, [Replicate()], run_check=False) for x in inputs)

    @staticmethod
    def _outputs(module, output, mesh):
        return output.to_local()

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh, self._replicate, self._inputs, self._outputs)


def style(entry, sp: bool) -> ParallelStyle:
    """The DTensor style of one plan entry (models/plans.py)."""
    stream = Shard(1) if sp else Replicate()  # the residual stream's layout
    if isinstance(entry, Colwise):
        return ColwiseParallel()
    if isinstance(entry, Rowwise):
        return RowwiseParallel(output_layouts=stream, use_local_output=not sp)
    if isinstance(entry, Tokenwise):
        return SequenceParallel() if sp else ReplicateParallel()
    if isinstance(entry, GatherInputs):
        return PrepareModuleInput(
            input_layouts=tuple(stream if a else None for a in entry.activations),
            desired_input_layouts=tuple(Replicate() if a else None for a in entry.activations),
        )
    if isinstance(entry, Replicated):
        return ReplicateParallel()
    if isinstance(entry, LocalInputs):
        # The backward of the gather takes each rank's slice of the (identical) full gradient.
        return PrepareModuleInputOutput(
            input_layouts=tuple(stream if a else None for a in entry.activations),
            desired_input_layouts=tuple(Replicate() if a else None for a in entry.activations),
            use_local_input=True,
            output_layouts=Replicate(),
            desired_output_layouts=stream,
            use_local_output=not sp,
        )
    if isinstance(entry, VocabEmbedding):
        return RowwiseParallel(input_layouts=Replicate(), output_layouts=stream, use_local_output=not sp)
    if isinstance(entry, VocabHead):
        return ColwiseParallel(input_layouts=stream, output_layouts=Shard(-1), use_local_output=False)
    raise TypeError(f"unknown tensor-parallel plan entry {entry!r}")


def _shared_parameters(model: nn.Module) -> list[list[str]]:
    names: dict[int, list[str]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        names[id(param)].append(name)
    return [group for group in names.values() if len(group) > 1]


def _set_parameter(model: nn.Module, name: str, param: nn.Parameter) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(owner), leaf, param)


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, sp: bool) -> None:
    """Shard ``model`` (a whole model or one pipeline stage of it) over ``tp_mesh`` in place, by
    every ``tp_plan()`` its modules declare."""
    shared = _shared_parameters(model)
    for name, module in list(model.named_modules()):
        plan = getattr(module, "tp_plan", None)
        if plan is None or _placed_already(module):
            continue
        present = {rel: style(entry, sp) for rel, entry in plan().items() if _present(module, rel)}
        itself = present.pop("", None)
        if present:
            parallelize_module(module, tp_mesh, present)
        if itself is not None:
            parallelize_module(module, tp_mesh, itself)
    uncovered = [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]
    if uncovered:
        owner = uncovered[0].rpartition(".")[0]
        raise NotImplementedError(
            f"no tensor-parallel plan covers {uncovered[0]} (module {type(model.get_submodule(owner)).__name__}): "
            "declare it in a tp_plan() of its module or an ancestor (models/plans.py), or run with parallel.tp=1"
        )
    for group in shared:
        source = model.get_parameter(group[0])
        for name in group[1:]:
            if model.get_parameter(name).placements != source.placements:
                raise ValueError(f"{name} and {group[0]} share a parameter but are sharded differently")
            _set_parameter(model, name, source)


def _placed_already(module: nn.Module) -> bool:
    """A module whose own parameters another dimension has made DTensors (expert parallelism's
    experts, placed over ``ep`` × ``tp``): tensor parallelism leaves it as it is."""
    own = list(module.parameters(recurse=False))
    return bool(own) and all(isinstance(p, DTensor) for p in own)


def _present(module: nn.Module, relative: str) -> bool:
    if not relative:
        return True
    try:
        return module.get_submodule(relative) is not None
    except AttributeError:
        return False
