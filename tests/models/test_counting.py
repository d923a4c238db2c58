"""Parameter counts against the built models, FLOPs against torch's FlopCounterMode, MFU, and
the presets' sizes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from models.attention.layer import AttentionConfig
from models.config import ModelConfig
from models.configtree import load_yaml
from models.counting import mfu, param_counts, peak_tflops, training_flops_per_token
from models.decoder.config import DecoderConfig
from models.ffn.swiglu import SwiGLUConfig
from models.spec import build_model

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

SHAPES = [
    dict(vocab_size=1003, d_model=48, n_layers=3, n_heads=6, n_kv_heads=6, d_ff=80, tie_embeddings=False),
    dict(vocab_size=1003, d_model=48, n_layers=3, n_heads=6, n_kv_heads=2, d_ff=80, tie_embeddings=True),
    dict(vocab_size=64, d_model=64, n_layers=1, n_heads=8, n_kv_heads=1, d_ff=24, tie_embeddings=False),
]


def _config(n_heads, n_kv_heads, d_ff, window=None, backend="sdpa", **fields) -> DecoderConfig:
    return DecoderConfig(
        mixer=AttentionConfig(n_heads=n_heads, n_kv_heads=n_kv_heads, window=window, backend=backend),
        ffn=SwiGLUConfig(d_ff=d_ff), **fields,
    )


def _numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("shape", SHAPES)
def test_param_counts_equal_the_written_out_formula(shape):
    """V·d embedding; per block 2·d·H·D + 2·d·Hkv·D attention, 3·d·f SwiGLU, 2·d norm gains; a
    final norm d; an untied head V·d."""
    config = _config(max_seq_len=32, **shape)
    d, f, v, layers = shape["d_model"], shape["d_ff"], shape["vocab_size"], shape["n_layers"]
    head_dim = d // shape["n_heads"]
    block = 2 * d * shape["n_heads"] * head_dim + 2 * d * shape["n_kv_heads"] * head_dim + 3 * d * f + 2 * d
    head = 0 if shape["tie_embeddings"] else v * d
    counts = param_counts(config)
    assert counts.total == v * d + layers * block + d + head == _numel(build_model(config))
    assert counts.embedding == v * d
    assert counts.non_embedding == counts.total - v * d
    assert counts.active == counts.total  # a dense model uses every parameter for every token


PRESET_RANGES = {
    "tiny": (9e6, 11e6),
    "125m": (115e6, 135e6),
    "350m": (320e6, 370e6),
    "1b": (1.15e9, 1.30e9),
}


@pytest.mark.parametrize("preset", sorted(PRESET_RANGES))
def test_preset_sizes(preset):
    config = ModelConfig.from_dict(load_yaml(CONFIGS / f"{preset}.yaml")["model"])
    low, high = PRESET_RANGES[preset]
    assert low <= param_counts(config).total <= high


def test_1b_preset_has_the_llama_3_2_1b_parameter_count():
    config = ModelConfig.from_dict(load_yaml(CONFIGS / "1b.yaml")["model"])
    assert param_counts(config).total == 1_235_814_400


@pytest.mark.parametrize("shape", SHAPES[:2])
def test_training_flops_match_flop_counter_mode(shape):
    """FlopCounterMode counts every matmul of forward + backward. It does not count CPU SDPA
    kernels, so the model runs the math backend, whose explicit QKᵀ and A·V products it counts
    over the full S×S square — twice our causal convention. Elementwise work (norms, softmax,
    RoPE) is counted by neither."""
    seq, batch = 24, 2
    config = _config(max_seq_len=seq, backend="math", **shape)
    model = build_model(config)
    tokens = torch.randint(0, config.vocab_size, (batch, seq))
    with FlopCounterMode(display=False) as counter:
        model(tokens).float().logsumexp(-1).sum().backward()
    per_token = training_flops_per_token(config, seq)
    # The math kernel's QKᵀ and A·V run over the whole S×S square: 3 × 4·H·D·S per token and
    # layer, of which our causal convention counts half.
    dense_attention_extra = 6 * shape["n_layers"] * shape["d_model"] * seq
    assert counter.get_total_flops() == batch * seq * (per_token + dense_attention_extra)


def test_flops_per_token_formula_by_hand():
    config = _config(4, 2, 128, vocab_size=1000, d_model=64, n_layers=2, max_seq_len=512)
    attention_proj = 64 * 64 * 2 + 64 * 32 * 2
    block = attention_proj + 3 * 64 * 128
    assert training_flops_per_token(config, 512) == 6 * (2 * block + 1000 * 64) + 6 * 2 * 4 * 16 * 512
    tied = dataclasses.replace(config, tie_embeddings=True)
    assert training_flops_per_token(tied, 512) == training_flops_per_token(config, 512)
    # A window W < S sees W − W²/(2S) keys per query on average instead of S/2 (all layers here).
    windowed = _config(4, 2, 128, window=128, vocab_size=1000, d_model=64, n_layers=2, max_seq_len=512)
    keys = 128 - 128**2 / (2 * 512)
    assert training_flops_per_token(windowed, 512) == 6 * (2 * block + 1000 * 64) + 2 * 3 * round(4 * 4 * 16 * keys)


def test_peak_lookup_and_mfu():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("NVIDIA GeForce RTX 4090") is None
    assert mfu(10_000, 6e9, "NVIDIA H100 80GB HBM3") == pytest.approx(6e13 / 989e12)
    assert mfu(10_000, 6e9, "Tesla T4") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_mfu_is_none_on_cpu():
    assert mfu(10_000, 6e9) is None
