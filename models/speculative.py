"""Greedy speculative decoding with a draft that is the same model in another configuration
(a MatFormer at a smaller FFN width: models/ffn/matformer) or any cheaper variant selected by
``use_draft(True/False)``.

Each round the draft proposes ``k`` tokens one at a time from its own decode state; the full
model scores the last accepted token and all ``k`` proposals in one forward; proposals are
accepted while they equal the full model's argmax, and the full model's own token at the first
mismatch (or after all ``k``) is appended too. Both decode states are rewound past rejected
positions. Every emitted token is the full model's argmax after the tokens before it, so the
output is the full model's greedy output (up to floating-point ties between two logits, which a
batched and a one-token forward may break differently).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class SpeculativeStats:
    rounds: int = 0
    proposed: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        """Fraction of drafted tokens the full model accepted."""
        return self.accepted / max(self.proposed, 1)


@torch.no_grad()
def speculative_generate(
    model: nn.Module,
    prompt: torch.Tensor,
    max_new_tokens: int,
    use_draft: Callable[[bool], None],
    k: int = 4,
    eos_id: int | None = None,
) -> tuple[torch.Tensor, SpeculativeStats]:
    """Greedy continuation of ``prompt`` [1, P] by up to ``max_new_tokens``: ([1, P + n], stats)."""
    if prompt.shape[0] != 1:
        raise ValueError("speculative decoding takes one prompt at a time (batch 1)")
    if k < 1:
        raise ValueError(f"need at least one draft token per round, got k={k}")
    weight = next(model.parameters())
    max_len = prompt.shape[1] + max_new_tokens
    target_state = model.new_decode_state(1, max_len, weight.dtype, prompt.device)
    draft_state = model.new_decode_state(1, max_len, weight.dtype, prompt.device)
    stats = SpeculativeStats()
    try:
        target_state.prefill = draft_state.prefill = True
        use_draft(False)
        last = model(prompt, state=target_state)[:, -1].argmax(-1, keepdim=True)  # [1, 1]
        use_draft(True)
        model(prompt, state=draft_state)
        target_state.prefill = draft_state.prefill = False
        out = [last]
        emitted = 1
        while emitted < max_new_tokens and not (eos_id is not None and int(last) == eos_id):
            # The draft has seen everything before ``last``: propose up to k tokens after it.
            use_draft(True)
            k_round = min(k, max_new_tokens - emitted)
            proposals, token = [], last
            for _ in range(k_round):
                token = model(token, state=draft_state)[:, -1].argmax(-1, keepdim=True)
                proposals.append(token)
            drafted = torch.cat(proposals, dim=1)  # [1, k_round]
            use_draft(False)
            scores = model(torch.cat([last, drafted], dim=1), state=target_state)  # [1, k_round + 1, V]
            choice = scores.argmax(-1)  # the full model's token after each of last, p1..pk
            agree = (drafted == choice[:, :k_round])[0].long()
            n = int(agree.cumprod(0).sum())  # proposals accepted
            stats.rounds += 1
            stats.proposed += k_round
            stats.accepted += n
            accepted = torch.cat([drafted[:, :n], choice[:, n : n + 1]], dim=1)
            target_state.rewind(k_round - n)  # it holds last + k proposals; keep last + n
            # The draft holds last + p1..p(k-1); keep last + p1..pn (all k: feed pk as well).
            if n < k_round:
                draft_state.rewind(k_round - 1 - n)
            elif emitted + n + 1 < max_new_tokens:
                use_draft(True)
                model(drafted[:, -1:], state=draft_state)
            out.append(accepted)
            emitted += accepted.shape[1]
            last = accepted[:, -1:]
        new = torch.cat(out, dim=1)[:, :max_new_tokens]
        if eos_id is not None and (new == eos_id).any():
            new = new[:, : int((new[0] == eos_id).nonzero()[0]) + 1]
        return torch.cat([prompt, new], dim=1), stats
    finally:
        use_draft(False)
