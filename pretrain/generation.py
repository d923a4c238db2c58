"""``pretrain generate``: load a checkpoint (any layout) and sample text with a KV cache."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from data.tokenizer import TokenizerError, load_tokenizer
from models.config import ModelConfig
from models.generate import generate
from models.spec import build_model
from pretrain.checkpoint import CheckpointError
from pretrain.export import load_model_weights, resolve_checkpoint


def load_checkpoint_model(checkpoint: str | Path, device: torch.device | str = "cpu"):
    """The model of a checkpoint (or of a checkpoint root's latest), in eval mode, and its path."""
    path = resolve_checkpoint(checkpoint)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} holds no config.json, so the model shape is unknown")
    model_config = ModelConfig.from_dict(json.loads(config_file.read_text())["model"])
    with torch.device("meta"):
        model = build_model(model_config)
    model.to_empty(device=device)
    model.init_weights()
    missing, unexpected = model.load_state_dict(load_model_weights(path), strict=False)
    missing = [k for k in missing if k not in tied_aliases(model)]
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match its config: missing {missing}, unexpected {unexpected}")
    return model.eval(), path


def tied_aliases(model: torch.nn.Module) -> set[str]:
    """Parameter names that share their tensor with an earlier name (a tied head): a checkpoint
    may hold the tensor once."""
    seen, aliases = set(), set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            aliases.add(name)
        seen.add(id(param))
    return aliases


def find_tokenizer(checkpoint: Path, explicit: str | None):
    """``--tokenizer``, else the tokenizer the trainer copied into the run directory."""
    if explicit:
        return load_tokenizer(explicit)
    run_dir = checkpoint.parent.parent
    for name in ("tokenizer.model", "tokenizer.json"):
        if (run_dir / name).is_file():
            return load_tokenizer(run_dir / name)
    raise TokenizerError(f"no tokenizer in {run_dir}; pass --tokenizer PATH")


def generate_main(args) -> int:
    model, path = load_checkpoint_model(args.checkpoint)
    tokenizer = find_tokenizer(path, args.tokenizer)
    ids = tokenizer.encode(args.prompt)
    if tokenizer.bos_id is not None and args.bos:
        ids = [tokenizer.bos_id] + ids
    if not ids:
        raise TokenizerError("the prompt encodes to no tokens; give a non-empty --prompt")
    generator = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        out = generate(
            model, torch.tensor([ids]), args.max_new_tokens, temperature=args.temperature,
            top_p=args.top_p, generator=generator, eos_id=tokenizer.eos_id,
        )
    new = out[0, len(ids):].tolist()
    if tokenizer.eos_id in new:
        new = new[: new.index(tokenizer.eos_id)]
    print(args.prompt + tokenizer.decode(new))
    return 0
