"""Our DCP checkpoints as a conversion source and target.

Reading: the checkpoint's metadata lists every model tensor's global shape whatever layout saved
it (plain, FSDP2, TP, pipeline stages); each tensor is then loaded whole on its own. Tensors a
module stores in a parallelism-friendly order (``canonical_state``) are read together with their
module's other tensors and put back in canonical order.

Writing: a model-only checkpoint (``OUTPUT/checkpoints/step_NNNNNNNN`` with the config, the
completion marker and the ``latest`` pointer; the tokenizer beside ``checkpoints/`` as in a run
directory), each tensor in the order its module stores (``stored_state``, the inverse of
``canonical_state``), saved in batches of at most ``batch_bytes`` whose DCP metadata are merged
into one, so memory holds one batch.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from pretrain.checkpoint import (
    CONFIG_JSON,
    CONFIG_KEY,
    EXTRA_STATE,
    FORMAT_VERSION,
    LATEST,
    MARKER,
    CheckpointManager,
    quiet_single_process,
    read_marker,
    step_dir_name,
)
from pretrain.checkpoint_integrity import inventory
from pretrain.convert.errors import ConversionError
from pretrain.convert.weights import Weights, check_against_config, expected_names
from pretrain.names import clean_key

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


def resolve(path: str | os.PathLike) -> Path:
    """A complete checkpoint: ``path`` itself, the latest under a checkpoint root, or under a
    run directory's ``checkpoints/``."""
    path = Path(path)
    if read_marker(path) is not None:
        return path
    for root in (path, path / "checkpoints"):
        if root.is_dir():
            latest = CheckpointManager(root).latest()
            if latest is not None:
                return latest
    raise ConversionError(
        f"{path} is not a complete checkpoint, nor a checkpoint root or run directory holding one; "
        "name a step_NNNNNNNN directory or the checkpoints/ root"
    )


def model_section(checkpoint: Path) -> dict:
    extra = torch.load(checkpoint / EXTRA_STATE, weights_only=True)
    config = extra.get(CONFIG_KEY) if isinstance(extra, dict) else None
    section = config.get("model") if isinstance(config, dict) else None
    if not isinstance(section, dict) or "family" not in section:
        raise ConversionError(
            f"{checkpoint} holds no model config (extra_state.pt has no config.model.family); only checkpoints "
            "written by `pretrain train` or `pretrain convert` can be converted"
        )
    return section


def read_dcp(path: str | os.PathLike) -> Weights:
    from models.config import ModelConfig
    from models.counting import build_meta

    checkpoint = resolve(path)
    config = ModelConfig.from_dict(model_section(checkpoint))
    reader = FileSystemReader(checkpoint)
    metadata = reader.read_metadata()
    keys: dict[str, str] = {}
    listing: dict[str, tuple[tuple, torch.dtype]] = {}
    _, aliases = expected_names(config)
    for key, meta in metadata.state_dict_metadata.items():
        where = metadata.planner_data.get(key, ())
        if len(where) != 2 or where[0] != "model" or not isinstance(meta, TensorStorageMetadata):
            continue
        name = clean_key(where[1])
        if name in aliases:
            continue
        keys[name] = key
        listing[name] = (tuple(meta.size), meta.properties.dtype)
    check_against_config(listing, config, str(checkpoint))
    canonical = {
        name: module for name, module in build_meta(config).named_modules() if hasattr(module, "canonical_state")
    }

    def load(names: list[str]) -> dict[str, torch.Tensor]:
        flat = {keys[n]: torch.empty(listing[n][0], dtype=listing[n][1]) for n in names}
        with quiet_single_process():
            dcp.load(flat, storage_reader=FileSystemReader(checkpoint), no_dist=True)
        return {n: flat[keys[n]] for n in names}

    def owner(name: str) -> str | None:
        return next((m for m in canonical if name.startswith(m + ".")), None)

    def fetch(name: str) -> torch.Tensor:
        module = owner(name)
        if module is None:
            return load([name])[name]
        group = load([n for n in listing if owner(n) == module])
        canonical[module].canonical_state(module, group)
        return group[name]

    def read() -> Iterator[tuple[str, torch.Tensor]]:
        done: dict[str, torch.Tensor] = {}
        for name in listing:
            if name in done:
                yield name, done.pop(name)
                continue
            module = owner(name)
            if module is None:
                yield name, load([name])[name]
                continue
            group = load([n for n in listing if owner(n) == module])
            canonical[module].canonical_state(module, group)
            done.update(group)
            yield name, done.pop(name)

    marker = read_marker(checkpoint) or {}
    run_dir = checkpoint.parent.parent
    tokenizer = next((run_dir / n for n in TOKENIZER_FILES if (run_dir / n).is_file()), None)
    return Weights(config, listing, read, tokenizer, marker.get("step"), str(checkpoint), fetch=fetch)


def _merge(into: Metadata | None, part: Metadata, file_name: str) -> Metadata:
    for info in part.storage_data.values():
        info.relative_path = file_name
    if into is None:
        return part
    into.state_dict_metadata.update(part.state_dict_metadata)
    into.storage_data.update(part.storage_data)
    into.planner_data.update(part.planner_data)
    return into


def save_batches(directory: Path, items, batch_bytes: int, group: str | None = None) -> int:
    """Save ``(key, tensor or picklable object)`` items as one DCP checkpoint in ``directory``, in DCP
    calls of at most ``batch_bytes`` whose metadata are merged (one .metadata, data files
    ``__0_<k>.distcp``). Keys go under ``group`` (``{group: {key: value}}``) when given. Returns
    the number of items."""
    merged: Metadata | None = None
    batch: dict = {}
    size = index = count = 0

    def flush():
        nonlocal merged, batch, size, index
        if not batch:
            return
        part = directory / f".part{index}"
        with quiet_single_process():
            state = {group: batch} if group else batch
            dcp.save(state, storage_writer=FileSystemWriter(part, thread_count=1), no_dist=True)
        files = sorted(part.glob("*.distcp"))
        if len(files) != 1:
            raise ConversionError(f"DCP wrote {len(files)} data files for one batch; expected 1")
        name = f"__0_{index}.distcp"
        os.replace(files[0], directory / name)
        merged = _merge(merged, FileSystemReader(part).read_metadata(), name)
        shutil.rmtree(part)
        batch, size, index = {}, 0, index + 1

    for key, value in items:
        batch[key] = value
        count += 1
        size += value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0
        if size >= batch_bytes:
            flush()
    flush()
    if merged is None:
        raise ConversionError("no tensors to write")
    with open(directory / ".metadata", "wb") as f:
        pickle.dump(merged, f)
    return count


def write_dcp(weights: Weights, out_dir: Path, batch_bytes: int, on_tensor=None) -> dict[str, str]:
    """Write ``weights`` as a model-only checkpoint run directory under ``out_dir``; returns the
    checksum of every tensor written (``on_tensor(name, tensor)`` is called for each)."""
    from models.configtree import to_dict
    from models.counting import build_meta
    from pretrain.convert.tensorfile import checksum

    step = weights.step or 0
    checkpoint = out_dir / "checkpoints" / step_dir_name(step)
    checkpoint.mkdir(parents=True)
    sums: dict[str, str] = {}

    stored = {
        name: module for name, module in build_meta(weights.config).named_modules() if hasattr(module, "stored_state")
    }

    def items():
        for name, tensor in weights.read():
            sums[name] = checksum(tensor)  # canonical order, as read_dcp gives it back
            if on_tensor:
                on_tensor(name, tensor)
            owner = next((m for m in stored if name.startswith(m + ".")), None)
            if owner is not None:
                one = {name: tensor}
                stored[owner].stored_state(owner, one)
                tensor = one[name]
            yield name, tensor

    save_batches(checkpoint, items(), batch_bytes, group="model")
    config = {"model": to_dict(weights.config)}
    extra = {CONFIG_KEY: config, "step": step, "converted_from": weights.source}
    torch.save(extra, checkpoint / EXTRA_STATE)
    (checkpoint / CONFIG_JSON).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    marker = {
        "format": FORMAT_VERSION, "step": step, "world_size": 1, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch": torch.__version__, "files": inventory(checkpoint, exclude=(MARKER,)),
    }
    (checkpoint / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    (out_dir / "checkpoints" / LATEST).write_text(checkpoint.name + "\n")
    if weights.tokenizer is not None:
        name = "tokenizer.model" if weights.tokenizer.suffix == ".model" else weights.tokenizer.name
        shutil.copyfile(weights.tokenizer, out_dir / name)
    return sums


def verify_dcp(out_dir: Path, sums: dict[str, str]) -> None:
    """Re-read every tensor of the checkpoint just written and compare its checksum."""
    from pretrain.convert.tensorfile import checksum

    written = read_dcp(out_dir)
    seen = set()
    for name, tensor in written.read():
        if sums.get(name) != checksum(tensor):
            raise ConversionError(f"verification failed: {name} reads back different from what was written")
        seen.add(name)
    if seen != set(sums):
        raise ConversionError(f"verification failed: tensors {sorted(set(sums) ^ seen)[:3]} were not written")
