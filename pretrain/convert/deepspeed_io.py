"""Import of DeepSpeed ZeRO (stage 1/2/3) training checkpoints through DeepSpeed's own
consolidation, ``deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint``
(its lazy mode: each tensor is gathered from the rank partitions when it is read).

The input is a DeepSpeed ``save_checkpoint`` directory (holding ``latest`` and
``global_stepN/``) or one tag directory in it. Its parameter names are those of the model
DeepSpeed trained: ours (a model of this project; ``--model-config`` gives its config), or a
transformers model's when the directory holds that model's ``config.json`` (as the HF Trainer
writes it), mapped through the family's HF adapter. DeepSpeed loads the fp32 optimizer
partitions of every rank, so memory holds the fp32 model once (DeepSpeed's own limit).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch

from pretrain.convert.errors import ConversionError
from pretrain.convert.weights import Weights, check_against_config


def _consolidated(directory: Path) -> tuple[dict, int | None]:
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError:
        raise ConversionError(
            "--from deepspeed needs the deepspeed package: DS_BUILD_OPS=0 pip install -e '.[deepspeed]'"
        ) from None
    tag = None
    root = directory
    if not (directory / "latest").is_file() and directory.parent.joinpath("latest").is_file():
        root, tag = directory.parent, directory.name
    if not (root / "latest").is_file() and tag is None:
        raise ConversionError(f"{directory} is not a DeepSpeed checkpoint (no latest file nor a tag directory of one)")
    name = tag or (root / "latest").read_text().strip()
    step = int(name.removeprefix("global_step")) if name.removeprefix("global_step").isdigit() else None
    try:
        state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag, lazy_mode=True)
    except (FileNotFoundError, ValueError) as e:
        raise ConversionError(f"DeepSpeed could not consolidate {directory}: {e}") from None
    return state, step


def read_deepspeed(path: str | os.PathLike, model_config=None) -> Weights:
    directory = Path(path)
    state, step = _consolidated(directory)
    hf_config = next((d / "config.json" for d in (directory, directory.parent) if (d / "config.json").is_file()), None)
    if model_config is not None:
        config, rename = model_config, {name: (name, None) for name in state}
    elif hf_config is not None:
        config, rename = _hf_names(hf_config, state)
    else:
        raise ConversionError(
            f"{directory} carries no model config; pass --model-config FILE (our model section) for a model of this "
            "project, or put the transformers config.json beside the checkpoint"
        )
    from pretrain.convert.weights import expected_names

    _, aliases = expected_names(config)
    rename = {ds: ours for ds, ours in rename.items() if ours[0] not in aliases}
    listing = {}
    for ds_name, (ours, rule) in rename.items():
        value = state[ds_name]
        meta = torch.empty(tuple(value.shape), dtype=value.dtype, device="meta")
        out = rule(meta) if rule else meta
        listing[ours] = (tuple(out.shape), out.dtype)
    check_against_config(listing, config, str(directory))

    def fetch_ds(ds_name):
        ours, rule = rename[ds_name]
        tensor = state[ds_name].contiguous()  # a GatheredTensor gathers its rank partitions here
        return ours, (rule(tensor).contiguous() if rule else tensor)

    def read() -> Iterator[tuple[str, torch.Tensor]]:
        for ds_name in rename:
            yield fetch_ds(ds_name)

    by_ours = {ours: ds for ds, (ours, _) in rename.items()}
    return Weights(config, listing, read, None, step, str(directory), fetch=lambda name: fetch_ds(by_ours[name])[1])


def _hf_names(config_json: Path, state: dict):
    from transformers import AutoConfig

    from models.spec import hf_adapter

    hf = AutoConfig.from_pretrained(config_json.parent, local_files_only=True)
    architectures = getattr(hf, "architectures", None) or []
    if not architectures:
        raise ConversionError(f"{config_json} names no architectures")
    try:
        adapter = hf_adapter(architecture=architectures[0])
        config = adapter.config_from_hf(hf)
    except ValueError as e:
        raise ConversionError(f"{config_json}: {e}") from None
    tmap = adapter.tensor_map(config)
    inverse = {theirs: (ours, rule.from_hf) for ours, (theirs, rule) in tmap.rules.items()}
    unknown = [n for n in state if n not in inverse and n not in tmap.hf_aliases]
    if unknown:
        raise ConversionError(f"DeepSpeed checkpoint holds tensor {unknown[0]} that {adapter.architecture} does not have")
    return config, {n: inverse[n] for n in state if n in inverse}
