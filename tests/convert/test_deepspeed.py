"""DeepSpeed ZeRO-2 and ZeRO-3 checkpoints: a tiny model trained a few steps by DeepSpeed on two
CPU ranks (gloo) and saved by it imports to exactly DeepSpeed's own consolidated fp32 state
(``zero_to_fp32``): our model under ZeRO-2 (``--model-config``), a transformers Llama under
ZeRO-3 (its config.json beside the checkpoint)."""

from __future__ import annotations

import os

import pytest
import torch
import yaml

from models.config import ModelConfig
from models.configtree import to_dict
from models.decoder.hf import LLAMA_ADAPTER
from models.spec import build_model
from pretrain.cli import main
from pretrain.export import load_model_weights
from tests.convert.helpers import decoder_config
from tests.parallel.launch import run_ranks

VOCAB = 256


def train_with_deepspeed(rank: int, world: int, stage: int, save_dir: str, section: dict, hf: bool) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank))
    import deepspeed

    config = ModelConfig.from_dict(section)
    torch.manual_seed(0)
    model = build_model(config)
    if hf:
        model = LLAMA_ADAPTER.to_hf_model(model).train()
    ds_config = {
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage}, "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    for step in range(3):
        tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(10 * step + rank))
        out = engine(tokens)
        logits = out.logits if hf else out
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(save_dir)
    if hf and rank == 0:  # the config.json the HF Trainer writes beside its DeepSpeed checkpoints
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(save_dir)


@pytest.mark.parametrize("stage,hf", [(2, False), (3, True)], ids=["zero2-ours", "zero3-hf-llama"])
def test_zero_checkpoint_imports_as_deepspeed_consolidates_it(tmp_path, stage, hf):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    config = decoder_config(vocab=VOCAB)
    (tmp_path / "model.yaml").write_text(yaml.safe_dump({"model": to_dict(config)}))
    run_ranks(2, train_with_deepspeed, stage, str(tmp_path / "ds"), to_dict(config), hf)
    extra = [] if hf else ["--model-config", str(tmp_path / "model.yaml")]
    assert main(["convert", "--from", "deepspeed", "--to", "dcp", str(tmp_path / "ds"), str(tmp_path / "ours"), *extra]) == 0
    reference = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "ds"))
    if hf:
        reference = LLAMA_ADAPTER.state_from_hf(reference, config)
    ours = load_model_weights(tmp_path / "ours" / "checkpoints" / "step_00000003")
    assert ours.keys() == dict(build_model(config).named_parameters()).keys()
    initial = dict(build_model(config).named_parameters())
    for name, tensor in ours.items():
        assert torch.equal(tensor, reference[name]), name
    assert not torch.equal(ours["layers.0.mixer.wq.weight"], initial["layers.0.mixer.wq.weight"])  # it trained


def test_a_deepspeed_checkpoint_without_a_config_is_refused(tmp_path, capsys):
    (tmp_path / "ds").mkdir()
    assert main(["convert", "--from", "deepspeed", "--to", "dcp", str(tmp_path / "ds"), str(tmp_path / "out")]) == 2
    assert "is not a DeepSpeed checkpoint" in capsys.readouterr().err
