"""The trainer's FLOPs per step (MFU) for an encoder-decoder: global batch × 3 × the forward
formula of models/encdec/counting.py at the rows' encoder and decoder lengths (not data.seq_len
for both stacks)."""

from __future__ import annotations

import os

import torch

from models.encdec.counting import forward_flops
from pretrain.config import load_config
from pretrain.distributed import DistInfo
from pretrain.train import Trainer

SMALL = [
    "model.d_model=64", "model.encoder_layers=2", "model.decoder_layers=3", "model.ffn.d_ff=128",
    "model.max_seq_len=64", "model.max_target_len=32", "data.seq_len=64", "data.num_workers=0",
    "train.global_batch=8", "train.micro_batch=4", "train.max_steps=2", "schedule.warmup_steps=1",
    "checkpoint.interval=0",
]


def test_step_flops_use_the_encoder_and_decoder_lengths(cache, tmp_path):
    os.environ["PRETRAIN_CACHE"] = str(cache)
    config = load_config("t5-tiny", [*SMALL, f"run.dir={tmp_path}"])
    trainer = Trainer(config, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    trainer.train_iter = iter(trainer.train_loader)
    batch = next(iter(trainer.train_loader))
    enc_len, dec_len = batch["input_ids"].shape[1], batch["decoder_input_ids"].shape[1]
    assert enc_len == 64 and dec_len != enc_len
    result = trainer.train_step()
    assert result.flops == 8 * 3 * forward_flops(config.model, enc_len, dec_len)["total"]
    assert result.flops != 8 * 3 * forward_flops(config.model, 64, 64)["total"]
