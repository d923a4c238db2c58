"""An exception on one rank ends the whole job: the failing rank reports its error once and
leaves, the launcher stops the ranks blocked in collectives, and the job exits non-zero."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

FAILING_RUN = textwrap.dedent(
    """
    import os, sys
    import pretrain.train
    from pretrain.cli import main

    FAIL_RANK, FAIL_STEP = int(sys.argv[1]), int(sys.argv[2])
    step_once = pretrain.train.Trainer.train_step

    def train_step(self):
        if int(os.environ["RANK"]) == FAIL_RANK and self.step + 1 == FAIL_STEP:
            raise RuntimeError(f"injected failure on rank {FAIL_RANK} at step {FAIL_STEP}")
        return step_once(self)

    pretrain.train.Trainer.train_step = train_step
    sys.exit(main(["train", *sys.argv[3:]]))
    """
)
SMALL = [
    "model.d_model=64", "model.n_layers=2", "model.mixer.n_heads=4", "model.mixer.n_kv_heads=2", "model.ffn.d_ff=128",
    "model.max_seq_len=64", "data.seq_len=64", "data.num_workers=0", "train.global_batch=8", "train.micro_batch=2",
    "train.eval_interval=0", "train.max_steps=50", "checkpoint.interval=0",
]


@pytest.mark.parametrize("world, fail_rank", [(2, 1), (4, 2)])
def test_an_exception_on_one_rank_ends_the_job(cache, tmp_path, world, fail_rank):
    script = tmp_path / "failing_run.py"
    script.write_text(FAILING_RUN)
    env = dict(os.environ, PRETRAIN_CACHE=str(cache), OMP_NUM_THREADS="1")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
        str(script), str(fail_rank), "3", *SMALL, f"run.dir={tmp_path / 'run'}",
    ]
    # The timeout guards against the hang this test exists to prevent; it is not a speed claim.
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert output.count(f"injected failure on rank {fail_rank} at step 3") >= 1, output
    assert output.count(f"rank {fail_rank} failed:") == 1, output
    assert "step 50" not in output
