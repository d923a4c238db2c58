"""Ladder invariants: divisibility, aspect ratios, size near the target, OLMo's recipe anchors,
FLOP budgets respected, and run overrides the trainer's config accepts."""

from __future__ import annotations

import math

import pytest
import torch

from models.attention.layer import AttentionConfig
from models.counting import param_counts
from models.ffn.swiglu import SwiGLUConfig
from models.spec import build_model
from pretrain.config import load_config
from tools.scaling.ladder import (
    LadderSettings, budget_run, compute_optimal_params, isoflop_grid, make_run, olmo_batch_sequences, olmo_lr,
    shape_for_params, size_ladder,
)

SETTINGS = [
    LadderSettings(vocab_size=4096, seq_len=256, head_dim=16, aspect=32),
    LadderSettings(vocab_size=32000, seq_len=2048, head_dim=64, kv_ratio=4, tp=2),
    LadderSettings(vocab_size=50304, seq_len=2048, head_dim=128, kv_ratio=1, tp=8, aspect=128),
]
TARGETS = {0: [3e5, 1e6, 4e6, 2e7], 1: [3e7, 1.5e8, 7e8], 2: [1e9, 3e9, 13e9]}


def _formula_non_embedding(d: int, layers: int, d_ff: int, s: LadderSettings) -> int:
    """Non-embedding parameters of a Llama-style decoder, written out: per block q and o
    (d × heads·head_dim each), k and v (d × kv_heads·head_dim each), SwiGLU (3·d·d_ff) and two
    RMSNorm gains; then the final norm and an untied head."""
    heads = d // s.head_dim
    kv_heads = heads // s.kv_ratio
    block = 2 * d * heads * s.head_dim + 2 * d * kv_heads * s.head_dim + 3 * d * d_ff + 2 * d
    return layers * block + d + (0 if s.tie_embeddings else s.vocab_size * d)


def _ffn_width(d: int, s: LadderSettings) -> int:
    return math.ceil(s.ffn_ratio * d / (s.ffn_multiple * s.tp)) * s.ffn_multiple * s.tp


def _nearest_error(target: float, s: LadderSettings) -> float:
    """|ln(N/target)| of the best shape allowed at all, by brute force over depth and width."""
    unit, best = s.head_dim * s.kv_ratio * s.tp, math.inf
    for layers in range(s.min_layers, s.max_layers + 1):
        for d in range(unit, int(s.aspect_range[1] * layers) + 1, unit):
            if d / layers < s.aspect_range[0]:
                continue
            n = _formula_non_embedding(d, layers, _ffn_width(d, s), s)
            best = min(best, abs(math.log(n / target)))
            if n > 2 * target:
                break
    return best


@pytest.mark.parametrize("index", range(len(SETTINGS)))
def test_shapes_satisfy_the_invariants(index):
    s = SETTINGS[index]
    within = 0
    for target in TARGETS[index]:
        c = shape_for_params(target, s)
        mixer, ffn = c.mixer, c.ffn
        assert isinstance(mixer, AttentionConfig) and isinstance(ffn, SwiGLUConfig) and not c.layer_overrides
        assert c.d_model % (s.head_dim * s.kv_ratio * s.tp) == 0
        assert mixer.n_heads * s.head_dim == c.d_model and mixer.n_heads % s.tp == 0
        assert mixer.n_kv_heads % s.tp == 0 and mixer.n_heads == s.kv_ratio * mixer.n_kv_heads
        assert ffn.d_ff % (s.ffn_multiple * s.tp) == 0 and ffn.d_ff >= s.ffn_ratio * c.d_model
        assert s.aspect_range[0] <= c.d_model / c.n_layers <= s.aspect_range[1]
        n = param_counts(c).non_embedding
        assert n == _formula_non_embedding(c.d_model, c.n_layers, ffn.d_ff, s)
        nearest = _nearest_error(target, s)
        assert abs(math.log(n / target)) <= max(math.log1p(s.size_tolerance), nearest) + 1e-12, (target, n, c)
        within += abs(n / target - 1) <= s.size_tolerance
        with torch.device("meta"):
            model = build_model(c)
        assert n == sum(p.numel() for p in model.parameters()) - model.embed.weight.numel()
    assert within >= len(TARGETS[index]) - 1


def test_aspect_preference_among_near_sizes():
    """With a loose size tolerance, the ladder prefers the requested aspect ratio."""
    wide = shape_for_params(2e6, LadderSettings(head_dim=16, aspect=128, size_tolerance=0.15))
    deep = shape_for_params(2e6, LadderSettings(head_dim=16, aspect=16, size_tolerance=0.15))
    assert wide.d_model / wide.n_layers > 2 * (deep.d_model / deep.n_layers)


def test_impossible_requests_fail_clearly():
    with pytest.raises(ValueError, match="no shape within a factor 2"):
        shape_for_params(1e4, LadderSettings(head_dim=16))
    with pytest.raises(ValueError, match="must divide by tp"):
        shape_for_params(1e6, LadderSettings(vocab_size=4097, tp=2))
    with pytest.raises(ValueError, match="multiple of micro_batch"):
        shape_for_params(1e6, LadderSettings(batch_multiple=12, micro_batch=8))


def test_olmo_rule_anchors():
    """At OLMo's reference size the rule gives its published 160 × 2048-token batch and lr 0.0047;
    8× the parameters gives 4× the batch and half the rate."""
    s = LadderSettings(seq_len=2048, batch_multiple=32)
    assert olmo_batch_sequences(108e6, s) == 160
    assert olmo_lr(108e6) == pytest.approx(0.0047)
    assert olmo_batch_sequences(8 * 108e6, s) == 640
    assert olmo_lr(8 * 108e6) == pytest.approx(0.0047 / 2)
    # Our sequence length: the same tokens per batch, in more, shorter sequences.
    assert olmo_batch_sequences(108e6, LadderSettings(seq_len=512, batch_multiple=32)) == 640
    assert olmo_batch_sequences(1e3, s) == 32  # never below one multiple


def test_run_recipe():
    s = LadderSettings(seq_len=2048, head_dim=64, micro_batch=8)
    config = shape_for_params(1.5e8, s)
    n = param_counts(config).non_embedding
    run = make_run(config, 20 * n, s)
    assert run.tokens == run.max_steps * run.global_batch * 2048
    assert abs(run.tokens / (20 * n) - 1) <= 0.5 / run.max_steps
    assert run.warmup_steps == math.ceil(n / (run.global_batch * 2048))  # warmup = N tokens
    assert run.lr == pytest.approx(0.0047 * (n / 108e6) ** (-1 / 3))
    overrides = run.overrides("runs/x")
    assert "schedule.min_lr_ratio=0.01" in overrides and "optim.weight_decay=0.05" in overrides
    assert f"train.eval_interval={run.max_steps}" in overrides


def test_isoflop_grid_spends_each_budget():
    s = LadderSettings(head_dim=16, aspect=32, batch_multiple=8)
    budgets = [3e13, 1e14]
    runs = isoflop_grid(budgets, 4, 3.0, s)
    for budget in budgets:
        group = [r for r in runs if r.budget == budget]
        assert len(group) == 4
        sizes = [r.n for r in group]
        assert sizes == sorted(sizes) and len(set(sizes)) == 4
        centre = compute_optimal_params(budget)
        assert sizes[0] < centre < sizes[-1]
        for run in group:
            assert run.max_steps >= s.min_steps
            assert abs(6 * run.n * run.tokens / budget - 1) <= 0.5 / run.max_steps + 1e-12
            assert run.flops == 6 * run.n * run.tokens


def test_size_ladder_and_budget_run():
    s = LadderSettings(head_dim=16, aspect=32, batch_multiple=8)
    runs = size_ladder([5e5, 2e6], [0.5, 1, 2], s)
    assert len(runs) == 6
    for run in runs:
        multiple = float(run.name.split("_x")[1])
        assert abs(run.tokens / (multiple * 20 * run.n) - 1) <= 0.5 / run.max_steps
    one = budget_run(1e14, s)
    assert abs(one.n / compute_optimal_params(1e14) - 1) <= s.size_tolerance
    assert abs(one.flops / 1e14 - 1) <= 0.5 / one.max_steps


def test_overrides_are_a_valid_trainer_config():
    s = LadderSettings(head_dim=16, aspect=32, batch_multiple=8, extra=["train.eval_batches=3"])
    for run in isoflop_grid([3e13], 3, 3.0, s):
        config = load_config("tiny", run.overrides("runs/check"))
        assert config.model.d_model == run.model["d_model"] and config.train.max_steps == run.max_steps
        assert config.model.mixer.n_heads == run.model["n_heads"] and config.model.ffn.d_ff == run.model["d_ff"]
        assert config.model.mixer.n_kv_heads == run.model["n_kv_heads"]
        assert config.train.eval_batches == 3 and config.data.allow_repeat
        assert param_counts(config.model).non_embedding == run.n
