"""``pretrain generate``: load a checkpoint (any layout) and sample text with a KV cache."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from data.tokenizer import TokenizerError, load_tokenizer
from models.config import ModelConfig
from models.generate import generate
from models.passes import eval_passes, select_pass
from models.speculative import speculative_generate
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
    if getattr(model, "seq2seq", False):
        return _seq2seq(model, tokenizer, args)
    ids = tokenizer.encode(args.prompt)
    if tokenizer.bos_id is not None and args.bos:
        ids = [tokenizer.bos_id] + ids
    if not ids:
        raise TokenizerError("the prompt encodes to no tokens; give a non-empty --prompt")
    generator = torch.Generator().manual_seed(args.seed)
    if args.draft_granularity is not None:
        out = _speculative(model, ids, args, tokenizer.eos_id)
    else:
        with torch.no_grad():
            out = generate(
                model, torch.tensor([ids]), args.max_new_tokens, temperature=args.temperature,
                top_p=args.top_p, generator=generator, eos_id=tokenizer.eos_id, prefill_chunk=args.prefill_chunk,
            )
    new = out[0, len(ids):].tolist()
    if tokenizer.eos_id in new:
        new = new[: new.index(tokenizer.eos_id)]
    print(args.prompt + tokenizer.decode(new))
    return 0


def _seq2seq(model, tokenizer, args) -> int:
    """An encoder-decoder answers its input with new text: ``<extra_id_j>`` in the prompt are
    the span-corruption sentinels (data/span_corruption.py), and so in the answer."""
    from data.span_corruption import decode_with_sentinels, encode_with_sentinels

    vocab = model.config.vocab_size
    ids = encode_with_sentinels(tokenizer, args.prompt, vocab) + [tokenizer.eod_id]
    generator = torch.Generator().manual_seed(args.seed)
    out = model.generate(
        torch.tensor([ids]), args.max_new_tokens, eos_id=tokenizer.eos_id, temperature=args.temperature,
        top_p=args.top_p, generator=generator,
    )
    new = out[0, 1:].tolist()
    if tokenizer.eos_id in new:
        new = new[: new.index(tokenizer.eos_id)]
    print(decode_with_sentinels(tokenizer, new, vocab))
    return 0


def draft_switch(model, width: int):
    """``use_draft(on)`` running ``model`` as its nested width-``width`` sub-model when on (the
    evaluation pass named ``m<width>``: MatFormer, models/passes.py)."""
    passes = {p.name: p for p in eval_passes(model.config)}
    name = f"m{width}"
    if name not in passes:
        widths = [n[1:] for n in passes if n.startswith("m")] or "none (not a MatFormer model)"
        raise CheckpointError(f"--draft-granularity {width}: this model's nested widths are {widths}")
    return lambda on: select_pass([model], passes[name].setting if on else None)


def _speculative(model, ids: list[int], args, eos_id: int | None) -> torch.Tensor:
    import sys
    import time

    if args.temperature != 0:
        raise CheckpointError("--draft-granularity decodes greedily: drop --temperature (or set it to 0)")
    started = time.perf_counter()
    out, stats = speculative_generate(
        model, torch.tensor([ids]), args.max_new_tokens, draft_switch(model, args.draft_granularity),
        k=args.draft_tokens, eos_id=eos_id,
    )
    elapsed = time.perf_counter() - started
    print(
        f"speculative decoding: {stats.accepted}/{stats.proposed} drafted tokens accepted "
        f"({stats.acceptance:.0%}) in {stats.rounds} rounds; {(out.shape[1] - len(ids)) / elapsed:.1f} tokens/s",
        file=sys.stderr,
    )
    return out
