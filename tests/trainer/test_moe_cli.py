"""The moe-tiny preset (narrowed to d 128 × 4 blocks, experts of 256, Switch α = 0.05) trained
through the command line on 2 ranks with expert parallelism (``parallel.ep=2``, 4 of the 8
experts per rank): the loss falls and the load ends balanced (the most used expert's
assignments over the mean below 1.5 in every layer at the last step), dropless, with the
routing metrics logged."""

from __future__ import annotations

import json
import os
import subprocess
import sys

RUN = [
    "model.d_model=128", "model.n_layers=4", "model.mixer.n_heads=4", "model.mixer.n_kv_heads=2",
    "model.ffn.d_ff=256", "model.ffn.aux_loss_coef=0.05", "model.max_seq_len=128", "data.seq_len=128",
    "data.num_workers=0", "train.global_batch=16", "train.micro_batch=8", "train.max_steps=80",
    "train.eval_interval=80", "train.eval_batches=2", "schedule.warmup_steps=8", "logging.interval=10",
    "checkpoint.interval=80", "parallel.ep=2",
]


def test_moe_tiny_trains_balanced_under_ep2_through_the_command_line(cache, tmp_path):
    env = dict(os.environ, PRETRAIN_CACHE=str(cache), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "pretrain", "train", "--config", "moe-tiny", *RUN, f"run.dir={tmp_path}",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in records if "loss" in r}
    assert sorted(steps) == list(range(10, 81, 10))
    assert steps[80]["loss"] < steps[10]["loss"] - 1.0, {s: r["loss"] for s, r in steps.items()}
    assert any("valid_loss" in r for r in records)
    for layer in range(4):
        key = f"layers.{layer}.ffn.routed"
        assert steps[10][f"{key}/max_load"] > 1.5  # unbalanced at first, so the check below means something
        assert 1.0 <= steps[80][f"{key}/max_load"] < 1.5, layer
        assert steps[80][f"{key}/dropped"] == 0.0
    assert (tmp_path / "checkpoints" / "latest").is_file()
