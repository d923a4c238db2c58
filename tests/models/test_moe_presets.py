"""The MoE presets' exact parameter counts: 1b-moe (OLMoE-1B-7B's shape) counted by our model,
by the formula written out, and by transformers' Qwen3MoeForCausalLM of the converted config."""

from __future__ import annotations

import torch
from transformers import Qwen3MoeForCausalLM

from models.counting import param_counts
from models.decoder.hf_moe import QWEN3_MOE_ADAPTER
from pretrain.config import load_config


def test_1b_moe_counts_exactly():
    config = load_config("1b-moe").model
    d, layers, vocab, heads, head_dim = 2048, 16, 50304, 16, 128
    experts, k, f = 64, 8, 1024
    per_block = 4 * d * d + 2 * d + 2 * head_dim + experts * d + experts * 3 * d * f
    total = layers * per_block + 2 * vocab * d + d
    active = total - layers * (experts - k) * 3 * d * f
    counts = param_counts(config)
    assert (counts.total, counts.active) == (total, active) == (6_919_100_416, 1_281_955_840)
    with torch.device("meta"):
        hf = Qwen3MoeForCausalLM(QWEN3_MOE_ADAPTER.config_to_hf(config))
    assert sum(p.numel() for p in hf.parameters()) == total
    assert (config.mixer.n_heads, config.mixer.resolved_head_dim(d)) == (heads, head_dim)
