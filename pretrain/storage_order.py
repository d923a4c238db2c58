"""Refuse to load a checkpoint whose tensors are stored in another order than this run's model
reads them: modules with ``storage_order()`` (a MatFormer FFN's TP-interleaved hidden units,
models/ffn/matformer) describe their order, and a checkpoint saved under another one would load
without error into a different function."""

from __future__ import annotations

from pathlib import Path

import torch

from pretrain.errors import CheckpointError


def _orders(config) -> dict[str, str]:
    from models.counting import build_meta

    return {n: m.storage_order() for n, m in build_meta(config).named_modules() if hasattr(m, "storage_order")}


def check_storage_order(checkpoint: Path, config) -> None:
    """Raise CheckpointError when ``checkpoint`` (saved with a model config) stores a tensor in
    another order than a model of ``config`` reads it."""
    from models.config import ModelConfig
    from pretrain.checkpoint import CONFIG_KEY, EXTRA_STATE

    run = _orders(config)
    if not run:
        return
    extra = torch.load(Path(checkpoint) / EXTRA_STATE, weights_only=True)
    saved_config = extra.get(CONFIG_KEY) if isinstance(extra, dict) else None
    section = saved_config.get("model") if isinstance(saved_config, dict) else None
    if not isinstance(section, dict) or "family" not in section:
        return
    saved = _orders(ModelConfig.from_dict(section))
    for name in run.keys() & saved.keys():
        if run[name] != saved[name]:
            raise CheckpointError(
                f"{checkpoint}: {name} is stored with {saved[name]}, but this run's model reads {run[name]}; "
                "keep the checkpoint's setting (model.ffn.tp_interleave serves every parallel.tp dividing it), or "
                "re-lay the weights out: `pretrain convert --from dcp --to safetensors` the checkpoint and start a "
                "run from that file with model.init_from and the new setting"
            )
