"""Load-balancing terms (docs/moe.md, "Balancing"): the Switch loss, the router z-loss,
CompeteSMoE's router loss, and the auxiliary-loss-free bias update.

Switch loss (Megatron's scale): α · E · Σ_i f_i · P_i with f_i = (assignments to i) / (T·k) and
P_i = the mean router probability of i over the T tokens; perfectly uniform routing gives α
(HF Mixtral's E·Σ f_i P_i with f summing to k would give k·α). ``rows`` > 1 is the per-sequence
variant (DeepSeek-V3's sequence-wise loss): f and P per sequence, the loss averaged over the
sequences.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def switch_loss(
    probs: torch.Tensor,
    experts: torch.Tensor,
    rows: int = 1,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """E · Σ_i f_i · P_i (without α) for router ``probs`` [T, E] and chosen ``experts`` [T, k];
    with ``rows`` > 1 the T tokens are ``rows`` sequences of T/rows tokens, and the result is the
    mean over the sequences of each sequence's E · Σ_i f_i · P_i. ``reduce`` (context
    parallelism: the other chunks of the same rows are on other ranks) sums the per-row
    assignment counts and probability sums over those ranks, differentiably, so that f and P are
    the whole rows' and every rank gets the loss of one process."""
    tokens, n_experts = probs.shape
    top_k = experts.shape[1]
    per_row = tokens // rows
    counts = torch.zeros(rows, n_experts, dtype=probs.dtype, device=probs.device)
    counts.scatter_add_(1, experts.reshape(rows, -1), torch.ones(rows, per_row * top_k, dtype=probs.dtype, device=probs.device))
    prob_sums = probs.reshape(rows, per_row, n_experts).sum(1)
    if reduce is not None:
        counts, prob_sums = reduce(counts), reduce(prob_sums)
    assignments = counts.sum(-1, keepdim=True)  # tokens of the row x k
    fraction = counts / assignments
    mean_prob = prob_sums / (assignments / top_k)
    return (n_experts * (fraction * mean_prob).sum(-1)).mean()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """mean over tokens of logsumexp(logits)² (ST-MoE's router z-loss, without its coefficient)."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def compete_loss(probs: torch.Tensor, response: torch.Tensor, top_k: int) -> torch.Tensor:
    """CompeteSMoE's router loss (without its coefficient): the mean squared error between the
    router's softmax ``probs`` [T, E] and the competition's outcome, softmax over the experts of
    the responses ``response`` [T, E] with all but each token's k largest set to -inf (a target:
    no gradient)."""
    chosen = response.topk(top_k, dim=-1).indices
    masked = torch.full_like(response, float("-inf")).scatter(1, chosen, response.gather(1, chosen))
    return F.mse_loss(probs, torch.softmax(masked, dim=-1).detach())


@torch.no_grad()
def update_bias(bias: torch.Tensor, load: torch.Tensor, rate: float) -> None:
    """DeepSeek-V3's auxiliary-loss-free update, in place: b_i += rate · sign(mean load − load_i)
    (not centred, as Megatron)."""
    bias.add_(torch.sign(load.float().mean() - load.float()).to(bias.dtype), alpha=rate)
