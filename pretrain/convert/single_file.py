"""One safetensors file of our parameter names plus ``<stem>.config.json`` (our config, as
``pretrain export`` writes it): the format of families without a Hugging Face class (YOCO,
MatFormer). Written and read one tensor at a time."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

from pretrain.convert.errors import ConversionError
from pretrain.convert.tensorfile import SafetensorsReader, SafetensorsWriter, checksum
from pretrain.convert.weights import Weights, check_against_config


def config_path(file: Path) -> Path:
    return file.with_name(f"{file.stem}.config.json")


def write_single(weights: Weights, out_file: Path, config_file: Path, on_tensor=None) -> dict[str, str]:
    """Write our config to ``config_file`` (atomically, first) and the weights to ``out_file``;
    returns the checksums."""
    from pretrain.checkpoint import atomic_write
    from models.configtree import to_dict

    text = json.dumps({"model": to_dict(weights.config)}, indent=2, sort_keys=True) + "\n"
    atomic_write(config_file, text.encode())
    metadata = {"format": "pt", "source": weights.source, "step": str(weights.step)}
    writer = SafetensorsWriter(out_file, weights.listing, metadata)
    sums = {}
    try:
        for name, tensor in weights.read():
            writer.write(name, tensor)
            sums[name] = (tensor.dtype, tuple(tensor.shape), checksum(tensor))
            if on_tensor:
                on_tensor(name, tensor)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return sums


def read_single(path: str | os.PathLike) -> Weights:
    from models.config import ModelConfig

    file = Path(path)
    if not file.is_file():
        raise ConversionError(f"{file} is not a file; the safetensors format is one FILE.safetensors")
    cfg = config_path(file)
    if not cfg.is_file():
        raise ConversionError(f"{file} has no {cfg.name} beside it; write our config there (pretrain export does)")
    section = json.loads(cfg.read_text()).get("model")
    if not isinstance(section, dict):
        raise ConversionError(f"{cfg} has no \"model\" section")
    config = ModelConfig.from_dict(section)
    reader = SafetensorsReader(file)
    listing = {name: reader.meta(name) for name in reader.names()}
    check_against_config(listing, config, str(file))

    def read() -> Iterator[tuple[str, torch.Tensor]]:
        for name in listing:
            yield name, reader.get(name)

    with open(file, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        raw = json.loads(f.read(size)).get("__metadata__", {}).get("step")
    step = int(raw) if raw and raw.isdigit() else None
    return Weights(config, listing, read, None, step, str(file), fetch=reader.get)

