"""Mix'n'Match extraction: a MatFormer model + one width per MatFormer layer → the config and
weights of a standalone model whose MatFormer FFNs are plain ``swiglu`` FFNs of those widths.

The extracted model computes exactly what the MatFormer model computes at those widths
(``set_granularity``): its FFN weights are the canonical first m hidden units (the stored
tensor-parallel interleaving undone, layout.py) and every other tensor is copied unchanged.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from models.config import LayerOverride
from models.configtree import to_dict
from models.ffn.matformer.config import MatFormerConfig
from models.ffn.matformer.layout import interleave_perm, to_canonical
from models.ffn.matformer.module import MatFormerFFN
from models.ffn.swiglu import SwiGLUConfig


def matformer_layers(config) -> list[int]:
    """Block indices whose FFN is a MatFormer FFN, in block order."""
    return [i for i, ffn in enumerate(config.layers().ffns) if isinstance(ffn, MatFormerConfig)]


def per_layer_widths(config, granularity: int | None = None, per_layer: list[int] | None = None) -> list[int]:
    """One width per MatFormer layer, from one value for all or a per-layer list; validated."""
    ffns = [config.layers().ffns[i] for i in matformer_layers(config)]
    if not ffns:
        raise ValueError("the model has no matformer FFN: set model.ffn.kind=matformer")
    if (granularity is None) == (per_layer is None):
        raise ValueError("give exactly one of a granularity (all layers) or a per-layer list")
    widths = list(per_layer) if per_layer is not None else [granularity] * len(ffns)
    if len(widths) != len(ffns):
        raise ValueError(f"{len(widths)} widths given for {len(ffns)} MatFormer layers")
    for layer, (ffn, m) in enumerate(zip(ffns, widths)):
        if m not in ffn.granularities:
            raise ValueError(f"MatFormer layer {layer}: width {m} is not one of its granularities {ffn.granularities}")
    return widths


def extract_config(config, widths: list[int]):
    """The standalone config: each MatFormer FFN becomes a ``swiglu`` of its layer's width; the
    mixer overrides are kept; other FFN kinds keep their config. A family without
    ``layer_overrides`` (YOCO) takes one width for every layer."""
    ffns = config.layers().ffns
    by_layer = dict(zip(matformer_layers(config), widths))
    if not hasattr(config, "layer_overrides"):
        if len(set(widths)) > 1 or len(by_layer) != len(ffns):
            raise ValueError(
                f"model.family {config.family!r} has one FFN config for every block (no layer_overrides): extract "
                "one width for all layers (--granularity), or evaluate mixes with `pretrain matformer sweep`"
            )
        return dataclasses.replace(config, ffn=SwiGLUConfig(d_ff=widths[0]))
    per_block = [
        {"kind": "swiglu", "d_ff": by_layer[i]} if i in by_layer else to_dict(ffn) for i, ffn in enumerate(ffns)
    ]
    base = per_block[0] if per_block[0]["kind"] == "swiglu" else {"kind": "swiglu", "d_ff": widths[0]}
    overrides = [
        dataclasses.replace(o, ffn=None) for o in config.layer_overrides if o.mixer is not None
    ]
    groups: dict[str, tuple[dict, list[int]]] = {}
    for i, ffn in enumerate(per_block):
        if ffn != base:
            groups.setdefault(repr(sorted(ffn.items())), (ffn, []))[1].append(i)
    overrides += [LayerOverride(layers=layers, ffn=ffn) for ffn, layers in groups.values()]
    return dataclasses.replace(config, ffn=SwiGLUConfig(d_ff=base["d_ff"]), layer_overrides=overrides)


def canonical_ffn_weights(ffn: MatFormerFFN, m: int) -> dict[str, torch.Tensor]:
    """``w1``/``w3`` [m, d] and ``w2`` [d, m] of the sub-FFN of width m (fresh tensors)."""
    perm = interleave_perm(ffn.granularities, ffn.tp_interleave)
    return {
        "w1.weight": to_canonical(ffn.w1.weight.detach(), perm, 0)[:m].clone(),
        "w3.weight": to_canonical(ffn.w3.weight.detach(), perm, 0)[:m].clone(),
        "w2.weight": to_canonical(ffn.w2.weight.detach(), perm, 1)[:, :m].contiguous(),
    }


def extract_state_dict(model: nn.Module, widths: list[int]) -> dict[str, torch.Tensor]:
    """The standalone model's weights: every MatFormer FFN (module order) cut to its width."""
    names = [name for name, module in model.named_modules() if isinstance(module, MatFormerFFN)]
    if len(names) != len(widths):
        raise ValueError(f"{len(widths)} widths given for {len(names)} MatFormer layers")
    out = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, m in zip(names, widths):
        for key, tensor in canonical_ffn_weights(model.get_submodule(name), m).items():
            out[f"{name}.{key}"] = tensor
    return out
