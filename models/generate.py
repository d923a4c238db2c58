"""Autoregressive generation with a decode state (KV caches, window caches, recurrent states:
whatever the model's mixers keep): prefill the prompt once, then decode one token per step.
Greedy (temperature 0) or sampling with temperature and nucleus (top-p) truncation; pass a
``torch.Generator`` for reproducible samples.

Works for every family whose model has ``new_decode_state(batch, max_len, dtype, device)`` and
takes ``state=`` in its forward (models/decoder/model.py)."""

from __future__ import annotations

import torch
from torch import nn



def nucleus_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Sampling distribution [B, V]: softmax(logits/temperature) restricted to the smallest set of
    most likely tokens whose mass reaches ``top_p`` (the most likely token always kept), renormalised."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return kept / kept.sum(dim=-1, keepdim=True)


def sample_next(
    logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Next token ids [B] from last-position logits [B, V]; temperature 0 means argmax."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got temperature={temperature}, top_p={top_p}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = nucleus_probs(logits, temperature, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
    prefill_chunk: int | None = None,
) -> torch.Tensor:
    """Extend ``prompt`` [B, P] (equal-length prompts) by up to ``max_new_tokens``; returns
    [B, P + n]. Rows that emitted ``eos_id`` continue with ``eos_id``; generation stops early
    once every row has. ``prefill_chunk``: feed a long prompt in chunks of this many tokens
    (bounded activation memory; the same tokens)."""
    batch, prompt_len = prompt.shape
    weight = next(model.parameters())
    state = model.new_decode_state(batch, prompt_len + max_new_tokens, weight.dtype, prompt.device)
    step = prefill_chunk or prompt_len
    if step < 1:
        raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    state.prefill = True
    for start in range(0, prompt_len, step):
        logits = model(prompt[:, start : start + step], state=state)[:, -1]
    state.prefill = False
    tokens = [prompt]
    done = torch.zeros(batch, dtype=torch.bool, device=prompt.device)
    for step in range(max_new_tokens):
        next_ids = sample_next(logits, temperature, top_p, generator)
        if eos_id is not None:
            next_ids = next_ids.masked_fill(done, eos_id)
            done = done | (next_ids == eos_id)
        tokens.append(next_ids[:, None])
        if step + 1 == max_new_tokens or (eos_id is not None and bool(done.all())):
            break
        logits = model(next_ids[:, None], state=state)[:, -1]
    return torch.cat(tokens, dim=1)
