"""Encoder-decoder checkpoints across layouts, through the real trainer on the built-in corpus
with span corruption: PP2 (cut at the seam) and TP2+SP runs match one process; a PP2 run
saved at step 4 resumes under TP2+SP (another layout, the loader's stream included) and
continues with the losses of the uninterrupted run, and bit for bit under its own layout."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from pretrain.config import load_config
from pretrain.distributed import DistInfo
from pretrain.train import Trainer
from tests.parallel.launch import run_ranks

SMALL = [
    "model.d_model=64", "model.encoder_layers=2", "model.decoder_layers=2", "model.ffn.d_ff=128",
    "model.max_seq_len=64", "model.max_target_len=32", "data.seq_len=64", "data.num_workers=0",
    "data.span_corruption.examples_per_row=2", "train.global_batch=8", "train.micro_batch=2",
    "train.eval_interval=0", "schedule.warmup_steps=2", "logging.interval=1", "optim.lr=3e-3", "train.max_steps=8",
    "checkpoint.interval=4", "checkpoint.keep_last=2",
]


def train(rank: int, world: int, cache: str, run_dir: str, overrides: list[str]) -> int:
    os.environ["PRETRAIN_CACHE"] = cache
    config = load_config("t5-tiny", [*SMALL, f"run.dir={run_dir}", *overrides])
    return Trainer(config, DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))).fit()


def losses(run_dir: Path) -> dict[int, float]:
    records = (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def runs(cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("encdec-runs")

    def run(name: str, world: int, *overrides: str) -> dict[int, float]:
        assert run_ranks(world, train, str(cache), str(root / name), list(overrides)) == [0] * world
        return losses(root / name)

    out = {"single": run("single", 1), "pp2": run("pp2", 2, "parallel.pp=2")}
    out["tp2_sp"] = run("tp2_sp", 2, "parallel.tp=2", "parallel.sp=true")
    saved = root / "pp2" / "checkpoints" / "step_00000004"
    out["pp2_to_tp2_sp"] = run("pp2_to_tp2_sp", 2, "parallel.tp=2", "parallel.sp=true", f"checkpoint.resume={saved}")
    out["pp2_resumed"] = run("pp2_resumed", 2, "parallel.pp=2", f"checkpoint.resume={saved}")
    return out


def test_layouts_match_one_process(runs):
    reference = runs["single"]
    assert sorted(reference) == list(range(1, 9)) and reference[8] < reference[1] - 0.5
    for name in ("pp2", "tp2_sp"):
        for step in range(1, 9):
            assert runs[name][step] == pytest.approx(reference[step], abs=1e-5), (name, step)


def test_resume_under_another_layout_continues(runs):
    resumed = runs["pp2_to_tp2_sp"]
    assert sorted(resumed) == [5, 6, 7, 8]
    for step in resumed:
        assert resumed[step] == pytest.approx(runs["pp2"][step], abs=1e-5), step


def test_resume_under_the_same_layout_is_bit_exact(runs):
    resumed = runs["pp2_resumed"]
    assert sorted(resumed) == [5, 6, 7, 8] and {s: runs["pp2"][s] for s in resumed} == resumed
