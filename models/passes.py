"""Training passes: models whose one optimizer step runs forward and backward more than once
on the same batch (MatFormer's joint training over nested widths, models/ffn/matformer).

A kind config (an FFN or mixer config) that needs passes defines

    train_passes(step, seed) -> list[Pass]    # the passes of optimizer step ``step``
    eval_passes() -> list[Pass]               # what validation reports

and its modules define ``select_pass(setting)`` (``setting`` = a Pass's ``setting``, or None
for the model as built). The passes come from the config, so every rank — every pipeline stage,
whatever layers it holds — runs the same sequence. The step's loss is Σ weight · loss(pass);
each pass's loss terms are logged under ``<term>/<pass name>``. A model without such kinds has
the single pass :data:`PLAIN`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class Pass:
    name: str  # "" for the model as built
    weight: float
    setting: Any = None


PLAIN = (Pass("", 1.0, None),)


def _providers(config) -> list:
    layers = config.layers() if hasattr(config, "layers") else None
    kinds = list(layers.mixers) + list(layers.ffns) if layers is not None else []
    return [k for k in kinds if hasattr(k, "train_passes")]


def _agreed(config, passes_of) -> tuple[Pass, ...]:
    found = {tuple(passes_of(k)) for k in _providers(config)}
    if not found:
        return PLAIN
    if len(found) > 1:
        raise ValueError(
            "the layers' kinds define different training passes (e.g. MatFormer layers with different "
            "granularities, modes or loss weights); give every such layer the same settings"
        )
    return found.pop()


def train_passes(config, step: int, seed: int) -> tuple[Pass, ...]:
    return _agreed(config, lambda k: k.train_passes(step, seed))


def eval_passes(config) -> tuple[Pass, ...]:
    return _agreed(config, lambda k: k.eval_passes())


def select_pass(modules: list[nn.Module], setting: Any) -> None:
    """Put every module of ``modules`` (model parts) that has passes into ``setting``."""
    for root in modules:
        for module in root.modules():
            if hasattr(module, "select_pass"):
                module.select_pass(setting)
