"""Hugging Face model directories as a conversion source and target, through the family
spec's HF adapter (models/hf.py), one tensor at a time.

A written directory holds ``config.json``, ``generation_config.json``, the weights as
``model-0000k-of-0000n.safetensors`` shards (at most ``shard_bytes`` each, one tensor never
split) with ``model.safetensors.index.json``, and the tokenizer (pretrain/convert/tokenizer.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from pretrain.convert.errors import ConversionError
from pretrain.convert.tensorfile import SafetensorsReader, SafetensorsWriter, checksum, nbytes
from pretrain.convert.weights import Weights, check_against_config

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def _adapter_for(config):
    from models.spec import hf_adapter

    try:
        return hf_adapter(config)
    except ValueError as e:
        raise ConversionError(f"{e}; convert to safetensors (our config is kept) instead") from None


def _plan_shards(entries: dict[str, tuple[tuple, torch.dtype]], shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, (shape, dtype) in entries.items():
        n = nbytes(shape, dtype)
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def _pieces(tmap, ours: str) -> list[tuple[str, object]]:
    """The HF tensors one of ours is written as: (HF name, transform of our tensor)."""
    if ours in tmap.stacked:
        return [(theirs, lambda t, e=e: t[e]) for e, theirs in enumerate(tmap.stacked[ours])]
    theirs, rule = tmap.rules[ours]
    return [(theirs, rule.to_hf)]


def write_hf(weights: Weights, out_dir: Path, shard_bytes: int, on_tensor=None) -> dict[str, str]:
    """Write ``weights`` as an HF model directory in the layout ``save_pretrained`` writes
    (the adapter's ``disk_map``); returns each HF tensor's checksum."""
    from pretrain.convert.tokenizer import write_hf_tokenizer

    adapter = _adapter_for(weights.config)
    tmap = adapter.disk_map(weights.config)
    pieces = {ours: _pieces(tmap, ours) for ours in weights.listing if ours not in tmap.aliases}
    entries: dict[str, tuple[tuple, torch.dtype]] = {}
    for ours, parts in pieces.items():
        shape, dtype = weights.listing[ours]
        for theirs, piece in parts:
            out = piece(torch.empty(shape, dtype=dtype, device="meta"))
            entries[theirs] = (tuple(out.shape), out.dtype)
    shards = _plan_shards(entries, shard_bytes)
    files = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    weight_map = {name: files[k] for k, names in enumerate(shards) for name in names}
    special = write_hf_tokenizer(weights.tokenizer, out_dir, weights.config)
    _write_configs(adapter, weights, out_dir, special)
    sums: dict[str, str] = {}
    writer, shard = None, -1
    try:
        for ours, tensor in weights.read():
            if ours in tmap.aliases:
                continue
            for theirs, piece in pieces[ours]:
                if weight_map[theirs] != (files[shard] if shard >= 0 else None):
                    if writer is not None:
                        writer.close()
                    shard += 1
                    writer = SafetensorsWriter(
                        out_dir / files[shard], {n: entries[n] for n in shards[shard]}, {"format": "pt"}
                    )
                out = piece(tensor).contiguous()
                writer.write(theirs, out)
                sums[theirs] = (out.dtype, tuple(out.shape), checksum(out))
                del out
            if on_tensor:
                on_tensor(ours, tensor)
            del tensor
        writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    total = sum(nbytes(*entries[n]) for n in entries)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return sums


def _write_configs(adapter, weights: Weights, out_dir: Path, special: dict) -> None:
    from transformers import GenerationConfig

    hf_config = adapter.config_to_hf(weights.config)
    hf_config.architectures = [adapter.architecture]
    dtypes = {d for _, d in weights.listing.values() if d.is_floating_point}
    if len(dtypes) == 1:
        hf_config.dtype = dtypes.pop()
    for role in ("bos", "eos", "pad"):
        setattr(hf_config, f"{role}_token_id", special.get(f"{role}_token_id"))
    hf_config.save_pretrained(out_dir)
    generation = {k: v for k, v in special.items() if v is not None}
    if getattr(hf_config, "decoder_start_token_id", None) is not None:
        generation["decoder_start_token_id"] = hf_config.decoder_start_token_id
    GenerationConfig(**generation).save_pretrained(out_dir)


def verify_safetensors_files(out_dir: Path, sums: dict[str, tuple], files: list[str]) -> None:
    """Re-read every tensor of ``files`` (dtype, shape and a checksum of its bytes) and compare
    with what was written (``sums``: name → (dtype, shape, sha256))."""
    from pretrain.convert.tensorfile import ST_DTYPES, file_checksums

    seen = set()
    for file in files:
        for name, (code, shape, digest) in file_checksums(out_dir / file).items():
            dtype, want_shape, want = sums.get(name, (None, None, None))
            if dtype is None or ST_DTYPES[dtype] != code or tuple(want_shape) != shape or want != digest:
                raise ConversionError(f"verification failed: {file}:{name} reads back different from what was written")
            seen.add(name)
    if seen != set(sums):
        raise ConversionError(f"verification failed: tensors {sorted(set(sums) ^ seen)[:3]} are missing from {out_dir}")


def hf_files(directory: Path) -> dict[str, str]:
    """HF tensor name → file of an HF directory (an index, or one model.safetensors)."""
    if (directory / INDEX).is_file():
        return json.loads((directory / INDEX).read_text())["weight_map"]
    if (directory / SINGLE).is_file():
        return {name: SINGLE for name in SafetensorsReader(directory / SINGLE).names()}
    raise ConversionError(f"{directory} has neither {INDEX} nor {SINGLE}; only safetensors HF checkpoints convert")


def read_hf(path: str | os.PathLike) -> Weights:
    """An HF model directory as our weights (config through the adapter of its architecture)."""
    from transformers import AutoConfig

    from models.spec import hf_adapter

    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise ConversionError(f"{directory} has no config.json; it is not a Hugging Face model directory")
    hf_config = AutoConfig.from_pretrained(directory, local_files_only=True)
    architectures = getattr(hf_config, "architectures", None) or []
    if not architectures:
        raise ConversionError(f"{directory}/config.json names no architectures; add e.g. \"architectures\": [\"LlamaForCausalLM\"]")
    try:
        adapter = hf_adapter(architecture=architectures[0])
        config = adapter.config_from_hf(hf_config)
    except ValueError as e:
        raise ConversionError(f"{directory}: {e}") from None
    tmap = adapter.disk_map(config)
    files = hf_files(directory)
    sources = {ours: [theirs] for ours, (theirs, _) in tmap.rules.items() if ours not in tmap.aliases}
    sources.update({ours: list(names) for ours, names in tmap.stacked.items()})
    needed = [theirs for names in sources.values() for theirs in names]
    known = {*needed, *tmap.hf_aliases}
    unexpected = [n for n in files if n not in known]
    if unexpected:
        raise ConversionError(
            f"{directory} holds tensor {unexpected[0]} ({len(unexpected)} unexpected) that {adapter.architecture} with "
            "this config.json does not have; the config does not describe these weights"
        )
    missing = [n for n in needed if n not in files]
    if missing:
        raise ConversionError(
            f"{directory} lacks tensor {missing[0]} ({len(missing)} missing) that its config.json implies; "
            "the download is incomplete or config.json belongs to another model"
        )
    readers = {f: SafetensorsReader(directory / f) for f in sorted(set(files.values()))}
    listing = {}
    for ours in _model_order(config, sources):
        metas = {readers[files[n]].meta(n) for n in sources[ours]}
        if len(metas) != 1:
            raise ConversionError(
                f"{directory}: the tensors stacked into {ours} ({sources[ours][0]}...) differ in shape or dtype; "
                "the checkpoint is corrupt"
            )
        shape, dtype = metas.pop()
        if ours in tmap.stacked:
            listing[ours] = ((len(sources[ours]), *shape), dtype)
        else:
            out = tmap.rules[ours][1].from_hf(torch.empty(shape, dtype=dtype, device="meta"))
            listing[ours] = (tuple(out.shape), out.dtype)
    check_against_config(listing, config, str(directory))

    def fetch(name: str) -> torch.Tensor:
        if name in tmap.stacked:
            return torch.stack([readers[files[n]].get(n) for n in tmap.stacked[name]])
        theirs, rule = tmap.rules[name]
        return rule.from_hf(readers[files[theirs]].get(theirs)).contiguous()

    def read() -> Iterator[tuple[str, torch.Tensor]]:
        for ours in listing:
            yield ours, fetch(ours)

    names = ("tokenizer.model", "spiece.model", "tokenizer.json")
    tokenizer = next((directory / n for n in names if (directory / n).is_file()), None)
    return Weights(config, listing, read, tokenizer, None, str(directory), fetch=fetch)


def _model_order(config, sources: dict) -> list[str]:
    """Our names of ``sources`` in the order the model holds them (unknown names last)."""
    from pretrain.convert.weights import expected_names

    rank = {name: k for k, name in enumerate(expected_names(config)[0])}
    return sorted(sources, key=lambda name: rank.get(name, len(rank)))
