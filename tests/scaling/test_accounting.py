"""FLOP conventions: Chinchilla's table A4 reproduced, and each count against an independent
reference (the formula by hand, or torch's FlopCounterMode on the built model)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from models.attention.layer import AttentionConfig
from models.counting import param_counts, training_flops_per_token
from models.decoder.config import DecoderConfig
from models.ffn.swiglu import SwiGLUConfig
from models.spec import build_model
from tools.scaling.accounting import (
    CHINCHILLA_TABLE_A4, account, chinchilla_flops_per_token, chinchilla_param_count, chinchilla_table_a4,
    kaplan_flops_per_token,
)

LABELS = {"73M": 73e6, "305M": 305e6, "552M": 552e6, "1.1B": 1.1e9, "1.6B": 1.6e9, "6.8B": 6.8e9}


def test_chinchilla_table_a4_ratios_within_one_percent():
    rows = chinchilla_table_a4()
    for row in rows:
        assert row["ratio"] == pytest.approx(row["published"], rel=0.01), row


def test_chinchilla_parameter_counts_match_their_labels():
    """N = blocks with a relative-position projection + one vocabulary table reproduces the
    paper's size labels (and table A9's 74M, 305M, 552M, 1,143M, 1,592M, 6,794M)."""
    for label, shape, _ in CHINCHILLA_TABLE_A4:
        assert chinchilla_param_count(shape) == pytest.approx(LABELS[label], rel=0.05), label
    assert round(chinchilla_param_count(CHINCHILLA_TABLE_A4[3][1]) / 1e6) == 1143


def test_counting_embeddings_and_logits_does_not_reproduce_a4():
    """The paper's text adds embedding and logit FLOPs; its table matches only without them."""
    for row in chinchilla_table_a4(include_embeddings=True):
        assert row["ratio"] > row["published"] * 1.03, row


def test_kaplan_formula_by_hand():
    config = DecoderConfig(vocab_size=4096, d_model=256, n_layers=8, max_seq_len=256,
                           mixer=AttentionConfig(n_heads=8, n_kv_heads=8), ffn=SwiGLUConfig(d_ff=1024))
    n_blocks = 8 * (4 * 256 * 256 + 3 * 256 * 1024)  # Q, K, V, O and the three SwiGLU matrices
    assert kaplan_flops_per_token(config, 256) == 3 * (2 * n_blocks + 2 * 8 * 256 * 256)
    # Kaplan's attention term is our causal convention; he leaves out the output head's matmul.
    assert kaplan_flops_per_token(config, 256) == training_flops_per_token(config, 256) - 6 * 4096 * 256


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_chinchilla_count_against_flop_counter(n_kv_heads):
    """FlopCounterMode counts every matmul, with the math backend's full S×S attention products.
    Chinchilla's count adds the embedding as a matmul (2·V·d per token forward) and 3 FLOPs per
    softmax entry; nothing else differs."""
    seq, batch = 32, 2
    config = DecoderConfig(vocab_size=512, d_model=64, n_layers=2, max_seq_len=seq,
                           mixer=AttentionConfig(n_heads=4, n_kv_heads=n_kv_heads, backend="math"),
                           ffn=SwiGLUConfig(d_ff=96))
    model = build_model(config)
    tokens = torch.randint(0, config.vocab_size, (batch, seq))
    with FlopCounterMode(display=False) as counter:
        model(tokens).float().logsumexp(-1).sum().backward()
    counted = counter.get_total_flops() / (batch * seq)
    embedding = 3 * 2 * config.vocab_size * config.d_model
    softmax = 3 * 3 * config.n_layers * config.mixer.n_heads * seq
    assert chinchilla_flops_per_token(config, seq) == pytest.approx(counted + embedding + softmax, rel=1e-12)


def test_account_bundles_the_conventions():
    config = DecoderConfig()
    report = account(config, 256)
    params = param_counts(config)
    assert report.params == params
    assert report.n == params.total - params.embedding
    assert report.six_n == 6 * report.n
    assert report.exact == training_flops_per_token(config, 256)
    # 6N counts the norms' weights too; the exact count adds causal attention.
    assert report.exact - report.six_n == pytest.approx(6 * 8 * 256 * 256 - 6 * (2 * 8 * 256 + 256))
    # The tiny shape written out: V=4096, d=256, 8 layers, 8 heads of 32, 4 KV heads, d_ff=1024, untied.
    d, v, kv, ff = 256, 4096, 4 * 32, 1024
    block = (2 * d * d + 2 * d * kv) + 3 * d * ff + 2 * d  # Q, O; K, V; SwiGLU; two RMSNorm gains
    assert params.embedding == v * d
    assert params.non_embedding == 8 * block + d + v * d  # blocks, final norm, untied head
    assert params.total == params.embedding + params.non_embedding == params.active
