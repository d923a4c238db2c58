"""Conversion of checkpoints saved under several parallel layouts (TP2, PP2, FSDP2 on two gloo
ranks): dcp → hf → dcp and dcp → megatron → dcp give back, bit for bit, the weights one process initialises with the same
seed, and transformers' model on the HF directory gives that model's logits. A model family
without an HF class (YOCO) and an MoE decoder go through safetensors the same way."""

from __future__ import annotations

import pytest
import torch

from models.config import ModelConfig
from models.configtree import load_yaml, to_dict
from models.spec import build_model
from pretrain.checkpoint import CheckpointManager
from pretrain.convert import convert
from pretrain.export import load_model_weights
from pretrain.parallel.config import ParallelConfig
from pretrain.parallel.mesh import build_mesh, check_layout
from pretrain.parallel.parallelize import build_parts
from tests.convert.helpers import decoder_config
from tests.parallel.launch import run_ranks

SEED = 5
LAYOUTS = {"tp2": dict(tp=2, dp_shard=1), "pp2": dict(pp=2, dp_shard=1), "fsdp2": dict(dp_shard=2)}


def model_configs() -> dict[str, dict]:
    from pathlib import Path

    presets = Path(__file__).resolve().parents[2] / "configs"
    yoco = {**load_yaml(presets / "yoco-tiny.yaml")["model"], "vocab_size": 512, "n_layers": 4, "self_layers": 2}
    moe = {**load_yaml(presets / "moe-tiny.yaml")["model"], "vocab_size": 512, "n_layers": 2}
    return {"decoder": to_dict(decoder_config(vocab=512)), "yoco": yoco, "moe": moe}


def save_layouts(rank: int, world: int, root: str, configs: dict[str, dict], layouts: dict[str, dict]) -> None:
    for family, section in configs.items():
        config = ModelConfig.from_dict(section)
        for name, fields in layouts.items():
            parallel = ParallelConfig(**fields, init="full")
            dims = check_layout(parallel, config, world, global_batch=4, micro_batch=1, seq_len=16)
            parts = build_parts(config, parallel, dims, build_mesh(dims, "cpu"), torch.device("cpu"), seed=SEED)
            manager = CheckpointManager(f"{root}/{family}-{name}/checkpoints")
            manager.save(3, parts.parts, extra_state={"config": {"model": section}, "step": 3})


def reference(section: dict) -> torch.nn.Module:
    with torch.device("meta"):
        model = build_model(ModelConfig.from_dict(section))
    model.to_empty(device="cpu")
    torch.manual_seed(SEED)
    model.init_weights()
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    configs = model_configs()
    run_ranks(2, save_layouts, str(root), configs, LAYOUTS)
    return root, configs


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_decoder_dcp_hf_dcp_from_every_layout(saved, layout, tmp_path):
    from transformers import AutoModelForCausalLM

    root, configs = saved
    model = reference(configs["decoder"])
    convert("dcp", "hf", root / f"decoder-{layout}", tmp_path / "hf")
    convert("hf", "dcp", tmp_path / "hf", tmp_path / "back")
    convert("dcp", "megatron", root / f"decoder-{layout}", tmp_path / "megatron")
    convert("megatron", "dcp", tmp_path / "megatron", tmp_path / "back-megatron")
    expected = dict(model.named_parameters())
    for back_dir, step in (("back", 0), ("back-megatron", 3)):
        back = load_model_weights(tmp_path / back_dir / "checkpoints" / f"step_{step:08d}")
        assert back.keys() == expected.keys()
        for name, tensor in expected.items():
            assert torch.equal(back[name], tensor), (back_dir, name)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model(tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["yoco", "moe"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_families_without_an_hf_class_round_trip_through_safetensors(saved, family, layout, tmp_path):
    root, configs = saved
    convert("dcp", "safetensors", root / f"{family}-{layout}", tmp_path / "m.safetensors")
    convert("safetensors", "dcp", tmp_path / "m.safetensors", tmp_path / "back")
    back = load_model_weights(tmp_path / "back" / "checkpoints" / "step_00000003")
    expected = dict(reference(configs[family]).named_parameters())
    assert back.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(back[name], tensor), name
