"""The vocabulary a module uses to declare how tensor (and sequence) parallelism shards it.

A module that has parameters to shard, or inputs to prepare, defines ``tp_plan()`` returning
``{relative submodule name: entry}`` (``""`` names the module itself). The entries say what a
module *is*; pretrain/parallel/tp.py turns them into DTensor styles, choosing the sequence-
parallel variant when ``parallel.sp`` is on. Model code imports nothing distributed.

- ``Colwise``: a linear layer whose output features are sharded (attention heads, FFN hidden
  units); it reads a replicated input.
- ``Rowwise``: a linear layer whose input features are sharded and whose output goes back into
  the residual stream: all-reduced, or reduce-scattered to sequence shards under SP.
- ``Tokenwise``: a module applied to each token independently with replicated parameters (the
  norms): it runs on sequence shards under SP, on the whole (replicated) sequence otherwise.
- ``GatherInputs(activations)``: one flag per positional argument of the module's forward;
  flagged ones are residual-stream activations [B, S, ...], made replicated (one all-gather
  under SP) before the module runs, so every column-parallel projection inside reads one
  gathered copy (and their input gradients are summed before one collective). Unflagged
  arguments (a forward context) pass as they are.
- ``Replicated``: a module with replicated parameters that takes and returns plain tensors
  (inside a ``LocalInputs`` region).
- ``LocalInputs(activations)``: a module computed redundantly on every TP rank on plain local
  tensors: its flagged inputs arrive whole (gathered under SP) as plain tensors, and its one
  output goes back to the residual stream's layout (its sequence shard under SP). Its
  parameters are declared ``Replicated``. For per-token work that is cheap next to the GEMMs
  and needs plain tensors (routers, probes that keep statistics in buffers).
- ``VocabEmbedding``: an embedding table sharded over the vocabulary.
- ``VocabHead``: the output projection, sharded over the vocabulary: logits stay sharded for
  the vocab-parallel loss.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Colwise:
    pass


@dataclass(frozen=True)
class Rowwise:
    pass


@dataclass(frozen=True)
class Tokenwise:
    pass


@dataclass(frozen=True)
class GatherInputs:
    activations: tuple[bool, ...] = (True,)


@dataclass(frozen=True)
class Replicated:
    pass


@dataclass(frozen=True)
class LocalInputs:
    activations: tuple[bool, ...] = (True,)


@dataclass(frozen=True)
class VocabEmbedding:
    pass


@dataclass(frozen=True)
class VocabHead:
    pass


PlanEntry = Colwise | Rowwise | Tokenwise | GatherInputs | Replicated | LocalInputs | VocabEmbedding | VocabHead
