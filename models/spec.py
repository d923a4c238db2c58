"""Model families and block kinds: what the generic code (trainer, parallelism, counting,
generation, conversion) needs to know about a model, registered in one place.

A **family** (``model.family``: decoder, ...) is one package under ``models/`` that registers a
:class:`ModelSpec`: its config dataclass, how to build the model, how a data batch becomes the
model's inputs and the loss's targets, the loss itself, and (optionally) a Hugging Face adapter.
Everything about the model's *structure* is answered by the built model itself (the
:class:`FamilyModel` methods): its blocks, its pipeline units, its tensor-parallel plan entries,
its decode state. Counting walks the modules (models/counting.py).

A **kind** (``model.mixer.kind`` / ``model.ffn.kind``) is a mixer or FFN usable by any family
that builds blocks from them: a config dataclass and a builder, registered with
:func:`register_mixer` / :func:`register_ffn`. Its module declares its own tensor-parallel plan
(``tp_plan()``), FLOPs (``flops_per_token``), and, where it has them, decode state, auxiliary
losses, post-step hooks and metrics (see docs/model.md, "Adding a model family").

Built-in families and kinds register when ``models`` is imported. Tests register their own with
:func:`registered` (scoped: removed again on exit).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

FAMILIES: dict[str, ModelSpec] = {}
MIXERS: dict[str, KindSpec] = {}
FFNS: dict[str, KindSpec] = {}


@dataclass(frozen=True)
class KindSpec:
    """A mixer or FFN kind: ``build(config, d_model, layer_id)`` returns the module."""

    name: str
    config: type
    build: Callable[[Any, int, int], nn.Module]


@dataclass(frozen=True)
class LossSettings:
    """Loss options the trainer passes to every family's loss (``train.z_loss``), and to the
    modules that have a ``loss_settings`` attribute (a fused loss head computes the loss inside
    the model's forward). ``fused_head``: the model's output is per-token loss contributions
    (models/fused_loss.py), not logits; the runner sets it from the model's ``fused_loss``."""

    z_loss: float = 0.0
    fused_head: bool = False


@dataclass(frozen=True)
class ModelSpec:
    """Everything about a family that is not answered by its modules.

    - ``config``: the family's config dataclass (a ``models.config.ModelConfig`` variant).
    - ``build(config)``: the root module, initialised (build under ``torch.device("meta")`` to
      allocate nothing; then ``to_empty`` + ``init_weights``).
    - ``inputs(batch)``: ``(args, kwargs)`` of the model's forward for a data batch; ``args`` go
      to the first pipeline stage only, ``kwargs`` (per-forward tensors such as positions and
      segment ids) to every stage.
    - ``targets(batch)``: the tensors the loss needs besides the model output ([B, ...] each).
    - ``loss_tokens(batch)``: the number of loss-bearing tokens, the normaliser of the step.
    - ``loss(output, targets, normalizer, settings)``: ``(loss, metrics)``; the loss is the
      summed per-token loss over ``normalizer`` plus the family's named auxiliary terms;
      ``metrics`` are detached scalars (``ce_loss``, ``loss_sum``, ``num_tokens``, one per
      auxiliary term).
    - ``hf``: the family's Hugging Face adapters (models/hf.py), each for one transformers class
      (a decoder maps to Llama; an MoE decoder to Mixtral...). ``hf_adapter`` picks one.
    - ``task(model_config, data_config, split_name, num_samples)``: ``(dataset, fingerprint)``
      of the samples the family trains on, when they are not GPT windows (data/loader.py's
      ``build_loader`` ``task``); None: packed GPT samples.
    - ``row_flops(model_config, batch, setting)``: training FLOPs of one row of a data batch
      (its rows share their shapes) in the training pass ``setting`` (models/passes.py), for
      families whose rows are not ``data.seq_len`` tokens of one stack (what MFU counts); None:
      ``data.seq_len`` × models/counting.py's ``training_flops_per_token``.
    """

    name: str
    config: type
    build: Callable[[Any], nn.Module]
    inputs: Callable[[Mapping[str, torch.Tensor]], tuple[tuple, dict]]
    targets: Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]
    loss_tokens: Callable[[Mapping[str, torch.Tensor]], torch.Tensor]
    loss: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
    hf: tuple = ()
    task: Callable | None = None
    row_flops: Callable | None = None


class FamilyModel(Protocol):
    """What the generic code asks of a family's root module (and of its pipeline stages, which
    are the same module with parts removed: see ``pipeline_units``)."""

    config: Any

    def init_weights(self) -> None:
        """(Re)initialise every parameter, re-tying shared ones first."""

    def block_names(self) -> list[str]:
        """Fully-qualified names of the blocks present, in forward order: what FSDP,
        recomputation, compile and the activation meter wrap."""

    def pipeline_units(self) -> list[tuple[str, ...]]:
        """The model as an ordered list of units, one block each plus the modules that must live
        on the same pipeline stage (the embedding with the first block, the head with the
        last...). A stage keeps a contiguous run of units and drops every other unit's modules;
        its forward then takes what the previous stage returned (a tensor or a tuple)."""

    def tp_plan(self) -> dict:
        """Tensor-parallel entries of the root's own modules (models/plans.py); blocks and kinds
        declare theirs on their own modules."""


def register_family(spec: ModelSpec) -> ModelSpec:
    _add(FAMILIES, spec.name, spec, "model family")
    return spec


def register_mixer(name: str, config: type, build: Callable) -> KindSpec:
    return _add(MIXERS, name, KindSpec(name, config, build), "mixer kind")


def register_ffn(name: str, config: type, build: Callable) -> KindSpec:
    return _add(FFNS, name, KindSpec(name, config, build), "FFN kind")


def _add(registry: dict, name: str, entry, what: str):
    if name in registry:
        raise ValueError(f"{what} {name!r} is already registered")
    registry[name] = entry
    return entry


@contextlib.contextmanager
def registered(
    families: tuple[ModelSpec, ...] = (), mixers: tuple[KindSpec, ...] = (), ffns: tuple[KindSpec, ...] = ()
) -> Iterator[None]:
    """Register families and kinds for the duration of a ``with`` block (tests)."""
    entries = [(FAMILIES, s.name, s) for s in families] + [(MIXERS, k.name, k) for k in mixers]
    entries += [(FFNS, k.name, k) for k in ffns]
    added = []
    try:
        for registry, name, entry in entries:
            _add(registry, name, entry, "entry")
            added.append((registry, name))
        yield
    finally:
        for registry, name in added:
            registry.pop(name, None)


def get_spec(config_or_name) -> ModelSpec:
    """The spec of a family, by name or by (a config of) that family."""
    load_builtins()
    name = config_or_name if isinstance(config_or_name, str) else config_or_name.family
    if name not in FAMILIES:
        raise ValueError(f"model family {name!r} is unknown; choose one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def build_model(config) -> nn.Module:
    """The family's model for ``config`` (validated first). Build on the meta device and
    initialise after materialising for large models:

        with torch.device("meta"):
            model = build_model(config)
        model.to_empty(device="cuda")        # after parallelisation (FSDP2, TP) in practice
        model.init_weights()
    """
    config.validate()
    return get_spec(config).build(config)


def build_mixer(config, d_model: int, layer_id: int) -> nn.Module:
    load_builtins()
    return MIXERS[config.kind].build(config, d_model, layer_id)


def build_ffn(config, d_model: int, layer_id: int) -> nn.Module:
    load_builtins()
    return FFNS[config.kind].build(config, d_model, layer_id)


def hf_adapter(config=None, architecture: str | None = None):
    """The Hugging Face adapter for our ``config`` (the first of its family's adapters that can
    hold it), or the one for a transformers ``architecture`` name."""
    load_builtins()
    if architecture is not None:
        for spec in FAMILIES.values():
            for adapter in spec.hf:
                if adapter.architecture == architecture:
                    return adapter
        known = sorted(a.architecture for s in FAMILIES.values() for a in s.hf)
        raise ValueError(f"no adapter converts {architecture}; supported: {known}")
    refusals = []
    for adapter in get_spec(config).hf:
        problem = adapter.refusal(config)
        if problem is None:
            return adapter
        refusals.append(f"{adapter.architecture}: {problem}")
    raise ValueError(f"no Hugging Face class holds this {config.family} config ({'; '.join(refusals) or 'none known'})")



def load_builtins() -> None:
    """Register the built-in families and kinds (models/builtins.py). Called by every lookup;
    not imported at module level because the built-ins import this module."""
    import models.builtins  # noqa: F401
