"""The cluster scripts on a real single-node Slurm: sbatch cluster/train_1b.sh trains the tiny
config with 2 processes into runs/<job name> and checkpoints, and a USR1 sent to the job step (not
the batch shell) checkpoints and requeues too; srun without torchrun fails fast when a rank dies; train.sh's job-array interface (ARRAY_FILE) and DRY_RUN."""

from __future__ import annotations

import re
import time

import pytest

from tests.cluster.common import LONG, RUN, STEPS, kill_rank, losses, wait_for_step
from tests.cluster.slurm_cluster import SlurmCluster, missing_requirements
from tests.cluster.slurm_jobs import finish, job_env, job_log, submit

pytestmark = pytest.mark.skipif(missing_requirements() is not None, reason=str(missing_requirements()))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    slurm = SlurmCluster(tmp_path_factory.mktemp("slurm-one-node"), ["localhost"]).start()
    yield slurm
    slurm.stop()


@pytest.fixture(autouse=True)
def cancel_leftovers(cluster):
    yield
    cluster.cancel_all()


def test_sbatch_train_1b_trains_into_a_run_per_job_name_and_requeues_on_a_step_signal(cluster, cache, tmp_path):
    """sbatch cluster/train_1b.sh, 1 node x 2 processes under torchrun, run directory
    runs/<job name>. Mid-run, USR1 goes to the job step only (scancel --signal=USR1 without
    --batch, what --signal=USR1@T without B: does): the trainers checkpoint and exit 75, torchrun
    exits 1, the task wrapper reports 75 and the batch shell requeues on that exit code alone."""
    env = job_env(cluster, cache, CONFIG="tiny", NPROC_PER_NODE="2", OVERRIDES=" ".join(RUN))
    proc, job_id = submit(cluster, tmp_path, "train_1b.sh", env, "--nodes=1", "--job-name=tiny-one")
    run_dir = tmp_path / "runs" / "tiny-one"
    wait_for_step(run_dir, 2, proc)
    cluster.run("scancel", "--signal=USR1", job_id)
    code, err = finish(proc)
    log = job_log(tmp_path, "tiny-one", job_id)
    assert code == 0, f"{err}\n{log[-4000:]}"
    assert "tiny -> runs/tiny-one: 1 node(s) x 2 process(es) via torchrun" in log
    assert "got USR1" not in log, "the batch shell was not to be signalled"
    assert "checkpointed for preemption (exit 75)" in log and "resumed from" in log, log[-4000:]
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"
    assert log.rstrip().endswith("finished with exit code 0"), log[-2000:]


def test_srun_launch_ends_within_seconds_when_a_rank_is_killed(cluster, cache, tmp_path):
    env = job_env(cluster, cache, CONFIG="tiny", NPROC_PER_NODE="2", LAUNCHER="srun", RUN_DIR=str(tmp_path / "run"),
                  OVERRIDES=" ".join(LONG))
    proc, job_id = submit(cluster, tmp_path, "train_1b.sh", env, "--nodes=1", "--job-name=srun-killed")
    wait_for_step(tmp_path / "run", 1, proc)
    killed_at = kill_rank(str(tmp_path / "run"), "SLURM_PROCID", 1)
    code, err = finish(proc, timeout=120)
    elapsed = time.time() - killed_at
    log = job_log(tmp_path, "srun-killed", job_id)
    print(f"the job ended {elapsed:.1f}s after the kill")
    assert code != 0 and "requeueing" not in log, log[-4000:]
    # Ended by the kill's propagation, not by a collective timing out (no wall-clock bound:
    # finish()'s timeout is below the collective timeout, so a hang fails the test).
    assert "timed out" not in log.lower(), log[-4000:]


def test_array_file_gives_each_task_its_run_and_dry_run_prints_the_launch(cluster, cache, tmp_path):
    table = tmp_path / "runs.txt"
    table.write_text("runs/a tiny train.max_steps=7\nruns/b configs/125m.yaml optim.lr=1e-3 train.max_steps=9\n")
    env = job_env(cluster, cache, ARRAY_FILE=str(table), DRY_RUN="1", NPROC_PER_NODE="2")
    proc, job_id = submit(cluster, tmp_path, "train.sh", env, "--array=0-1", "--job-name=sweep",
                          "--output=logs/%x-%A_%a.out")
    code, err = finish(proc)
    assert code == 0, err
    logs = {task: job_log(tmp_path, "sweep", f"{job_id}_{task}").replace("\\", "") for task in (0, 1)}
    assert "tiny -> runs/a" in logs[0] and "train.max_steps=7" in logs[0], logs[0]
    assert "configs/125m.yaml -> runs/b" in logs[1] and "optim.lr=1e-3 train.max_steps=9" in logs[1], logs[1]
    for log in logs.values():
        assert re.search(r"srun .*--kill-on-bad-exit=1 .*torch\.distributed\.run .*--nproc-per-node=2", log), log
        assert "--rdzv-backend=c10d --rdzv-endpoint=localhost:" in log
