"""``pretrain train model.init_from=DIR``: a Hugging Face directory (under TP2 and FSDP2) or a
Megatron-LM checkpoint (under TP2) initialises training with exactly the weights transformers
loads from the HF directory of the same model, and the run trains on."""

from __future__ import annotations

import os

import pytest
import torch
from torch.distributed.tensor import DTensor

from pretrain.config import load_config
from pretrain.convert import convert
from pretrain.convert.init import load_initial_weights
from pretrain.distributed import DistInfo
from pretrain.train import Trainer
from tests.convert.helpers import decoder_config, random_model, save_run
from tests.parallel.launch import run_ranks

RUN = [
    "data.seq_len=64", "data.num_workers=0", "train.global_batch=4", "train.micro_batch=2", "train.eval_interval=0",
    "schedule.warmup_steps=1", "logging.interval=1", "train.max_steps=2", "checkpoint.interval=0",
]


def init_and_train(rank: int, world: int, cache: str, hf: str, run_dir: str, layout: list[str]) -> dict:
    os.environ["PRETRAIN_CACHE"] = cache
    config = load_config("tiny", [*RUN, *layout, f"run.dir={run_dir}", f"model.init_from={hf}", "model.mixer.backend=sdpa"])
    trainer = Trainer(config, DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu")))
    load_initial_weights(trainer.parts, config.init_from, trainer.run_dir)
    weights = {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for part in trainer.parts
        for name, p in part.named_parameters()
    }
    return {"weights": weights, "code": trainer.fit(), "d_model": config.model.d_model}


TP2, FSDP2 = ["parallel.tp=2", "parallel.dp_shard=1"], ["parallel.dp_shard=2"]


@pytest.mark.parametrize(
    "layout,source", [(TP2, "hf"), (FSDP2, "hf"), (TP2, "megatron")], ids=["tp2-hf", "fsdp2-hf", "tp2-megatron"]
)
def test_training_starts_from_the_converted_weights(cache, tmp_path, layout, source):
    from transformers import AutoModelForCausalLM

    from models.decoder.hf import LLAMA_ADAPTER

    model = random_model(decoder_config(vocab=4096), seed=4)
    save_run(tmp_path / "src", model)
    convert("dcp", "hf", tmp_path / "src", tmp_path / "hf")
    if source == "megatron":
        convert("dcp", "megatron", tmp_path / "src", tmp_path / "megatron")
    results = run_ranks(2, init_and_train, str(cache), str(tmp_path / source), str(tmp_path / "run"), layout)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True)
    expected = LLAMA_ADAPTER.state_from_hf(hf.state_dict(), model.config)
    for result in results:
        assert result["code"] == 0 and result["d_model"] == 64
        assert result["weights"].keys() == dict(model.named_parameters()).keys()
        for name, tensor in result["weights"].items():
            assert torch.equal(tensor, expected[name]), name
    assert (tmp_path / "run" / "checkpoints" / "step_00000002").is_dir()
