"""A YOCO model trains through the command line (falling loss, validation), resumes exactly,
and generates with its one global KV cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SMALL = [
    "model.d_model=64", "model.n_layers=4", "model.self_layers=2", "model.mixer.n_heads=4", "model.mixer.n_kv_heads=2",
    "model.mixer.window=16", "model.cross.n_heads=4", "model.cross.n_kv_heads=2", "model.ffn.d_ff=128",
    "model.max_seq_len=64", "data.seq_len=64", "data.num_workers=0", "train.global_batch=8", "train.micro_batch=4",
    "train.eval_interval=8", "train.eval_batches=2", "schedule.warmup_steps=2", "logging.interval=1", "optim.lr=1e-2",
    "checkpoint.interval=4", "train.max_steps=8",
]


def test_yoco_trains_resumes_and_generates(cache, tmp_path):
    env = dict(os.environ, PRETRAIN_CACHE=str(cache), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)

    def pretrain(*args):
        return subprocess.run([sys.executable, "-m", "pretrain", *args], env=env, check=True, capture_output=True,
                              text=True)

    run, resumed = tmp_path / "run", tmp_path / "resumed"
    pretrain("train", "--config", "yoco-tiny", *SMALL, f"run.dir={run}")
    pretrain("train", "--config", "yoco-tiny", *SMALL, f"run.dir={resumed}",
             f"checkpoint.resume={run / 'checkpoints' / 'step_00000004'}")
    losses = {}
    for name in (run, resumed):
        records = [json.loads(line) for line in (name / "metrics.jsonl").read_text().splitlines()]
        losses[name] = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert losses[run][8] < losses[run][1] - 0.5
    assert {s: losses[run][s] for s in losses[resumed]} == losses[resumed] and sorted(losses[resumed]) == [5, 6, 7, 8]
    out = pretrain("generate", "--checkpoint", str(run / "checkpoints"), "--prompt", "And God said",
                   "--max-new-tokens", "8")
    assert out.stdout.startswith("And God said")


def test_yoco_with_gated_retention_trains_and_generates(cache, tmp_path):
    """The yoco-tiny-retention preset (shrunk): falling loss over packed documents with several
    retention chunks per row, then generation from the checkpoint (recurrent decoding)."""
    env = dict(os.environ, PRETRAIN_CACHE=str(cache), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    small = [a for a in SMALL if not a.startswith(("model.mixer.", "checkpoint.interval"))]
    small += ["model.mixer.n_heads=4", "model.mixer.chunk_size=16", "checkpoint.interval=8"]
    run = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "pretrain", "train", "--config", "yoco-tiny-retention", *small,
                    f"run.dir={run}"], env=env, check=True, capture_output=True, text=True)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert losses[8] < losses[1] - 0.5
    out = subprocess.run([sys.executable, "-m", "pretrain", "generate", "--checkpoint", str(run / "checkpoints"),
                          "--prompt", "And God said", "--max-new-tokens", "8", "--prefill-chunk", "2"],
                         env=env, check=True, capture_output=True, text=True)
    assert out.stdout.startswith("And God said")
