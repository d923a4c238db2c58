"""Checkpoints across layouts, through the real trainer on the built-in corpus: a run saved under
one (pp, dp, tp) layout resumes under another — TP2 → FSDP2 (the data-parallel degree, and so
each rank's slice of the global batch, changes from 1 to 2), PP2×TP2 → one process — and
continues with the losses of the uninterrupted run, and bit for bit when resumed under the saving
layout (DDP, FSDP2, HSDP, TP2, PP2, PP2×TP2), also as a real torchrun job SIGKILLed mid-run and
started again; the consolidated export of a checkpoint is the same from every layout."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

from pretrain.config import load_config
from pretrain.distributed import DistInfo
from pretrain.export import export_safetensors
from pretrain.train import Trainer
from tests.parallel.launch import run_ranks

SMALL = [
    "model.d_model=64", "model.n_layers=2", "model.mixer.n_heads=4", "model.mixer.n_kv_heads=2", "model.ffn.d_ff=128",
    "model.max_seq_len=64", "data.seq_len=64", "data.num_workers=0", "train.global_batch=8",
    "train.micro_batch=2", "train.eval_interval=0", "schedule.warmup_steps=2", "logging.interval=1",
    "optim.lr=3e-3", "train.max_steps=8", "checkpoint.interval=4", "checkpoint.keep_last=2",
]


def train(rank: int, world: int, cache: str, run_dir: str, overrides: list[str]) -> dict:
    os.environ["PRETRAIN_CACHE"] = cache
    config = load_config("tiny", [*SMALL, f"run.dir={run_dir}", *overrides])
    trainer = Trainer(config, DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu")))
    code = trainer.fit()
    weights = {  # this rank's stages, each parameter gathered whole
        name: p.full_tensor() if isinstance(p, DTensor) else p.detach().clone()
        for part in trainer.parts
        for name, p in part.named_parameters()
    }
    return {"code": code, "weights": weights, "dp": trainer.dims.dp, "consumed": trainer.train_loader.consumed_samples}


def losses(run_dir: Path) -> dict[int, float]:
    records = (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


@pytest.fixture(scope="module")
def runs(cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")

    def run(name: str, world: int, *overrides: str) -> Path:
        results = run_ranks(world, train, str(cache), str(root / name), list(overrides))
        assert all(r["code"] == 0 for r in results), results
        final_weights[name] = {k: v for r in results for k, v in r["weights"].items()}
        loaders[name] = [(r["dp"], r["consumed"]) for r in results]
        return root / name

    final_weights: dict[str, dict] = {}
    loaders: dict[str, list] = {}

    single = run("single", 1)
    tp2 = run("tp2", 2, "parallel.tp=2")
    pp2_tp2 = run("pp2_tp2", 4, "parallel.pp=2", "parallel.tp=2")
    # Resume from step 4 of each, in a new run directory, under another layout.
    fsdp2 = run("tp2_to_fsdp2", 2, f"checkpoint.resume={checkpoint(tp2, 4)}")
    one = run("pp2_tp2_to_one", 1, f"checkpoint.resume={checkpoint(pp2_tp2, 4)}")
    # ... and under the same layout, as a job killed after step 4 and restarted would.
    same = {"fsdp2": run("fsdp2", 2), "pp2": run("pp2", 2, "parallel.pp=2")}
    same["hsdp2x2"] = run("hsdp2x2", 4, "parallel.dp_replicate=2", "parallel.dp_shard=2")
    for name, saved, world, layout in (
        ("tp2", tp2, 2, ["parallel.tp=2"]), ("pp2_tp2", pp2_tp2, 4, ["parallel.pp=2", "parallel.tp=2"]),
        ("fsdp2", same["fsdp2"], 2, []), ("pp2", same["pp2"], 2, ["parallel.pp=2"]),
        ("hsdp2x2", same["hsdp2x2"], 4, ["parallel.dp_replicate=2", "parallel.dp_shard=2"]),
    ):
        same[f"{name}_resumed"] = run(f"{name}_resumed", world, *layout, f"checkpoint.resume={checkpoint(saved, 4)}")
    # DDP over 4 ranks resumed under the same layout: bit-exact only if the gradient buckets (whose
    # boundaries set the ring all-reduce's summation order) are the same before and after resume.
    # The tiny preset's width (10M parameters, 40 MB of gradients): several 25 MB buckets.
    ddp = ["parallel.dp_replicate=4", "parallel.dp_shard=1", "train.micro_batch=1", "model.d_model=256",
           "model.n_layers=8", "model.mixer.n_heads=8", "model.mixer.n_kv_heads=4", "model.ffn.d_ff=1024"]
    ddp4 = run("ddp4", 4, *ddp)
    ddp4_resumed = run("ddp4_resumed", 4, *ddp, f"checkpoint.resume={checkpoint(ddp4, 4)}")
    dirs = {"single": single, "tp2": tp2, "pp2_tp2": pp2_tp2, "tp2_to_fsdp2": fsdp2, "pp2_tp2_to_one": one,
            "ddp4": ddp4, "ddp4_resumed": ddp4_resumed, **same}
    return {"dirs": dirs, "weights": final_weights, "loaders": loaders}


def test_saving_layouts_match_one_process(runs):
    reference = losses(runs["dirs"]["single"])
    assert sorted(reference) == list(range(1, 9)) and reference[8] < reference[1] - 0.5
    for name in ("tp2", "pp2_tp2"):
        got = losses(runs["dirs"][name])
        for step in range(1, 9):
            assert got[step] == pytest.approx(reference[step], abs=1e-5), (name, step)


@pytest.mark.parametrize("name, saved_by", [("tp2_to_fsdp2", "tp2"), ("pp2_tp2_to_one", "pp2_tp2")])
def test_resumed_under_another_layout_continues(runs, name, saved_by):
    """The continuation equals the saving layout's own uninterrupted steps 5-8 to 1e-6 (and so
    the single-process run to the parity tolerance)."""
    uninterrupted = losses(runs["dirs"][saved_by])
    resumed = losses(runs["dirs"][name])
    assert sorted(resumed) == [5, 6, 7, 8], "the run continues at step 5"
    for step in resumed:
        assert resumed[step] == pytest.approx(uninterrupted[step], abs=1e-6), step


@pytest.mark.parametrize("name", ["ddp4", "fsdp2", "hsdp2x2", "tp2", "pp2", "pp2_tp2"])
def test_resumed_under_the_same_layout_is_bit_exact(runs, name):
    """Restarted from its own step-4 checkpoint, a run repeats steps 5-8 bit for bit."""
    uninterrupted, resumed = losses(runs["dirs"][name]), losses(runs["dirs"][f"{name}_resumed"])
    assert sorted(resumed) == [5, 6, 7, 8]
    assert {step: uninterrupted[step] for step in resumed} == resumed


def test_data_parallel_degree_changed_and_the_stream_followed(runs):
    """TP2 read the whole global batch on one data-parallel rank; resumed under FSDP2 each of two
    ranks read half of it, and all ranks end having consumed the same 8 global batches."""
    assert {dp for dp, _ in runs["loaders"]["tp2"]} == {1}
    assert {dp for dp, _ in runs["loaders"]["tp2_to_fsdp2"]} == {2}
    for name in runs["loaders"]:
        assert {consumed for _, consumed in runs["loaders"][name]} == {8 * 8}, name


@pytest.mark.parametrize("name", ["single", "tp2", "pp2_tp2", "tp2_to_fsdp2", "pp2_tp2_to_one"])
def test_export_is_the_trained_model_from_every_layout(runs, name, tmp_path):
    """The consolidated export of the final checkpoint holds exactly the parameters the ranks
    held at the end (gathered whole), under the plain names and shapes of one process."""
    exported = load_file(export_safetensors(checkpoint(runs["dirs"][name], 8), tmp_path / "model.safetensors"))
    trained = runs["weights"][name]
    assert exported.keys() == trained.keys() == runs["weights"]["single"].keys()
    for key, value in trained.items():
        assert torch.equal(exported[key], value), key


KILLED_LAYOUTS = {  # the layouts docs/parallelism.md recommends (one process: tests/trainer/test_training.py)
    "fsdp2": (2, []), "tp2": (2, ["parallel.tp=2"]), "pp2": (2, ["parallel.pp=2"]),
    "hsdp2x2": (4, ["parallel.dp_replicate=2", "parallel.dp_shard=2"]),
}


def kill_job(job: subprocess.Popen) -> None:
    """SIGKILL the launcher and every rank at once, as a lost node would (torchrun starts its
    workers in sessions of their own, so killing its process group would leave them running)."""
    launcher = psutil.Process(job.pid)
    processes = [launcher, *launcher.children(recursive=True)]
    for process in processes:
        process.send_signal(signal.SIGKILL)
    psutil.wait_procs(processes, timeout=60)
    job.wait()


def logged_steps(run_dir: Path) -> int:
    """The last step in metrics.jsonl so far (0 before the file exists or while a line is cut)."""
    try:
        return max(losses(run_dir), default=0)
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


@pytest.mark.parametrize("name", list(KILLED_LAYOUTS))
def test_sigkilled_job_resumes_bit_exactly(runs, cache, name, tmp_path):
    """A real job (torchrun, every rank a process) SIGKILLed as a whole after a seeded step past
    its step-4 checkpoint, then started again with the same command (checkpoint.resume=auto),
    logs the uninterrupted run's losses for steps 5-8 bit for bit."""
    seed = int(os.environ.get("KILL_SEED", random.SystemRandom().randrange(1 << 30)))
    kill_after = random.Random(seed).randint(5, 6)
    print(f"kill point seed: KILL_SEED={seed} (kill after step {kill_after})")
    world, layout = KILLED_LAYOUTS[name]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
        "-m", "pretrain", "train", *SMALL, *layout, f"run.dir={tmp_path}",
    ]
    env = dict(os.environ, PRETRAIN_CACHE=str(cache), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    job = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while job.poll() is None and logged_steps(tmp_path) < kill_after:
            time.sleep(0.02)
    finally:
        kill_job(job)
    assert max(losses(tmp_path)) < 8, f"the job ended before the kill (KILL_SEED={seed})"
    restarted = subprocess.run(command, env=env, capture_output=True, text=True)
    assert restarted.returncode == 0, restarted.stdout[-3000:] + restarted.stderr[-3000:]
    assert "resumed from" in restarted.stdout and "step_00000004" in restarted.stdout, restarted.stdout[-3000:]
    uninterrupted = losses(runs["dirs"][name])
    assert losses(tmp_path) == uninterrupted, f"killed after step {kill_after} (KILL_SEED={seed})"
