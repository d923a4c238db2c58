"""``model.init_from=DIR``: start training from converted weights (a Hugging Face directory, a
Megatron-LM torch_dist checkpoint with its args, a single safetensors file or one of our
checkpoints) under any parallel layout.

The model section becomes DIR's config (the weights define the architecture), with the
``model.*`` overrides given on the command line applied on top (an attention backend, say). At
the start of a fresh run rank 0 converts DIR into a model-only DCP checkpoint under
``RUN_DIR/init`` (streaming, as ``pretrain convert`` does), and every rank loads it into its
shards of the model; a run that resumes from its own checkpoints ignores ``init_from``.
"""

from __future__ import annotations

import os
from pathlib import Path

from models.configtree import apply_overrides, to_dict
from pretrain.convert.errors import ConversionError

INIT_DIR = "init"


def detect_format(path: str | os.PathLike) -> str:
    """The conversion format of ``path``: dcp, hf, megatron or safetensors."""
    from pretrain.checkpoint import read_marker

    from pretrain.convert.megatron import LATEST as MEGATRON_LATEST

    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        return "safetensors"
    if path.is_dir() and ((path / MEGATRON_LATEST).is_file() or (path / "metadata.json").is_file()):
        return "megatron"
    if path.is_dir() and (path / "config.json").is_file() and read_marker(path) is None:
        if any((path / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json")):
            return "hf"
    if path.is_dir() and (read_marker(path) is not None or (path / "checkpoints").is_dir() or (path / "latest").is_file()):
        return "dcp"
    raise ConversionError(
        f"model.init_from={path}: not a Hugging Face directory (config.json + safetensors), a Megatron-LM "
        "checkpoint, a FILE.safetensors or one of our checkpoints; convert it first with `pretrain convert`"
    )


def apply_init_from(tree: dict, overrides: list[str]) -> dict:
    """The config tree with ``model.init_from`` resolved: the model section replaced by the
    source's config plus the explicit ``model.*`` overrides, the source kept as ``init_from``."""
    from pretrain.convert import read_weights

    model = tree.get("model") or {}
    source = model.get("init_from") if isinstance(model, dict) else None
    if source is None:
        return tree
    config = read_weights(detect_format(source), source).config
    explicit = [o for o in overrides if o.startswith("model.") and not o.startswith("model.init_from=")]
    section = apply_overrides({"model": to_dict(config)}, explicit)["model"]
    return {**tree, "model": section, "init_from": str(source)}


def initial_checkpoint(source: str, run_dir: Path, config=None) -> Path:
    """A complete model-only checkpoint holding ``source``'s weights (converted into
    ``run_dir/init`` unless it already is one of ours; written in the order a model of
    ``config``, the run's, stores them). Run on one rank."""
    from pretrain.convert import convert
    from pretrain.convert.dcp_io import resolve

    fmt = detect_format(source)
    if fmt == "dcp":
        return resolve(source)
    target = run_dir / INIT_DIR
    convert(fmt, "dcp", source, target, overwrite=True, config=config)
    return resolve(target)


def load_initial_weights(parts, source: str, run_dir: Path, config=None) -> Path:
    """Collective: fill every rank's model parts with ``source``'s weights; returns the
    checkpoint they were loaded from. ``config``: the run's model config (its stored order is
    checked against the checkpoint's: pretrain/storage_order.py)."""
    import torch.distributed as dist

    from pretrain.checkpoint import CheckpointManager
    from pretrain.errors import CheckpointError
    from pretrain.storage_order import check_storage_order

    distributed = dist.is_available() and dist.is_initialized()
    box = [None, None]
    if not distributed or dist.get_rank() == 0:
        try:
            box[0] = str(initial_checkpoint(source, run_dir, config))
            if config is not None:
                check_storage_order(Path(box[0]), config)
        except (ConversionError, CheckpointError) as e:
            box[1] = str(e)
    if distributed:
        dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise ConversionError(box[1])
    path = Path(box[0])
    CheckpointManager(path.parent).load(path, parts, None, restore_rng=False)
    return path
