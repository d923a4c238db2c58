"""Our MoE decoder against Hugging Face's MixtralForCausalLM and Qwen3MoeForCausalLM (fp32):
logits equal after conversion in both directions, also through save_pretrained /
from_pretrained files (HF's per-expert on-disk layout), exact weight round trips, identical
greedy generation, config round trips and refusals."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from transformers import MixtralForCausalLM, Qwen3MoeForCausalLM

from models.attention.layer import AttentionConfig
from models.decoder.config import DecoderConfig
from models.decoder.hf_moe import MIXTRAL_ADAPTER, QWEN3_MOE_ADAPTER
from models.ffn.moe import MoEConfig
from models.generate import generate
from models.spec import build_model, hf_adapter

VOCAB = 101


def mixtral_config(tie: bool = False, rope_interpolation: float = 1.0, **ffn) -> DecoderConfig:
    return DecoderConfig(
        vocab_size=VOCAB, d_model=64, n_layers=2, max_seq_len=64, rope_theta=5000.0, norm_eps=1e-6,
        tie_embeddings=tie, rope_interpolation=rope_interpolation, mixer=AttentionConfig(n_heads=4, n_kv_heads=2),
        ffn=MoEConfig(n_experts=4, top_k=2, d_ff=32, router="topk_softmax", aux_loss_coef=0.02, z_loss_coef=0.0, **ffn),
    )


def qwen3_config(renormalize: bool = False, first_dense: int = 1, tie: bool = False) -> DecoderConfig:
    return DecoderConfig(
        vocab_size=VOCAB, d_model=64, n_layers=3, max_seq_len=64, rope_theta=5000.0, norm_eps=1e-6,
        tie_embeddings=tie, mixer=AttentionConfig(n_heads=4, n_kv_heads=2, head_dim=24, qk_norm_eps=1e-6),
        ffn=MoEConfig(
            n_experts=8, top_k=3, d_ff=16, router="softmax_topk", renormalize=renormalize, aux_loss_coef=0.03,
            z_loss_coef=0.0, first_dense_layers=first_dense, dense_d_ff=48 if first_dense else 0,
        ),
    )


CASES = {
    "mixtral": (MIXTRAL_ADAPTER, MixtralForCausalLM, mixtral_config()),
    "mixtral_tied": (MIXTRAL_ADAPTER, MixtralForCausalLM, mixtral_config(tie=True)),
    "mixtral_linear_rope": (MIXTRAL_ADAPTER, MixtralForCausalLM, mixtral_config(rope_interpolation=2.0)),
    "qwen3_moe": (QWEN3_MOE_ADAPTER, Qwen3MoeForCausalLM, qwen3_config()),
    "qwen3_moe_renormalised_all_moe": (QWEN3_MOE_ADAPTER, Qwen3MoeForCausalLM, qwen3_config(True, 0, True)),
}


def _randomise_gains(model):
    """Init sets RMSNorm gains to 1: random gains make their mapping observable."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)


def _ours(config, seed: int):
    torch.manual_seed(seed)
    model = build_model(config).eval()
    _randomise_gains(model)
    return model


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (2, 19), generator=g)
    positions = torch.arange(19).expand(2, 19) + torch.tensor([[0], [4]])
    return tokens, positions


@pytest.mark.parametrize("name", list(CASES))
def test_ours_to_hf_logits_and_generation(name):
    adapter, _, config = CASES[name]
    model = _ours(config, 0)
    assert hf_adapter(model.config) is adapter
    hf = adapter.to_hf_model(model)
    tokens, positions = _inputs(1)
    with torch.no_grad():
        ours = model(tokens, position_ids=positions)
        theirs = hf(tokens, position_ids=positions).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    prompt = tokens[:, :7]
    with torch.no_grad():
        mine = generate(model, prompt, 12)
        hf.generation_config.eos_token_id = None  # HF configs default to eos 2; ours has none
        hf_tokens = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(mine, hf_tokens)


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_hf_files_to_ours_to_hf(tmp_path, name):
    """A random HF model saved with save_pretrained (per-expert files), loaded offline, converted
    to ours and back: weights bit-identical, logits equal."""
    adapter, hf_class, config = CASES[name]
    torch.manual_seed(2)
    hf = hf_class(adapter.config_to_hf(config)).eval()
    _randomise_gains(hf)
    hf.save_pretrained(tmp_path / "hf")
    loaded = hf_class.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    ours = adapter.from_hf_model(loaded)
    assert ours.config == config
    back = adapter.to_hf_model(ours)
    original = hf.state_dict()
    assert set(back.state_dict()) == set(original)
    for key, value in back.state_dict().items():
        assert torch.equal(value, original[key]), key
    tokens, positions = _inputs(3)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(tokens, position_ids=positions), hf(tokens, position_ids=positions).logits, atol=1e-5, rtol=1e-5
        )


def test_ours_saved_as_hf_files_loads_offline(tmp_path):
    model = _ours(mixtral_config(), 4)
    MIXTRAL_ADAPTER.to_hf_model(model).save_pretrained(tmp_path / "out")
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as files:
        names = set(files.keys())
    assert "model.layers.1.block_sparse_moe.experts.3.w3.weight" in names  # HF's per-expert disk layout
    loaded = MixtralForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True).eval()
    tokens, _ = _inputs(5)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), loaded(tokens).logits, atol=1e-5, rtol=1e-5)


def test_expert_weights_fuse_gate_first():
    """HF's gate_up_proj is cat(gate, up) on the hidden dimension: our w1 then w3."""
    model = _ours(mixtral_config(), 6)
    state = MIXTRAL_ADAPTER.state_to_hf(model.state_dict(), model.config)
    fused = state["model.layers.1.mlp.experts.gate_up_proj"]
    experts = model.layers["1"].ffn.routed.experts
    assert torch.equal(fused[:, :32], experts.w1) and torch.equal(fused[:, 32:], experts.w3)
    assert torch.equal(state["model.layers.1.mlp.experts.down_proj"], experts.w2)


def test_hf_switch_loss_is_k_times_ours_at_one_coefficient():
    """The aux coefficient maps as ours = k · HF's: HF's load_balancing_loss_func on our router's
    logits, times router_aux_loss_coef, equals our Switch term."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from models.ffn.moe.balancing import switch_loss

    config = mixtral_config()
    hf_config = MIXTRAL_ADAPTER.config_to_hf(config)
    logits = torch.randn(40, 4, generator=torch.Generator().manual_seed(7))
    ours_routing = torch.softmax(logits, -1)
    experts = logits.topk(2, dim=-1).indices
    ours = config.ffn.aux_loss_coef * switch_loss(ours_routing, experts, 1)
    theirs = hf_config.router_aux_loss_coef * load_balancing_loss_func((logits,), 4, 2)
    torch.testing.assert_close(ours, theirs)


def test_config_round_trips():
    for adapter, _, config in CASES.values():
        assert adapter.config_from_hf(adapter.config_to_hf(config)) == config


@pytest.mark.parametrize(
    "adapter,config,message",
    [
        (MIXTRAL_ADAPTER, mixtral_config(capacity_factor=1.0), "capacity factor"),
        (MIXTRAL_ADAPTER, mixtral_config(n_shared_experts=1), "shared experts"),
        (MIXTRAL_ADAPTER, mixtral_config(first_dense_layers=1, dense_d_ff=64), "dense first blocks"),
        (MIXTRAL_ADAPTER, qwen3_config(), "query/key norms"),
        (QWEN3_MOE_ADAPTER, mixtral_config(), "query/key norms"),
    ],
)
def test_configs_these_classes_cannot_hold_are_refused(adapter, config, message):
    with pytest.raises(ValueError, match=message):
        adapter.config_to_hf(config)
