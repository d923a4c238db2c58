"""Each router's selection and weights against a plain-Python recomputation of its formula
(models/ffn/moe/routers.py, docs/moe.md), on fp64 copies of its logits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.context import ForwardContext
from models.ffn.moe import MoEConfig
from models.ffn.moe.balancing import compete_loss
from models.ffn.moe.layer import MoE
from models.ffn.moe.routers import hash_table

D, E, T = 16, 8, 40
IDENTITY = lambda t, op="sum": t  # noqa: E731


def layer(**fields) -> MoE:
    torch.manual_seed(0)
    module = MoE(MoEConfig(n_experts=E, d_ff=8, **fields), D)
    module.init_weights(0.5, 0.3)
    return module


def plain_logits(module: MoE, x: torch.Tensor) -> list[list[float]]:
    weight = module.routed.router.gate.weight.detach().double()
    return (x.double() @ weight.t()).tolist()


def top(values: list[float], k: int, allowed=None) -> list[int]:
    """Indices of the k largest values, ties to the lower index."""
    candidates = [i for i in range(len(values)) if allowed is None or i in allowed]
    return sorted(candidates, key=lambda i: (-values[i], i))[:k]


def softmax(values: list[float]) -> list[float]:
    m = max(values)
    exps = [math.exp(v - m) for v in values]
    return [e / sum(exps) for e in exps]


def check(routing, expected_experts: list[list[int]], expected_weights: list[list[float]]) -> None:
    assert routing.experts.tolist() == expected_experts
    torch.testing.assert_close(routing.weights.double(), torch.tensor(expected_weights, dtype=torch.float64), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("renormalize", [True, False])
def test_softmax_topk(renormalize):
    module = layer(top_k=3, router="softmax_topk", renormalize=renormalize)
    x = torch.randn(T, D)
    experts, weights = [], []
    for logits in plain_logits(module, x):
        p = softmax(logits)
        chosen = top(p, 3)
        w = [p[i] for i in chosen]
        experts.append(chosen)
        weights.append([v / sum(w) for v in w] if renormalize else w)
    routing = module.routed.router(x)
    check(routing, experts, weights)
    torch.testing.assert_close(routing.probs.double(), torch.tensor([softmax(l) for l in plain_logits(module, x)], dtype=torch.float64), atol=1e-6, rtol=1e-5)


def test_topk_softmax():
    module = layer(top_k=2, router="topk_softmax")
    x = torch.randn(T, D)
    experts, weights = [], []
    for logits in plain_logits(module, x):
        chosen = top(logits, 2)
        experts.append(chosen)
        weights.append(softmax([logits[i] for i in chosen]))
    check(module.routed.router(x), experts, weights)


@pytest.mark.parametrize("groups", [(1, 1), (4, 2), (4, 1)])
def test_sigmoid_bias_selects_by_biased_scores_and_weights_by_unbiased(groups):
    n_groups, topk_groups = groups
    module = layer(top_k=2, router="sigmoid_bias", n_groups=n_groups, topk_groups=topk_groups)
    bias = torch.linspace(-0.3, 0.3, E)[torch.randperm(E, generator=torch.Generator().manual_seed(1))]
    module.routed.router.bias.copy_(bias)
    x = torch.randn(T, D)
    size = E // n_groups
    experts, weights = [], []
    for logits in plain_logits(module, x):
        s = [1 / (1 + math.exp(-v)) for v in logits]
        biased = [si + float(bi) for si, bi in zip(s, bias)]
        allowed = None
        if n_groups > 1:
            scores = [sum(sorted(biased[g * size : (g + 1) * size], reverse=True)[:2]) for g in range(n_groups)]
            allowed = {g * size + j for g in top(scores, topk_groups) for j in range(size)}
        chosen = top(biased, 2, allowed)
        experts.append(chosen)
        weights.append([s[i] / sum(s[j] for j in chosen) for i in chosen])
    check(module.routed.router(x), experts, weights)


def test_hash_router_is_a_balanced_seeded_map_of_token_ids():
    vocab = 103
    module = layer(top_k=1, router="hash", hash_vocab_size=vocab, hash_seed=7, aux_loss_coef=0, z_loss_coef=0)
    table = module.routed.router.table
    order = torch.randperm(vocab, generator=torch.Generator().manual_seed(7)).tolist()
    by_hand = [0] * vocab
    for position, token in enumerate(order):  # the permutation cut into E consecutive groups
        by_hand[token] = position * E // vocab
    assert table.tolist() == by_hand
    sizes = torch.bincount(table, minlength=E).tolist()
    assert set(sizes) <= {vocab // E, vocab // E + 1} and sum(sizes) == vocab
    assert torch.equal(hash_table(vocab, E, 7), table) and not torch.equal(hash_table(vocab, E, 8), table)
    assert list(module.routed.router.parameters()) == [] and "routed.router.table" not in module.state_dict()
    # the layer: each token through expert table[id] with weight 1, by plain products
    ids = torch.randint(0, vocab, (2, 10))
    x = torch.randn(2, 10, D)
    out = module(x, ForwardContext(token_ids=ids))
    ex = module.routed.experts
    for b in range(2):
        for t in range(10):
            e = int(by_hand[int(ids[b, t])])
            ref = ex.w2[e] @ (F.silu(ex.w1[e] @ x[b, t]) * (ex.w3[e] @ x[b, t]))
            torch.testing.assert_close(out[b, t], ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="router hash needs the token ids: the family must put them in the forward context"):
        module(x)
    with pytest.raises(ValueError, match="set hash_vocab_size to model.vocab_size"):
        module(x, ForwardContext(token_ids=ids + vocab))
    fresh = layer(top_k=1, router="hash", hash_vocab_size=vocab, hash_seed=7, aux_loss_coef=0, z_loss_coef=0)
    fresh.routed.router.table.zero_()
    fresh.init_weights(0.5, 0.3)  # rebuilt (what a model built on the meta device relies on)
    assert torch.equal(fresh.routed.router.table, table)


def test_compete_routes_by_expert_output_norms_on_scheduled_steps():
    module = layer(top_k=2, router="compete", compete_every=2, compete_loss_coef=5.0, aux_loss_coef=0, z_loss_coef=0)
    x = torch.randn(1, 12, D)
    flat = x[0]
    ex = module.routed.experts
    outputs = [[ex.w2[e] @ (F.silu(ex.w1[e] @ row) * (ex.w3[e] @ row)) for e in range(E)] for row in flat]
    norms = [[float(o.detach().double().norm()) for o in row] for row in outputs]
    expected, chosen_all = [], []
    for t in range(12):
        chosen = top(norms[t], 2)
        w = softmax([norms[t][i] for i in chosen])
        expected.append(sum(wi * outputs[t][i] for wi, i in zip(w, chosen)))
        chosen_all.append(chosen)
    # step 0 competes: the output is the competition's mixture
    out = module(x)
    torch.testing.assert_close(out[0], torch.stack(expected).detach(), atol=1e-5, rtol=1e-5)
    # its router loss: 5 · MSE(router softmax, softmax of the norms masked to each token's top-k)
    probs = [softmax(l) for l in plain_logits(module, flat)]
    target = []
    for t in range(12):
        masked = [norms[t][i] if i in chosen_all[t] else -math.inf for i in range(E)]
        m = max(masked)
        exps = [math.exp(v - m) if v != -math.inf else 0.0 for v in masked]
        target.append([e / sum(exps) for e in exps])
    mse = sum((p - q) ** 2 for pr, tr in zip(probs, target) for p, q in zip(pr, tr)) / (12 * E)
    module.routed.post_step(IDENTITY)  # step 1 next: the router routes (softmax_topk, renormalised)
    assert module.routed.step_metrics(IDENTITY)["compete_loss"] == pytest.approx(5.0 * mse, rel=1e-5)
    out = module(x)
    routed = []
    for t, logits in enumerate(plain_logits(module, flat)):
        p = softmax(logits)
        chosen = top(p, 2)
        routed.append(sum(p[i] / sum(p[j] for j in chosen) * outputs[t][i] for i in chosen))
    torch.testing.assert_close(out[0], torch.stack(routed).detach(), atol=1e-5, rtol=1e-5)
    module.routed.post_step(IDENTITY)
    assert int(module.routed.steps) == 2 and "routed.steps" in module.state_dict()
    module.eval()  # evaluation never competes
    torch.testing.assert_close(module(x)[0], torch.stack(routed).detach(), atol=1e-5, rtol=1e-5)


def test_compete_loss_trains_the_router_only():
    response = torch.rand(5, E, requires_grad=True)
    logits = torch.randn(5, E, requires_grad=True)
    compete_loss(torch.softmax(logits, -1), response, 2).backward()
    assert response.grad is None and logits.grad.abs().sum() > 0
