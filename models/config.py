"""The ``model:`` section: a tagged tree. ``model.family`` picks the family's config dataclass;
inside it, ``mixer`` and ``ffn`` are tagged by ``kind``; ``layer_overrides`` change the mixer or
FFN of selected blocks.

    model:
      family: decoder
      d_model: 256
      mixer: {kind: attention, n_heads: 8, n_kv_heads: 4}
      ffn: {kind: swiglu, d_ff: 1024}
      layer_overrides:
        - {layers: "::2", mixer: {window: 128}}     # every other block: sliding-window attention
        - {layers: "0:1", ffn: {kind: swiglu, d_ff: 2048}}

An override's ``mixer``/``ffn`` without a ``kind`` (or with the block's current kind) is merged
onto the block's current fields; with another kind it starts from that kind's defaults.
Overrides apply in order, so a later one builds on an earlier one.
``layers`` is a Python slice (``"0:2"``, ``"::2"``, ``"-1:"``), one index, or a list of indices.

The base classes here define what the generic code asks of every family config and kind config
(validation, the sizes tensor parallelism divides, layout constraints).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

from models.configtree import ConfigError, Tagged, tagged_from_value, to_dict, variant_name


class ModelConfig(Tagged):
    """Base of every family's config (a dataclass with ``family``, ``vocab_size``,
    ``max_seq_len`` and its own fields)."""

    TAG: ClassVar[str] = "family"
    UNION: ClassVar[str] = "family"

    @classmethod
    def variants(cls) -> dict[str, type]:
        from models.spec import FAMILIES, load_builtins

        load_builtins()
        return {name: spec.config for name, spec in FAMILIES.items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | str, prefix: str = "model") -> ModelConfig:
        """Build the family's config from a ``model:`` mapping, then validate it."""
        config = tagged_from_value(ModelConfig, dict(values) if isinstance(values, Mapping) else values, prefix)
        config.validate()
        return config

    def problems(self) -> list[str]:
        """Every problem of this config, each naming the field and a fix."""
        raise NotImplementedError

    def validate(self) -> None:
        """Raise one ValueError listing every problem."""
        errors = self.problems()
        if errors:
            raise ValueError("invalid model config:\n  - " + "\n  - ".join(errors))

    @property
    def n_blocks(self) -> int:
        """Blocks in forward order (the units a pipeline is cut into)."""
        raise NotImplementedError

    def tp_sizes(self) -> dict[str, int]:
        """Sizes that tensor parallelism shards, by their config key: each must divide by tp."""
        raise NotImplementedError

    def layout_errors(self, *, tp: int, pp: int, stages: int) -> list[str]:
        """Family-specific constraints of a parallel layout (e.g. tied embeddings across stages)."""
        return []

    def context_parallel_errors(self) -> list[str]:
        """What of this model context parallelism (``parallel.cp`` > 1: every sequence cut over
        ranks) cannot compute, one line each naming the fix; checked with the layout, before any
        work. A family that does not declare what it supports is refused."""
        return [f"model.family {self.family} does not declare support for context parallelism; set parallel.cp=1"]


class MixerConfig(Tagged):
    """Base of the mixer kinds' configs (``model.mixer``)."""

    @classmethod
    def variants(cls) -> dict[str, type]:
        from models.spec import MIXERS, load_builtins

        load_builtins()
        return {name: kind.config for name, kind in MIXERS.items()}

    def problems(self, prefix: str, d_model: int) -> list[str]:
        return []

    def tp_sizes(self, prefix: str, d_model: int) -> dict[str, int]:
        return {}

    def context_parallel_errors(self, prefix: str) -> list[str]:
        """Why context parallelism cannot split this mixer along the sequence (one line each,
        naming the fix); a kind that does not declare support is refused."""
        return [f"{prefix} (kind {self.kind}) does not declare support for context parallelism; set parallel.cp=1"]


class FFNConfig(Tagged):
    """Base of the FFN kinds' configs (``model.ffn``)."""

    @classmethod
    def variants(cls) -> dict[str, type]:
        from models.spec import FFNS, load_builtins

        load_builtins()
        return {name: kind.config for name, kind in FFNS.items()}

    def problems(self, prefix: str, d_model: int) -> list[str]:
        return []

    def tp_sizes(self, prefix: str, d_model: int) -> dict[str, int]:
        return {}

    def context_parallel_errors(self, prefix: str) -> list[str]:
        """Why context parallelism changes what this FFN computes (one line each, naming the
        fix); none by default: an FFN acts on each position alone."""
        return []


@dataclass
class LayerOverride:
    """A different mixer and/or FFN for the blocks selected by ``layers``."""

    layers: str | int | list[int] = ""
    mixer: dict | None = None
    ffn: dict | None = None


def select_layers(selector: str | int | list[int], n_layers: int, key: str) -> list[int]:
    """Block indices chosen by a slice string, an index or a list of indices."""
    bad = (
        f"'{key}' = {selector!r} is not a layer selector; use a slice such as \"0:2\" or \"::2\", "
        f"an index, or a list of indices, within {n_layers} layers"
    )
    if isinstance(selector, list):
        if not selector or any(not isinstance(i, int) or not -n_layers <= i < n_layers for i in selector):
            raise ConfigError(bad)
        return sorted({i % n_layers for i in selector})
    text = str(selector).strip()
    try:
        if ":" in text:
            parts = [int(p) if p.strip() else None for p in text.split(":")]
            if len(parts) > 3 or (len(parts) == 3 and parts[2] == 0):
                raise ValueError
            chosen = list(range(n_layers))[slice(*parts)]
        else:
            index = int(text)
            if not -n_layers <= index < n_layers:
                raise ValueError
            chosen = [index % n_layers]
    except ValueError:
        raise ConfigError(bad) from None
    if not chosen:
        raise ConfigError(f"'{key}' = {selector!r} selects no layer of {n_layers}")
    return chosen


def override_config(base: Tagged, override: dict, union: type, key: str) -> Tagged:
    """``override`` applied to ``base``: merged when it keeps the kind, else that kind afresh."""
    tag = union.TAG
    if override.get(tag, variant_name(base)) == variant_name(base):
        merged = {**to_dict(base), **override}
    else:
        merged = dict(override)
    return tagged_from_value(union, merged, key)


@dataclass
class LayerKinds:
    """The resolved mixer and FFN config of every block."""

    mixers: list[MixerConfig] = field(default_factory=list)
    ffns: list[FFNConfig] = field(default_factory=list)


def resolve_layers(
    mixer: MixerConfig, ffn: FFNConfig, overrides: list[LayerOverride], n_layers: int, prefix: str = "model"
) -> LayerKinds:
    """Per-block configs: the defaults, then each override in order. Raises ConfigError."""
    mixers, ffns = [mixer] * n_layers, [ffn] * n_layers
    for i, override in enumerate(overrides):
        key = f"{prefix}.layer_overrides[{i}]"
        if override.mixer is None and override.ffn is None:
            raise ConfigError(f"'{key}' changes nothing: give it a 'mixer' or an 'ffn'")
        for layer in select_layers(override.layers, n_layers, f"{key}.layers"):
            if override.mixer is not None:
                mixers[layer] = override_config(mixers[layer], override.mixer, MixerConfig, f"{key}.mixer")
            if override.ffn is not None:
                ffns[layer] = override_config(ffns[layer], override.ffn, FFNConfig, f"{key}.ffn")
    return LayerKinds(mixers, ffns)


def tied_pipeline_errors(config, pp: int) -> list[str]:
    """A tied head cannot be split from its embedding across pipeline stages."""
    if pp > 1 and config.tie_embeddings:
        return [
            "model.tie_embeddings cannot be used with parallel.pp > 1: the embedding and the head live on "
            "different pipeline stages"
        ]
    return []
