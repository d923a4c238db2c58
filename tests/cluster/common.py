"""Shared pieces of the launch tests: the small model every launch trains, a clean environment,
and helpers to read losses and to find and kill rank processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"

# 4 ranks x micro-batch 2 = global batch 8: every launcher runs the same optimisation.
SMALL = [
    "model.d_model=64", "model.n_layers=2", "model.mixer.n_heads=4", "model.mixer.n_kv_heads=2", "model.ffn.d_ff=128",
    "model.max_seq_len=64", "data.seq_len=64", "data.num_workers=0",
    "train.global_batch=8", "train.micro_batch=2", "train.eval_interval=0",
    "schedule.warmup_steps=2", "logging.interval=1", "optim.lr=1e-2",
]
STEPS = 12
RUN = [*SMALL, f"train.max_steps={STEPS}", "checkpoint.interval=0"]
# Minutes of training (the built-in corpus holds ~1,900 such steps): runs that are killed.
LONG = [*SMALL, "train.max_steps=1000", "checkpoint.interval=0"]


def clean_env(cache: Path, **extra: str) -> dict:
    """This interpreter's environment without any launcher's variables (pytest itself may run
    inside a Slurm job or under torchrun)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "OMPI_", "PMI_", "PMIX_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PRETRAIN_CACHE=str(cache), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PRETRAIN_DIST_TIMEOUT="60", **extra)
    return env


def losses(run_dir: Path) -> dict[int, float]:
    """Step -> loss from metrics.jsonl; a resumed run's later lines replace earlier ones."""
    out = {}
    path = Path(run_dir) / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if "loss" in record:
                out[record["step"]] = record["loss"]
    return out


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if max(losses(run_dir), default=0) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"launcher exited early with {proc.returncode}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def rank_pids(marker: str, rank_variable: str) -> dict[int, int]:
    """rank -> pid of this machine's processes whose command line contains ``marker`` (a test's
    unique run directory) and whose environment sets ``rank_variable`` (RANK under torchrun)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().decode().split("\0")
            if not Path(argv[0]).name.startswith("python") or marker not in " ".join(argv) \
                    or "torch.distributed.run" in argv:
                continue
            environ = dict(item.split("=", 1) for item in (proc / "environ").read_bytes().decode().split("\0")
                           if "=" in item)
        except (OSError, UnicodeDecodeError, IndexError):
            continue
        if rank_variable in environ:
            found[int(environ[rank_variable])] = int(proc.name)
    return found


def kill_rank(marker: str, rank_variable: str, rank: int, timeout: float = 60) -> float:
    """SIGKILL one rank's process once it exists; returns the time of the kill."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        pids = rank_pids(marker, rank_variable)
        if rank in pids:
            os.kill(pids[rank], signal.SIGKILL)
            return time.time()
        time.sleep(0.1)
    raise AssertionError(f"no process of rank {rank} for {marker}")


def tool(name: str) -> str | None:
    """A console script from this interpreter's environment, else from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.is_file() else shutil.which(name)
