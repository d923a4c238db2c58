"""Exact encdec counts (models/encdec/counting.py): the parameter formula against the built
model and against transformers' T5; the FLOP formula against torch's FlopCounterMode on a real
forward (every decoder score counted, as the dense kernel executes them)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from models.counting import param_counts
from models.encdec import EncDecConfig
from models.encdec.counting import forward_flops, param_count, row_training_flops
from models.encdec.hf import T5_ADAPTER
from models.ffn.gated import GatedGELUConfig, ReLUConfig
from models.spec import build_model, get_spec

CONFIGS = [
    EncDecConfig(vocab_size=300, d_model=48, encoder_layers=2, decoder_layers=3, n_heads=4, backend="math",
                 ffn=GatedGELUConfig(d_ff=80)),
    EncDecConfig(vocab_size=300, d_model=48, encoder_layers=3, decoder_layers=1, n_heads=6, head_dim=12,
                 tie_embeddings=True, backend="math", ffn=ReLUConfig(d_ff=64)),
    EncDecConfig(vocab_size=300, d_model=48, encoder_layers=1, decoder_layers=2, n_heads=4, position="rope",
                 backend="math"),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_parameter_formula(config):
    model = build_model(config)
    assert param_count(config) == sum(p.numel() for p in model.parameters()) == param_counts(config).total
    if config.position == "relative":
        hf = T5_ADAPTER.to_hf_model(model)
        assert hf.num_parameters() == param_count(config)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("enc_len,dec_len", [(20, 7), (9, 16)])
def test_flop_formula_matches_the_flop_counter(config, enc_len, dec_len):
    model = build_model(config).eval()
    inputs, decoder = torch.randint(0, 300, (2, enc_len)), torch.randint(0, 300, (2, dec_len))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(inputs, decoder_input_ids=decoder)
    counted = forward_flops(config, enc_len, dec_len, causal_half=False)
    assert counter.get_total_flops() == 2 * counted["total"]
    visible = forward_flops(config, enc_len, dec_len)
    l_d, a = config.decoder_layers, config.n_heads * config.resolved_head_dim
    assert counted["total"] - visible["total"] == l_d * 4 * a * dec_len * dec_len // 2


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("enc_len,dec_len", [(20, 7), (9, 16), (64, 64)])
def test_row_flops_are_the_formula_at_the_batch_lengths(config, enc_len, dec_len):
    """What the trainer's MFU counts per row (the family's ``row_flops``, walked over the modules)
    is 3 × the formula at the batch's own encoder and decoder lengths."""
    batch = {"input_ids": torch.zeros(3, enc_len, dtype=torch.long),
             "decoder_input_ids": torch.zeros(3, dec_len, dtype=torch.long)}
    assert get_spec(config).row_flops is row_training_flops
    assert row_training_flops(config, batch) == 3 * forward_flops(config, enc_len, dec_len)["total"]


def test_t5_base_preset_is_t5_v1_1_base():
    """t5-base has T5 v1.1 base's shape: the same count as transformers' T5 of that config (built
    on the meta device), 247,577,856 parameters (google/t5-v1_1-base)."""
    from pathlib import Path

    from transformers import T5ForConditionalGeneration

    from models.config import ModelConfig
    from models.configtree import load_yaml

    preset = Path(__file__).resolve().parents[2] / "configs" / "t5-base.yaml"
    config = ModelConfig.from_dict(load_yaml(preset)["model"])
    hf_config = T5_ADAPTER.config_to_hf(config)
    with torch.device("meta"):
        hf = T5ForConditionalGeneration(hf_config)
    hf.set_input_embeddings(hf.shared)
    assert param_count(config) == param_counts(config).total == hf.num_parameters() == 247_577_856
