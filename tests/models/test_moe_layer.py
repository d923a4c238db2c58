"""The MoE layer (models/ffn/moe) against independent references: a dense SwiGLU, per-token
matrix products, a plain-Python capacity rule, the Switch and z-loss formulas written out, and a
skewed router balanced by the auxiliary-loss-free bias."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.ffn.moe import MoEConfig
from models.ffn.moe.dispatch import combine, dispatch, expert_capacity, plan_dispatch
from models.ffn.moe.experts import GroupedExperts, grouped_mm_supported
from models.ffn.moe.layer import MoE
from models.ffn.swiglu import SwiGLU

IDENTITY = lambda t, op="sum": t  # noqa: E731  (the reduce of one data-parallel rank)


def moe(d: int = 32, **fields) -> MoE:
    torch.manual_seed(0)
    layer = MoE(MoEConfig(**fields), d)
    layer.init_weights(0.3, 0.2)
    return layer


def swiglu_rows(x: torch.Tensor, w1, w3, w2) -> torch.Tensor:
    """One SwiGLU, row by row with plain products (the reference for the experts)."""
    return torch.stack([w2 @ (F.silu(w1 @ row) * (w3 @ row)) for row in x])


# --------------------------------------------------------------------------- experts


@pytest.mark.parametrize("grouped", [True, False])
def test_one_expert_top1_without_shared_is_the_dense_swiglu_exactly(grouped):
    d, f = 64, 96
    torch.manual_seed(0)
    dense = SwiGLU(d, f)
    dense.init_weights(0.02, 0.01)
    layer = MoE(MoEConfig(n_experts=1, top_k=1, d_ff=f, grouped_gemm=grouped), d)
    layer.init_weights(0.02, 0.01)
    with torch.no_grad():
        for name in ("w1", "w2", "w3"):
            getattr(layer.routed.experts, name)[0] = getattr(dense, name).weight
    x = torch.randn(3, 17, d)
    assert torch.equal(layer(x), dense(x))


def test_grouped_gemm_equals_the_loop_and_per_token_products_with_empty_experts():
    torch.manual_seed(1)
    n_experts, d, f = 6, 16, 24
    counts = torch.tensor([3, 0, 5, 0, 2, 0])
    x = torch.randn(int(counts.sum()), d)
    grads = torch.randn(int(counts.sum()), d)
    results = {}
    for grouped in (True, False):
        torch.manual_seed(2)
        experts = GroupedExperts(n_experts, d, f, grouped_gemm=grouped)
        experts.init_weights(0.3, 0.3)
        rows = x.clone().requires_grad_()
        assert grouped_mm_supported(rows, experts.w1, experts.w3, experts.w2)
        out = experts(rows, counts=counts)
        out.backward(grads)
        results[grouped] = (out.detach(), rows.grad, *(p.grad for p in (experts.w1, experts.w3, experts.w2)))
    # independent reference: each row through its expert's weights, plain products
    experts.zero_grad()
    rows = x.clone().requires_grad_()
    owner = torch.repeat_interleave(torch.arange(n_experts), counts)
    ref = torch.stack([swiglu_rows(rows[i : i + 1], experts.w1[e], experts.w3[e], experts.w2[e])[0] for i, e in enumerate(owner.tolist())])
    ref.backward(grads)
    reference = (ref.detach(), rows.grad, experts.w1.grad, experts.w3.grad, experts.w2.grad)
    for grouped, got in results.items():
        for a, b, name in zip(got, reference, ("out", "dx", "dw1", "dw3", "dw2")):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"grouped={grouped} {name}")
    for e in (1, 3, 5):  # experts without tokens get zero gradients, not garbage
        for grad in results[True][2:]:
            assert torch.equal(grad[e], torch.zeros_like(grad[e]))
    for a, b in zip(results[True], results[False]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="torch._grouped_mm runs on CUDA from compute capability 9.0 (Hopper)")
def test_grouped_gemm_on_gpu_in_bf16_equals_the_fp64_loop_on_cpu():
    torch.manual_seed(3)
    n_experts, d, f = 8, 256, 512
    counts = torch.tensor([64, 0, 200, 8, 0, 120, 1, 47])
    x = torch.randn(int(counts.sum()), d)
    grads = torch.randn(int(counts.sum()), d)
    experts = GroupedExperts(n_experts, d, f, grouped_gemm=True)
    experts.init_weights(0.05, 0.05)
    results = {}
    for device, dtype in (("cuda", torch.bfloat16), ("cpu", torch.float64)):
        model = GroupedExperts(n_experts, d, f, grouped_gemm=device == "cuda").to(device, dtype)
        model.load_state_dict({k: v.to(device, dtype) for k, v in experts.state_dict().items()})
        rows = x.to(device, dtype).requires_grad_()
        if device == "cuda":
            assert grouped_mm_supported(rows, model.w1, model.w3, model.w2)
        out = model(rows, counts=counts.to(device))
        out.backward(grads.to(device, dtype))
        results[device] = [t.double().cpu() for t in (out, rows.grad, model.w1.grad, model.w3.grad, model.w2.grad)]
    for a, b, name in zip(results["cuda"], results["cpu"], ("out", "dx", "dw1", "dw3", "dw2")):
        scale = b.abs().max().item()
        assert (a - b).abs().max().item() <= 2e-2 * scale, name  # bf16 operands, fp32 accumulation
    for grad in results["cuda"][2:]:
        assert torch.equal(grad[1], torch.zeros_like(grad[1])) and torch.equal(grad[4], torch.zeros_like(grad[4]))


def test_grouped_gemm_support_check():
    w = torch.zeros(2, 8, 4)
    assert grouped_mm_supported(torch.zeros(3, 4), w, w)
    assert not grouped_mm_supported(torch.zeros(3, 4, dtype=torch.float64), w.double(), w.double())  # dtype
    assert not grouped_mm_supported(torch.zeros(3, 2), torch.zeros(2, 8, 2))  # 8-byte rows
    assert not grouped_mm_supported(torch.zeros(3, 4, dtype=torch.bfloat16), w)  # mixed dtypes


# --------------------------------------------------------------------------- dispatch


def test_dispatch_then_combine_round_trips_tokens_in_order():
    torch.manual_seed(3)
    tokens, k, n_experts, d = 37, 3, 5, 8
    x = torch.randn(tokens, d)
    experts = torch.stack([torch.randperm(n_experts)[:k] for _ in range(tokens)])
    plan = plan_dispatch(experts, torch.rand(tokens, k), n_experts, capacity=None)
    grouped = dispatch(x, plan)
    assert torch.equal(experts.reshape(-1)[plan.order], experts.reshape(-1)[plan.order].sort().values)  # by expert
    assert torch.equal(plan.counts, torch.bincount(experts.reshape(-1), minlength=n_experts))
    assert torch.allclose(combine(grouped, torch.full((tokens, k), 1 / k), plan), x, atol=1e-6)
    one = plan_dispatch(experts[:, :1], torch.ones(tokens, 1), n_experts, capacity=None)
    assert torch.equal(combine(dispatch(x, one), torch.ones(tokens, 1), one), x)


@pytest.mark.parametrize("capacity", [None, 9])
def test_dispatch_and_combine_gradients_match_finite_differences(capacity):
    """The gathers' hand-written backward (dropless: by the inverse permutation) and the
    capacity path's index_copy, against numerical derivatives in fp64."""
    torch.manual_seed(5)
    tokens, k, n_experts, d = 13, 3, 4, 5
    experts = torch.stack([torch.randperm(n_experts)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, dtype=torch.float64)
    plan = plan_dispatch(experts, weights, n_experts, capacity)
    assert (plan.inverse is None) == (int(plan.dropped) > 0) == (capacity is not None)
    scale = torch.randn(plan.order.numel(), d, dtype=torch.float64)  # a different map per grouped row

    def layer(x, w):
        return combine(torch.tanh(dispatch(x, plan) * scale), w, plan)

    x = torch.randn(tokens, d, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x, weights.clone().requires_grad_()))


def capacity_reference(experts: list[list[int]], weights: list[list[float]], n_experts: int, capacity: int) -> set:
    """The documented rule by hand: per expert, its assignments (t, j) ordered by decreasing
    weight, ties by t·k + j; the first ``capacity`` are kept."""
    k = len(experts[0])
    kept = set()
    for e in range(n_experts):
        mine = [(weights[t][j], t * k + j) for t in range(len(experts)) for j in range(k) if experts[t][j] == e]
        mine.sort(key=lambda item: (-item[0], item[1]))
        kept.update(a for _, a in mine[:capacity])
    return kept


def test_capacity_keeps_the_documented_assignments():
    torch.manual_seed(4)
    tokens, k, n_experts = 50, 2, 4
    logits = torch.randn(tokens, n_experts) + torch.tensor([1.5, 0.5, 0.0, -1.0])  # skewed: drops happen
    weights, experts = torch.softmax(logits, -1).topk(k, dim=-1)
    weights = (weights * 4).round() / 4  # coarse weights: many ties, broken by the assignment number
    capacity = expert_capacity(tokens, k, n_experts, 1.0)
    assert capacity == math.ceil(tokens * k / n_experts * 1.0) == 25
    plan = plan_dispatch(experts, weights, n_experts, capacity)
    expected = capacity_reference(experts.tolist(), weights.tolist(), n_experts, capacity)
    assert set(plan.order.tolist()) == expected
    assert int(plan.dropped) == tokens * k - len(expected) > 0
    assert torch.equal(plan.counts, torch.bincount(experts.reshape(-1)[plan.order], minlength=n_experts))


def test_dropped_assignments_contribute_nothing():
    """Through the layer with capacity: each token's output is the weighted sum of its kept
    experts only, each computed by plain products."""
    layer = moe(d=16, n_experts=4, top_k=2, d_ff=8, capacity_factor=0.5, aux_loss_coef=0, z_loss_coef=0)
    x = torch.randn(2, 10, 16)
    flat = x.reshape(-1, 16)
    routing = layer.routed.router(flat)
    capacity = math.ceil(20 * 2 / 4 * 0.5)
    kept = capacity_reference(routing.experts.tolist(), routing.weights.tolist(), 4, capacity)
    ex = layer.routed.experts
    expected = torch.zeros_like(flat)
    for a in kept:
        t, j = divmod(a, 2)
        e = int(routing.experts[t, j])
        expected[t] += routing.weights[t, j].detach() * swiglu_rows(flat[t : t + 1], ex.w1[e], ex.w3[e], ex.w2[e])[0].detach()
    torch.testing.assert_close(layer(x).detach().reshape(-1, 16), expected, atol=1e-5, rtol=1e-5)
    layer.routed.post_step(IDENTITY)
    assert layer.routed.step_metrics(IDENTITY)["dropped"] == pytest.approx(1 - len(kept) / 40)


# --------------------------------------------------------------------------- balancing


def test_uniform_router_gives_switch_loss_alpha_and_z_loss_c_ln_e_squared():
    alpha, c, n_experts = 0.03, 0.002, 8
    layer = moe(d=16, n_experts=n_experts, top_k=2, d_ff=8, aux_loss_coef=alpha, z_loss_coef=c)
    with torch.no_grad():
        layer.routed.router.gate.weight.zero_()  # all logits 0: probabilities exactly 1/E
    x = torch.randn(3, 8, 16, requires_grad=True)
    layer(x).sum().backward()
    layer.routed.post_step(IDENTITY)
    metrics = layer.routed.step_metrics(IDENTITY)
    assert metrics["aux_loss"] == pytest.approx(alpha, rel=1e-6)
    assert metrics["z_loss"] == pytest.approx(c * math.log(n_experts) ** 2, rel=1e-6)


@pytest.mark.parametrize("scope", ["batch", "sequence"])
def test_switch_loss_and_its_gradient_equal_the_formula(scope):
    """α·E·Σ f_i·P_i written out (per sequence, averaged, for the sequence scope), and its
    gradient reaching the router through attach_aux_loss with the module's aux_loss_scale."""
    alpha, n_experts, k, batch, seq = 0.1, 4, 2, 3, 5
    layer = moe(d=16, n_experts=n_experts, top_k=k, d_ff=8, aux_loss_coef=alpha, z_loss_coef=0, aux_loss_scope=scope)
    layer.routed.aux_loss_scale = 0.25
    x = torch.randn(batch, seq, 16)
    layer(x).sum().backward()
    got = layer.routed.router.gate.weight.grad.clone()
    layer.routed.post_step(IDENTITY)
    measured = layer.routed.step_metrics(IDENTITY)["aux_loss"]

    weight = layer.routed.router.gate.weight.detach().clone().requires_grad_()
    probs = torch.softmax(x.reshape(-1, 16) @ weight.t(), -1)
    chosen = probs.topk(k, -1).indices
    groups = [range(batch * seq)] if scope == "batch" else [range(b * seq, (b + 1) * seq) for b in range(batch)]
    terms = []
    for rows in groups:
        rows = list(rows)
        f = [sum(int(e) == i for t in rows for e in chosen[t]) / (len(rows) * k) for i in range(n_experts)]
        p = [probs[rows, i].mean() for i in range(n_experts)]
        terms.append(alpha * n_experts * sum(fi * pi for fi, pi in zip(f, p)))
    loss = sum(terms) / len(terms)
    assert measured == pytest.approx(float(loss.detach()), rel=1e-6)
    # the layer's output gradient path, and 0.25 · the loss's gradient
    weights = probs.topk(k, -1).values
    weights = weights / weights.sum(-1, keepdim=True)
    ex = layer.routed.experts
    outs = torch.stack([
        sum(weights[t, j] * swiglu_rows(x.reshape(-1, 16)[t : t + 1], ex.w1[e], ex.w3[e], ex.w2[e])[0] for j, e in enumerate(chosen[t].tolist()))
        for t in range(batch * seq)
    ])
    (outs.sum() + 0.25 * loss).backward()
    torch.testing.assert_close(got, weight.grad, atol=1e-5, rtol=1e-5)


def test_aux_loss_free_bias_balances_a_skewed_router_and_is_saved():
    d, n_experts = 16, 8
    fields = dict(n_experts=n_experts, top_k=2, d_ff=8, router="sigmoid_bias", aux_loss_coef=0, z_loss_coef=0)

    def run(rate: float) -> tuple[MoE, list[dict]]:
        layer = moe(d=d, bias_update_rate=rate, **fields)
        with torch.no_grad():  # feature 0 is constant 1: a fixed skew towards the first experts
            layer.routed.router.gate.weight[:, 0] = torch.linspace(2.0, -2.0, n_experts)
        torch.manual_seed(5)
        history = []
        for _ in range(50):
            x = torch.randn(1, 512, d)
            x[..., 0] = 1.0
            layer(x)  # a training forward (statistics), then the post-step hook (bias update)
            layer.routed.post_step(IDENTITY)
            history.append(layer.routed.step_metrics(IDENTITY))
        return layer, history

    _, fixed = run(0.0)
    layer, history = run(1e-2)
    mean = lambda records: sum(m["max_load"] for m in records) / len(records)  # noqa: E731
    assert mean(fixed[-5:]) > 2.5 and mean(history[:5]) > 2.5
    assert mean(history[-5:]) < 1.3, [round(m["max_load"], 2) for m in history]
    bias = layer.routed.router.bias
    assert bias.dtype == torch.float32 and not bias.requires_grad
    assert bias[0] < 0 < bias[-1] and history[-1]["bias_range"] == pytest.approx(float(bias.max() - bias.min()))
    state = layer.state_dict()
    assert "routed.router.bias" in state and "routed._stats" not in state
    fresh = moe(d=d, bias_update_rate=1e-2, **fields)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.routed.router.bias, bias)


def test_bias_update_is_the_sign_rule():
    """One update from known loads, summed over two (simulated) data-parallel ranks."""
    layer = moe(d=8, n_experts=4, top_k=1, d_ff=8, router="sigmoid_bias", bias_update_rate=0.5, aux_loss_coef=0, z_loss_coef=0)
    layer.routed._stats[:4] = torch.tensor([6.0, 1.0, 3.0, 2.0], dtype=torch.float64)
    layer.routed._stats[-1] = 1
    layer.routed.post_step(lambda t, op="sum": t.mul_(2))  # the other rank saw the same loads
    # mean load 6 (of 12, 2, 6, 4): b += 0.5 · sign(6 − load)
    assert layer.routed.router.bias.tolist() == [-0.5, 0.5, 0.0, 0.5]
    metrics = layer.routed.step_metrics(IDENTITY)
    assert metrics["max_load"] == 2.0 and metrics["min_load"] == pytest.approx(1 / 3)


def test_statistics_ignore_evaluation_and_are_ratios_under_recomputation():
    layer = moe(d=16, n_experts=4, top_k=2, d_ff=8)
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        layer(x)
    layer.routed.post_step(IDENTITY)
    assert layer.routed.step_metrics(IDENTITY) == {}
    layer(x)
    layer.routed.post_step(IDENTITY)
    once = layer.routed.step_metrics(IDENTITY)
    layer(x)
    layer(x)  # the same micro-batch counted twice (as a recomputed forward would be)
    layer.routed.post_step(IDENTITY)
    assert layer.routed.step_metrics(IDENTITY) == pytest.approx(once)


def test_under_bf16_autocast_router_logits_stay_fp32_and_both_expert_paths_agree():
    outputs = {}
    for grouped in (True, False):
        layer = moe(d=16, n_experts=4, top_k=2, d_ff=16, grouped_gemm=grouped)
        x = torch.randn(2, 8, 16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer.routed.router.gate(x).dtype == torch.float32
            outputs[grouped] = layer(x)
    assert outputs[True].dtype == outputs[False].dtype == torch.bfloat16
    torch.testing.assert_close(outputs[True], outputs[False], atol=2e-2, rtol=2e-2)
