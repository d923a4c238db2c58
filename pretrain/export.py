"""Consolidate the model weights of a DCP checkpoint into one safetensors file.

The checkpoint may have been written under any parallel layout (plain, DDP, FSDP2, TP,
pipeline stages): DCP's metadata describes every tensor's global shape, so the full tensors are
read back in one process without a process group. ``pretrain export --checkpoint DIR --output
FILE.safetensors`` calls ``export_main``.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from pretrain.checkpoint import (
    CONFIG_KEY,
    EXTRA_STATE,
    TMP_TAG,
    CheckpointError,
    CheckpointManager,
    atomic_write,
    fsync_path,
    quiet_single_process,
    read_marker,
)
from pretrain.names import clean_key

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise CheckpointError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A complete checkpoint directory, given either one or a checkpoint root (its latest)."""
    path = Path(path)
    if read_marker(path) is not None:
        return path
    if path.is_dir():
        latest = CheckpointManager(path).latest()
        if latest is not None:
            return latest
    raise CheckpointError(f"{path} is neither a complete checkpoint nor a directory holding one")


def load_model_weights(checkpoint_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Full (unsharded) model tensors of a checkpoint, keyed by plain parameter names."""
    checkpoint_dir = Path(checkpoint_dir)
    if read_marker(checkpoint_dir) is None:
        raise CheckpointError(f"{checkpoint_dir} is not a complete checkpoint")
    reader = FileSystemReader(checkpoint_dir)
    metadata = reader.read_metadata()
    flat: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}
    for key, meta in metadata.state_dict_metadata.items():
        path = metadata.planner_data.get(key, ())
        if len(path) != 2 or path[0] != "model" or not isinstance(meta, TensorStorageMetadata):
            continue
        flat[key] = torch.empty(meta.size, dtype=meta.properties.dtype)
        names[key] = clean_key(path[1])
    if not flat:
        raise CheckpointError(f"{checkpoint_dir} holds no model tensors")
    if len(set(names.values())) != len(names):
        raise CheckpointError(
            f"{checkpoint_dir}: parameter names collide once wrappers are stripped"
        )
    with quiet_single_process():
        dcp.load(flat, storage_reader=reader, no_dist=True)
    return {names[key]: tensor for key, tensor in flat.items()}


def canonical_order(weights: dict[str, torch.Tensor], model_section: dict) -> None:
    """Put tensors that a module stores in a parallelism-friendly order back in their canonical
    order, in place: each module with ``canonical_state(name, weights)`` rewrites its own
    entries (a MatFormer FFN's tensor-parallel interleaving, models/ffn/matformer)."""
    from models.config import ModelConfig
    from models.counting import build_meta

    model = build_meta(ModelConfig.from_dict(model_section))
    for name, module in model.named_modules():
        if hasattr(module, "canonical_state"):
            module.canonical_state(name, weights)


def export_safetensors(
    checkpoint_dir: str | os.PathLike,
    out_file: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
) -> Path:
    """Write the checkpoint's model weights to ``out_file`` (atomically), in canonical order
    (``canonical_order``, when the checkpoint's config names a model family), floating tensors
    cast to ``dtype`` when given. When the checkpoint holds a config, it is written next to the
    weights as ``<stem>.config.json``. Returns the safetensors path."""
    checkpoint_dir = Path(checkpoint_dir)
    target = parse_dtype(dtype)
    out_file = Path(out_file)
    weights = load_model_weights(checkpoint_dir)
    extra = torch.load(checkpoint_dir / EXTRA_STATE, weights_only=True)
    config = extra.get(CONFIG_KEY) if isinstance(extra, dict) else None
    model_section = config.get("model") if isinstance(config, dict) else None
    if isinstance(model_section, dict) and "family" in model_section:
        canonical_order(weights, model_section)
    if target is not None:
        weights = {k: v.to(target) if v.is_floating_point() else v for k, v in weights.items()}
    marker = read_marker(checkpoint_dir) or {}
    metadata = {"format": "pt", "source": checkpoint_dir.name, "step": str(marker.get("step"))}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f"{out_file.name}{TMP_TAG}{os.getpid()}")
    try:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp), metadata=metadata)
        fsync_path(tmp)
        os.replace(tmp, out_file)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(out_file.parent)
    if isinstance(config, dict):
        text = json.dumps(config, indent=2, sort_keys=True, default=str) + "\n"
        atomic_write(out_file.with_name(f"{out_file.stem}.config.json"), text.encode())
    return out_file


def export_main(
    checkpoint: str | os.PathLike, output: str | os.PathLike, dtype: str | None = None
) -> int:
    """Entry point of ``pretrain export``: ``checkpoint`` is a checkpoint or a checkpoint root
    (its latest complete checkpoint is exported). Raises CheckpointError on bad input."""
    source = resolve_checkpoint(checkpoint)
    out = export_safetensors(source, output, dtype)
    numel = 0
    with safe_open(str(out), framework="pt") as f:
        names = list(f.keys())
        for name in names:
            numel += math.prod(f.get_slice(name).get_shape())
    print(
        f"exported {len(names)} tensors ({numel:,} values) from {source} to {out}", file=sys.stderr
    )
    return 0
