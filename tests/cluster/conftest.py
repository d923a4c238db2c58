"""Fixtures of the launch tests: a torchrun reference run (the built-in corpus is tests/conftest.py's
``cache``)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.cluster.common import RUN, STEPS, clean_env, losses


@pytest.fixture(scope="session")
def torchrun_reference(cache, tmp_path_factory) -> dict[int, float]:
    """The losses of torchrun --standalone with 4 processes: what every launcher must reproduce."""
    run_dir = tmp_path_factory.mktemp("torchrun-reference")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
         "-m", "pretrain", "train", *RUN, f"run.dir={run_dir}"],
        env=clean_env(cache), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    seen = losses(run_dir)
    assert sorted(seen) == list(range(1, STEPS + 1))
    return seen
