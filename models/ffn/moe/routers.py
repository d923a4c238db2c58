"""Routers: which k experts each token goes to, and with what weight (docs/moe.md, "Routers").

Every router works on the flattened tokens [T, d] in fp32 and returns a :class:`Routing`. The
learned routers hold one projection ``weight`` [E, d] whose module (:class:`RouterLogits`) only
computes the logits, so tensor parallelism can run it replicated (models/plans.py
``Replicated``); the selection below runs on plain tensors.

- ``softmax_topk`` (Switch / GShard): p = softmax(logits); top-k of p; weights = the chosen p,
  divided by their sum when ``renormalize``.
- ``topk_softmax`` (Mixtral): top-k of the logits; weights = softmax over those k logits.
- ``sigmoid_bias`` (DeepSeek-V3): s = sigmoid(logits); select the top-k of s + b (b: the
  auxiliary-loss-free bias, a buffer without gradient); weights = the chosen s over their sum.
  With ``n_groups`` > 1 the experts form equal groups, each group scored by the sum of its two
  highest s + b (its one score when a group has one expert); only the ``topk_groups`` best
  groups' experts can be chosen.
- ``hash`` (Roller et al. 2021): expert = table[token id], a fixed balanced map (a seeded random
  permutation of the vocabulary cut into E equal groups); weight 1; no parameters.
- ``compete``: the router of CompeteSMoE (softmax_topk with renormalisation); the competition
  itself (routing by the experts' outputs) lives in the layer (layer.py).

Ties in top-k go to the lower expert index (torch.topk on CPU and CUDA; tested against a plain
recomputation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.plans import Replicated


@dataclass
class Routing:
    """The routing of T tokens: ``experts`` [T, k] (int64) and ``weights`` [T, k] (fp32, with a
    graph to the router's parameters); ``probs`` [T, E] (fp32) the router probabilities the
    Switch loss balances (None for hash); ``logits`` [T, E] (fp32) for the z-loss (None for
    hash)."""

    experts: torch.Tensor
    weights: torch.Tensor
    probs: torch.Tensor | None
    logits: torch.Tensor | None


class RouterLogits(nn.Module):
    """logits = x · Wᵀ in fp32 (W [E, d]), also under autocast."""

    def __init__(self, d_model: int, n_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))

    def init_weights(self, init_std: float) -> None:
        nn.init.normal_(self.weight, std=init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.weight.float())


class LearnedRouter(nn.Module):
    """A router with a logits projection; subclasses choose experts from the logits."""

    def __init__(self, d_model: int, n_experts: int, top_k: int):
        super().__init__()
        self.n_experts, self.top_k = n_experts, top_k
        self.gate = RouterLogits(d_model, n_experts)

    def tp_plan(self) -> dict:
        return {"gate": Replicated()}

    def init_weights(self, init_std: float) -> None:
        self.gate.init_weights(init_std)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> Routing:
        return self.select(self.gate(x))

    def select(self, logits: torch.Tensor) -> Routing:
        raise NotImplementedError


class SoftmaxTopK(LearnedRouter):
    def __init__(self, d_model: int, n_experts: int, top_k: int, renormalize: bool):
        super().__init__(d_model, n_experts, top_k)
        self.renormalize = renormalize

    def select(self, logits: torch.Tensor) -> Routing:
        probs = torch.softmax(logits, dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return Routing(experts, weights, probs, logits)


class TopKSoftmax(LearnedRouter):
    def select(self, logits: torch.Tensor) -> Routing:
        top, experts = logits.topk(self.top_k, dim=-1)
        return Routing(experts, torch.softmax(top, dim=-1), torch.softmax(logits, dim=-1), logits)


class SigmoidBias(LearnedRouter):
    """DeepSeek-V3 routing with the auxiliary-loss-free bias ``bias`` [E] (fp32 buffer, saved in
    checkpoints, changed only by the layer's post-step update)."""

    def __init__(self, d_model: int, n_experts: int, top_k: int, n_groups: int, topk_groups: int):
        super().__init__(d_model, n_experts, top_k)
        self.n_groups, self.topk_groups = n_groups, topk_groups
        self.register_buffer("bias", torch.zeros(n_experts, dtype=torch.float32))

    def init_weights(self, init_std: float) -> None:
        super().init_weights(init_std)
        self.bias.zero_()

    def select(self, logits: torch.Tensor) -> Routing:
        scores = torch.sigmoid(logits)
        biased = scores.detach() + self.bias.float()
        if self.n_groups > 1:
            grouped = biased.view(-1, self.n_groups, self.n_experts // self.n_groups)
            group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
            keep = torch.zeros_like(group_score, dtype=torch.bool)
            keep.scatter_(1, group_score.topk(self.topk_groups, dim=-1).indices, True)
            biased = grouped.masked_fill(~keep[..., None], float("-inf")).view_as(biased)
        experts = biased.topk(self.top_k, dim=-1).indices
        chosen = scores.gather(1, experts)
        weights = chosen / chosen.sum(-1, keepdim=True)
        return Routing(experts, weights, scores / scores.sum(-1, keepdim=True), logits)


class HashRouter(nn.Module):
    """expert = table[token id]; ``table`` [vocab] is rebuilt from the seed (not saved)."""

    def __init__(self, n_experts: int, vocab_size: int, seed: int):
        super().__init__()
        self.n_experts, self.top_k, self.seed = n_experts, 1, seed
        self.register_buffer("table", hash_table(vocab_size, n_experts, seed), persistent=False)

    def init_weights(self, init_std: float) -> None:
        """Rebuild the table (a model built on the meta device gets it here, after to_empty)."""
        self.table.copy_(hash_table(self.table.numel(), self.n_experts, self.seed))

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> Routing:
        if token_ids is None:
            raise ValueError(
                "router hash needs the token ids: the family must put them in the forward context "
                "(ForwardContext.token_ids; the decoder does, on every pipeline stage)"
            )
        ids = token_ids.reshape(-1)
        if ids.numel() and int(ids.max()) >= self.table.numel():
            raise ValueError(
                f"token id {int(ids.max())} is outside router hash's table of {self.table.numel()} ids: "
                "set hash_vocab_size to model.vocab_size"
            )
        experts = self.table[ids].unsqueeze(1)
        weights = torch.ones(experts.shape, dtype=torch.float32, device=x.device)
        return Routing(experts, weights, None, None)


def hash_table(vocab_size: int, n_experts: int, seed: int) -> torch.Tensor:
    """Token id → expert: a random permutation of the ids (torch.Generator seeded with ``seed``)
    cut into E consecutive groups of ⌈V/E⌉ or ⌊V/E⌋ ids; group e goes to expert e. Every expert
    gets ⌊V/E⌋ or ⌈V/E⌉ ids."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(vocab_size, generator=generator, device="cpu")
    table = torch.empty(vocab_size, dtype=torch.int64, device="cpu")
    table[order] = torch.arange(vocab_size, device="cpu") * n_experts // vocab_size
    return table.to(torch.get_default_device())


def build_router(config, d_model: int) -> nn.Module:
    router = config.router
    if router in ("softmax_topk", "compete"):
        return SoftmaxTopK(d_model, config.n_experts, config.top_k, config.renormalize)
    if router == "topk_softmax":
        return TopKSoftmax(d_model, config.n_experts, config.top_k)
    if router == "sigmoid_bias":
        return SigmoidBias(d_model, config.n_experts, config.top_k, config.n_groups, config.topk_groups)
    if router == "hash":
        return HashRouter(config.n_experts, config.hash_vocab_size, config.hash_seed)
    raise ValueError(f"unknown router {router!r}; choose one of softmax_topk, topk_softmax, sigmoid_bias, hash, compete")
