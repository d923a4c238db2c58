"""``pretrain convert --from FORMAT --to FORMAT INPUT OUTPUT``: move a model between our DCP
checkpoints, Hugging Face directories, Megatron-core torch_dist checkpoints and single
safetensors files (and from DeepSpeed ZeRO checkpoints), streaming one tensor (or
one DCP batch) at a time, writing into a temporary sibling that is verified (every tensor re-read
and checksummed) before it is renamed into place. See docs/convert.md."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

from pretrain.convert.errors import ConversionError

FORMATS = ("dcp", "hf", "safetensors", "megatron", "deepspeed")
WRITABLE = ("dcp", "hf", "safetensors", "megatron")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise ConversionError(f"size {text!r} is not understood; write e.g. 5GB, 500MB or a number of bytes")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def load_model_config(name_or_path: str):
    """Our model config from a YAML file (its ``model:`` section) or a preset name."""
    from models.config import ModelConfig
    from models.configtree import load_yaml
    from pretrain.config import resolve_preset

    tree = load_yaml(resolve_preset(name_or_path))
    if not isinstance(tree, dict) or not isinstance(tree.get("model"), dict):
        raise ConversionError(f"--model-config {name_or_path}: no model: section")
    return ModelConfig.from_dict(tree["model"])


def read_weights(fmt: str, path: str | os.PathLike, model_config: str | None = None):
    from pretrain.convert.dcp_io import read_dcp
    from pretrain.convert.hf_io import read_hf
    from pretrain.convert.megatron import read_megatron
    from pretrain.convert.single_file import read_single

    if fmt not in FORMATS:
        raise ConversionError(f"--from {fmt!r} is not a format; choose one of {', '.join(FORMATS)}")
    if not Path(path).exists():
        raise ConversionError(f"{path} does not exist")
    config = load_model_config(model_config) if model_config else None
    if fmt == "megatron":
        return read_megatron(path, config)
    if fmt == "deepspeed":
        from pretrain.convert.deepspeed_io import read_deepspeed

        return read_deepspeed(path, config)
    return {"dcp": read_dcp, "hf": read_hf, "safetensors": read_single}[fmt](path)


def convert(
    src: str,
    dst: str,
    input_path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    dtype: str | None = None,
    family: str | None = None,
    shard_size: str | int = "5GB",
    tokenizer: str | os.PathLike | None = None,
    overwrite: bool = False,
    model_config: str | None = None,
    progress_interval: float = 5.0,
    config=None,
) -> dict:
    """Convert ``input_path`` (format ``src``) to ``output`` (format ``dst``); returns a summary
    (tensors, bytes, seconds). Raises ConversionError on bad input, naming the problem and the fix.
    ``config``: write the weights under this model config instead of the input's (same tensor
    names and shapes; ``model.init_from`` passes the run's, so the output has the run's stored
    order)."""
    from pretrain.convert.dcp_io import verify_dcp, write_dcp
    from pretrain.convert.hf_io import verify_safetensors_files, write_hf
    from pretrain.convert.megatron import verify_megatron, write_megatron
    from pretrain.convert.single_file import config_path, write_single
    from pretrain.convert.staging import Progress, staged
    from pretrain.convert.tokenizer import check_vocab
    from pretrain.export import parse_dtype

    if dst not in WRITABLE:
        raise ConversionError(f"--to {dst!r} is not a format we write; choose one of {', '.join(WRITABLE)}")
    start = time.monotonic()
    shard_bytes = parse_size(shard_size)
    weights = read_weights(src, input_path, model_config)
    if config is not None:  # the same tensors under another config of ours (e.g. another stored order)
        from dataclasses import replace

        from pretrain.convert.weights import check_against_config

        check_against_config(weights.listing, config, str(input_path))
        weights = replace(weights, config=config)
    if family is not None and weights.config.family != family:
        raise ConversionError(
            f"{input_path} holds a {weights.config.family} model, not --family {family}; drop --family or convert the "
            "right model"
        )
    if tokenizer is not None:
        weights.tokenizer = Path(tokenizer)
    check_vocab(weights.tokenizer, weights.config.vocab_size, str(input_path))
    weights = weights.cast(parse_dtype(dtype))
    meter = Progress(f"convert {src}->{dst}", len(weights.listing), weights.total_bytes(), progress_interval)

    def tick(name, tensor):
        meter.advance(tensor.numel() * tensor.element_size())

    output = Path(output)
    with staged(output, overwrite) as tmp:
        if dst == "hf":
            tmp.mkdir()
            sums = write_hf(weights, tmp, shard_bytes, tick)
            verify_safetensors_files(tmp, sums, sorted({p.name for p in tmp.glob("model-*.safetensors")}))
        elif dst == "dcp":
            tmp.mkdir()
            sums = write_dcp(weights, tmp, shard_bytes, tick)
            verify_dcp(tmp, sums)
        elif dst == "megatron":
            tmp.mkdir()
            sums = write_megatron(weights, tmp, shard_bytes, tick)
            verify_megatron(tmp, sums)
        else:
            sums = write_single(weights, tmp, config_path(output), tick)
            verify_safetensors_files(tmp.parent, sums, [tmp.name])
    summary = {
        "tensors": len(sums), "bytes": weights.total_bytes(), "seconds": time.monotonic() - start,
        "output": str(output), "family": weights.config.family,
    }
    print(
        f"converted {summary['tensors']} tensors ({summary['bytes'] / 1e9:.2f} GB) from {input_path} ({src}) to "
        f"{output} ({dst}) in {summary['seconds']:.1f}s",
        file=sys.stderr,
    )
    return summary
