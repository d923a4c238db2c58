"""The ``matformer`` FFN kind against independent references: a plain ``swiglu`` decoder with
the same weights, the extracted dense model, hand-sliced weight gradients, and the parameter
formula full − Σ 3·d·(d_ff − m_l)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from models.attention.layer import AttentionConfig
from models.counting import param_counts, training_flops_per_token
from models.decoder.config import DecoderConfig
from models.ffn.matformer import MatFormerConfig, interleave_perm, set_granularity
from models.ffn.matformer.extract import extract_config, extract_state_dict, per_layer_widths
from models.ffn.swiglu import SwiGLUConfig
from models.loss import language_model_loss
from models.passes import Pass, eval_passes, train_passes
from models.spec import build_model

GRANULARITIES = [16, 32, 64, 128]


def config(tp_interleave: int = 1, **ffn) -> DecoderConfig:
    return DecoderConfig(
        vocab_size=97, d_model=32, n_layers=3, max_seq_len=16, mixer=AttentionConfig(n_heads=4, n_kv_heads=2),
        ffn=MatFormerConfig(d_ff=128, granularities=GRANULARITIES, tp_interleave=tp_interleave, **ffn),
    )


def model_of(cfg, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(cfg).eval()


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_every_granularity_is_a_prefix_of_every_tp_shard(tp):
    perm = interleave_perm(GRANULARITIES, tp)
    assert sorted(perm.tolist()) == list(range(128))
    shard = 128 // tp
    for g in GRANULARITIES:
        held = [set(perm[r * shard : r * shard + g // tp].tolist()) for r in range(tp)]
        assert set().union(*held) == set(range(g)), g


@pytest.mark.parametrize("tp_interleave", [1, 2])
def test_full_width_is_the_plain_decoder_bit_for_bit(tp_interleave):
    matformer = model_of(config(tp_interleave))
    plain = build_model(dataclasses.replace(matformer.config, ffn=SwiGLUConfig(d_ff=128))).eval()
    plain.load_state_dict(matformer.state_dict())
    x = tokens()
    assert torch.equal(matformer(x), plain(x))


@pytest.mark.parametrize("tp_interleave", [1, 2])
@pytest.mark.parametrize("widths", [[16, 16, 16], [32, 32, 32], [64, 64, 64], [16, 32, 64], [64, 16, 128]])
def test_narrowed_forward_equals_the_extracted_model_exactly(tp_interleave, widths):
    matformer = model_of(config(tp_interleave))
    cfg = extract_config(matformer.config, widths)
    assert [f.d_ff for f in cfg.layers().ffns] == widths and all(f.kind == "swiglu" for f in cfg.layers().ffns)
    dense = build_model(cfg).eval()
    dense.load_state_dict(extract_state_dict(matformer, widths))
    set_granularity(matformer, widths)
    x = tokens()
    if tp_interleave == 1 or max(widths) < 128:
        assert torch.equal(matformer(x), dense(x))
    else:  # a full-width layer keeps the stored (interleaved) order: same units, another sum order
        torch.testing.assert_close(matformer(x), dense(x), rtol=0, atol=1e-6)


def test_extracted_parameter_count_formula():
    cfg = config()
    full = param_counts(cfg).total
    for widths in ([16, 16, 16], [16, 64, 128], [128, 128, 128]):
        expected = full - sum(3 * cfg.d_model * (128 - m) for m in widths)
        assert param_counts(extract_config(cfg, widths)).total == expected


def test_flops_at_each_width_count_only_the_active_units():
    cfg, seq = config(), 16
    full = training_flops_per_token(cfg, seq)
    for level, m in enumerate(GRANULARITIES):
        assert training_flops_per_token(cfg, seq, level) == full - 3 * 3 * 2 * 3 * cfg.d_model * (128 - m)


def test_flops_of_a_mix_n_match_sub_model():
    """Mix'n'Match (one width per layer): the extracted dense model's training FLOPs are the full
    model's minus 3 (fwd+bwd) · 2 · 3 projections · d · (d_ff − m_l) per layer, and the narrowed
    MatFormer counts the same."""
    from models.counting import build_meta, forward_flops_per_token

    cfg, seq = config(), 16
    full = training_flops_per_token(cfg, seq)
    for widths in ([16, 32, 64], [64, 16, 128], [128, 128, 16]):
        expected = full - sum(3 * 2 * 3 * cfg.d_model * (128 - m) for m in widths)
        assert training_flops_per_token(extract_config(cfg, widths), seq) == expected
        narrowed = build_meta(cfg)
        set_granularity(narrowed, widths)
        assert 3 * forward_flops_per_token(narrowed, seq) == expected


def _loss(model, x):
    logits = model(x)
    return language_model_loss(logits[:, :-1], x[:, 1:], torch.ones_like(x[:, 1:]), normalizer=x[:, 1:].numel())[0]


@pytest.mark.parametrize("tp_interleave", [1, 2])
def test_units_outside_the_width_get_exactly_zero_gradient(tp_interleave):
    model = model_of(config(tp_interleave)).train()
    perm = interleave_perm(GRANULARITIES, tp_interleave)
    x = tokens()
    for m in GRANULARITIES[:-1]:
        model.zero_grad()
        set_granularity(model, m)
        _loss(model, x).backward()
        outside = perm >= m  # stored positions of canonical units >= m
        for block in model.layers.values():
            ffn = block.ffn
            assert ffn.w1.weight.grad[outside].abs().max() == 0 and ffn.w3.weight.grad[outside].abs().max() == 0
            assert ffn.w2.weight.grad[:, outside].abs().max() == 0
            assert ffn.w1.weight.grad[~outside].abs().max() > 0 and ffn.w2.weight.grad[:, ~outside].abs().max() > 0


def test_passes_from_the_config():
    joint = config(loss_weights=[1.0, 0.5, 2.0, 1.0])
    assert train_passes(joint, 7, 0) == tuple(
        Pass(f"m{g}", w, level) for level, (g, w) in enumerate(zip(GRANULARITIES, [1.0, 0.5, 2.0, 1.0]))
    )
    assert [p.name for p in eval_passes(joint)] == [f"m{g}" for g in GRANULARITIES]
    sampled = config(train_mode="sampled")
    draws = [train_passes(sampled, step, 5) for step in range(200)]
    assert all(len(d) == 1 and d[0].weight == 1.0 for d in draws)
    assert draws == [train_passes(sampled, step, 5) for step in range(200)]  # a function of (seed, step)
    assert {d[0].setting for d in draws} == {0, 1, 2, 3}
    assert draws != [train_passes(sampled, step, 6) for step in range(200)]


def test_validation_errors_name_the_field():
    bad = DecoderConfig(ffn=MatFormerConfig(d_ff=128, granularities=[64, 32, 100], tp_interleave=3,
                                            loss_weights=[1.0], train_mode="both"))
    errors = bad.problems()
    text = "\n".join(errors)
    assert "model.ffn.granularities[1] = 32 must exceed the previous one (64)" in text
    assert "model.ffn.granularities must end with d_ff=128, got 100" in text
    assert "model.ffn.train_mode = 'both'" in text
    assert "model.ffn.loss_weights has 1 entries for 3 granularities" in text
    assert "is not divisible by tp_interleave=3" in text
    with pytest.raises(ValueError, match="width 48 is not one of its granularities"):
        per_layer_widths(config(), per_layer=[16, 48, 64])


def test_a_yoco_with_matformer_ffns_extracts_one_width_exactly():
    """YOCO has one FFN config for every block: a uniform width extracts to a dense YOCO equal to
    the narrowed model; per-layer mixes are refused with the way out."""
    from models.yoco import CrossAttentionConfig, YocoConfig

    yoco = YocoConfig(
        vocab_size=97, d_model=32, n_layers=4, max_seq_len=16, mixer=AttentionConfig(n_heads=4, n_kv_heads=2, window=4),
        cross=CrossAttentionConfig(n_heads=4, n_kv_heads=2), ffn=MatFormerConfig(d_ff=128, granularities=GRANULARITIES),
    )
    matformer = model_of(yoco)
    for width in (32, 64):
        dense = build_model(extract_config(yoco, [width] * 4)).eval()
        dense.load_state_dict(extract_state_dict(matformer, [width] * 4))
        set_granularity(matformer, width)
        assert torch.equal(matformer(tokens()), dense(tokens()))
    with pytest.raises(ValueError, match="one width for all layers"):
        extract_config(yoco, [16, 32, 64, 128])
    # Its mixes are counted on the narrowed model (pretrain matformer sweep): a uniform width
    # agrees with the extracted model's tensors, a mix with the formula, and the narrowed model's
    # active count is the sub-model's.
    from models.counting import build_meta, count_params
    from pretrain.matformer import sub_model_params

    full = param_counts(yoco)
    extracted = param_counts(extract_config(yoco, [32] * 4))
    assert sub_model_params(yoco, [32] * 4) == (extracted.total, extracted.non_embedding)
    mix = [16, 32, 64, 128]
    expected = full.total - sum(3 * 32 * (128 - m) for m in mix)
    assert sub_model_params(yoco, mix) == (expected, expected - full.embedding)
    narrowed = build_meta(yoco)
    set_granularity(narrowed, mix)
    assert count_params(narrowed).active == expected and count_params(narrowed).total == full.total
