"""An encoder-decoder trains on span corruption through the command line (falling loss,
validation), resumes exactly, and answers a prompt with sentinels through ``pretrain generate``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SMALL = [
    "model.d_model=64", "model.encoder_layers=2", "model.decoder_layers=2", "model.ffn.d_ff=128",
    "model.max_seq_len=64", "model.max_target_len=32", "data.seq_len=64", "data.num_workers=0",
    "train.global_batch=8", "train.micro_batch=4", "train.eval_interval=8", "train.eval_batches=2",
    "schedule.warmup_steps=2", "logging.interval=1", "optim.lr=1e-2", "checkpoint.interval=4", "train.max_steps=8",
]


def test_t5_tiny_trains_resumes_and_generates(cache, tmp_path):
    env = dict(os.environ, PRETRAIN_CACHE=str(cache), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)

    def pretrain(*args):
        return subprocess.run([sys.executable, "-m", "pretrain", *args], env=env, check=True, capture_output=True,
                              text=True)

    run, resumed = tmp_path / "run", tmp_path / "resumed"
    pretrain("train", "--config", "t5-tiny", *SMALL, f"run.dir={run}")
    pretrain("train", "--config", "t5-tiny", *SMALL, f"run.dir={resumed}",
             f"checkpoint.resume={run / 'checkpoints' / 'step_00000004'}")
    losses, valid = {}, None
    for name in (run, resumed):
        records = [json.loads(line) for line in (name / "metrics.jsonl").read_text().splitlines()]
        losses[name] = {r["step"]: r["loss"] for r in records if "loss" in r}
        valid = valid or next((r["valid_loss"] for r in records if "valid_loss" in r), None)
    assert losses[run][8] < losses[run][1] - 1.0
    assert valid is not None and valid < losses[run][1]
    assert {s: losses[run][s] for s in losses[resumed]} == losses[resumed] and sorted(losses[resumed]) == [5, 6, 7, 8]
    out = pretrain("generate", "--checkpoint", str(run / "checkpoints"), "--prompt",
                   "And God said, Let there be <extra_id_0>: and there was light.", "--max-new-tokens", "6")
    assert out.stdout.strip()
