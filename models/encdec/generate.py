"""Sequence-to-sequence generation: the encoder runs once; the decoder starts from
``decoder_start_id`` and extends by one token per step, with a growing self-attention cache and
the cross-attention keys and values projected once (models/encdec/layers.py). Greedy or sampled
(models/generate.py's ``sample_next``)."""

from __future__ import annotations

import torch

from models.generate import sample_next


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    eos_id: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Decoder tokens [B, 1 + n] for encoder inputs [B, Se] (equal lengths): the start token, then
    up to ``max_new_tokens``. Rows that emitted ``eos_id`` continue with it; generation stops once
    every row has (as HF ``generate`` pads finished rows)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    batch = input_ids.shape[0]
    weight = next(model.parameters())
    memory = model.encode(input_ids)
    state = model.new_decode_state(batch, max_new_tokens, weight.dtype, input_ids.device)
    tokens = [torch.full((batch, 1), model.config.decoder_start_id, dtype=torch.long, device=input_ids.device)]
    done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        logits = model.decode(tokens[-1], memory, state=state)[:, -1]
        next_ids = sample_next(logits, temperature, top_p, generator)
        if eos_id is not None:
            next_ids = next_ids.masked_fill(done, eos_id)
            done = done | (next_ids == eos_id)
        tokens.append(next_ids[:, None])
        if eos_id is not None and bool(done.all()):
            break
    return torch.cat(tokens, dim=1)
