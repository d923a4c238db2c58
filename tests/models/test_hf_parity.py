"""Our decoder against Hugging Face's LlamaForCausalLM: same logits from converted weights, exact
round trips of configs and weights (also through save_pretrained files)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from models.attention.layer import AttentionConfig
from models.config import LayerOverride, ModelConfig
from models.configtree import load_yaml
from models.counting import param_counts
from models.decoder.config import DecoderConfig
from models.decoder.hf import LLAMA_ADAPTER
from models.ffn.swiglu import SwiGLUConfig
from models.spec import build_model, hf_adapter

to_hf_config, from_hf_config = LLAMA_ADAPTER.config_to_hf, LLAMA_ADAPTER.config_from_hf
to_hf_model, from_hf_model = LLAMA_ADAPTER.to_hf_model, LLAMA_ADAPTER.from_hf_model

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

SHAPES = [
    # (n_heads, n_kv_heads, tie, vocab): GQA ratios 1 (MHA), 2, 4
    (4, 4, False, 1003),
    (4, 2, True, 1003),
    (8, 2, False, 257),
    (8, 8, True, 96),
]


def _config(n_heads, n_kv_heads, tie, vocab, head_dim=None, **overrides):
    fields = dict(
        vocab_size=vocab, d_model=64, n_layers=2, max_seq_len=64, rope_theta=5000.0, norm_eps=1e-6,
        tie_embeddings=tie, mixer=AttentionConfig(n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim),
        ffn=SwiGLUConfig(d_ff=96),
    )
    fields.update(overrides)
    return DecoderConfig(**fields)


def _perturb_norms(model):
    """Init sets RMSNorm gains to 1; random gains make the norm mapping observable."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
@pytest.mark.parametrize("n_heads,n_kv_heads,tie,vocab", SHAPES)
def test_logits_match_transformers(n_heads, n_kv_heads, tie, vocab, attn_impl):
    torch.manual_seed(0)
    model = build_model(_config(n_heads, n_kv_heads, tie, vocab)).eval()
    assert hf_adapter(model.config) is LLAMA_ADAPTER
    _perturb_norms(model)
    hf = to_hf_model(model)
    hf.set_attn_implementation(attn_impl)
    tokens = torch.randint(0, vocab, (2, 23))
    positions = torch.arange(23).expand(2, 23) + torch.tensor([[0], [5]])
    with torch.no_grad():
        ours = model(tokens, position_ids=positions)
        theirs = hf(tokens, position_ids=positions).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_heads,n_kv_heads,tie,vocab", SHAPES[:2])
def test_hf_to_ours_to_hf_round_trip_through_files(tmp_path, n_heads, n_kv_heads, tie, vocab):
    torch.manual_seed(1)
    hf = LlamaForCausalLM(to_hf_config(_config(n_heads, n_kv_heads, tie, vocab))).eval()
    hf.save_pretrained(tmp_path / "hf")
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = from_hf_model(loaded)
    assert (ours.head.weight is ours.embed.weight) == tie
    back = to_hf_model(ours)
    original = hf.state_dict()
    assert set(back.state_dict()) == set(original)
    for key, value in back.state_dict().items():
        assert torch.equal(value, original[key]), key
    tokens = torch.randint(0, vocab, (1, 11))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=1e-5, rtol=1e-5)


def test_config_round_trip():
    config = _config(8, 2, True, 1003, init_std=0.01)
    assert from_hf_config(to_hf_config(config)) == config


def test_unsupported_hf_configs_are_refused():
    base = dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4)
    scaled = LlamaConfig(**base, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="RoPE scaling 'dynamic' is not implemented"):
        from_hf_config(scaled)
    with pytest.raises(ValueError, match="biases"):
        from_hf_config(LlamaConfig(**base, attention_bias=True))
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        from_hf_config(LlamaConfig(**base, hidden_act="gelu"))


def test_a_head_dim_other_than_hidden_over_heads_converts():
    """Llama allows head_dim ≠ hidden/heads (as Qwen3 uses): ours holds it as mixer.head_dim."""
    torch.manual_seed(2)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16,
    )).eval()
    ours = from_hf_model(hf)
    assert ours.config.mixer.head_dim == 16 and ours.layers["0"].mixer.wq.weight.shape == (64, 32)
    tokens = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "config,message",
    [
        (dict(mixer=AttentionConfig(n_heads=4, n_kv_heads=2, window=8)), "a mixer other than full attention"),
        (dict(layer_overrides=[LayerOverride("0", {"window": 4})]), "per-layer overrides"),
    ],
)
def test_configs_llama_cannot_hold_are_refused(config, message):
    with pytest.raises(ValueError, match=f"no Hugging Face class holds this decoder config .*{message}"):
        hf_adapter(DecoderConfig(**config))
    with pytest.raises(ValueError, match=message):
        to_hf_config(DecoderConfig(**config))


@pytest.mark.parametrize("preset", ["125m", "1b"])
def test_preset_parameter_count_equals_transformers_llama(preset):
    config = ModelConfig.from_dict(load_yaml(CONFIGS / f"{preset}.yaml")["model"])
    with torch.device("meta"):
        hf = LlamaForCausalLM(to_hf_config(config))
    assert sum(p.numel() for p in hf.parameters()) == param_counts(config).total


@pytest.mark.parametrize("factor", [2.0, 4.0])
def test_position_interpolation_is_hf_linear_rope(factor):
    """``model.rope_interpolation`` s is transformers' linear RoPE scaling with factor s: the
    config converts both ways and the logits agree at positions beyond the unscaled range."""
    torch.manual_seed(3)
    config = _config(4, 2, False, 257, rope_theta=500000.0, rope_interpolation=factor, max_seq_len=256)
    model = build_model(config).eval()
    _perturb_norms(model)
    hf = to_hf_model(model)
    assert hf.config.rope_parameters["rope_type"] == "linear" and hf.config.rope_parameters["factor"] == factor
    assert from_hf_config(hf.config) == config
    tokens = torch.randint(0, 257, (2, 19))
    positions = torch.arange(19).expand(2, 19) + torch.tensor([[0], [200]])
    with torch.no_grad():
        ours = model(tokens, position_ids=positions)
        theirs = hf(tokens, position_ids=positions).logits
        plain = build_model(_config(4, 2, False, 257, rope_theta=500000.0, max_seq_len=256))
        plain.load_state_dict(model.state_dict())
        unscaled = plain(tokens, position_ids=positions)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, unscaled, atol=1e-3)  # the factor changes the model
