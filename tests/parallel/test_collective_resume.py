"""Resuming is decided once for all ranks: rank 0 picks the checkpoint, every rank loads that one,
and a rank that cannot see it makes every rank fail with one message instead of a split run."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from torch import nn

from pretrain.checkpoint import CheckpointManager
from pretrain.errors import CheckpointError
from tests.parallel.launch import run_ranks


def choose(rank: int, world: int, places: list[str], resume: str) -> str:
    """Each rank runs in its own working directory (as processes on different machines would
    see their own disks) and resumes from the relative run directory ``checkpoints``."""
    os.chdir(places[rank])
    try:
        chosen = CheckpointManager("checkpoints").choose(resume)
    except CheckpointError as e:
        return f"error: {e}"
    return "none" if chosen is None else chosen.name


def _save(place: Path, steps: list[int]) -> None:
    model = nn.Linear(2, 2)
    manager = CheckpointManager(place / "checkpoints")
    for step in steps:
        manager.save(step, model, None, {"step": step})


@pytest.fixture(scope="module")
def outcomes():
    with tempfile.TemporaryDirectory() as tmp:
        shared, mine, empty = Path(tmp, "shared"), Path(tmp, "rank0-only"), Path(tmp, "empty")
        _save(shared, [2, 4])
        _save(mine, [3])
        empty.mkdir()
        return {
            "shared": run_ranks(2, choose, [str(shared)] * 2, "auto"),
            "split": run_ranks(2, choose, [str(mine), str(empty)], "auto"),
            "none_but_exists": run_ranks(2, choose, [str(shared)] * 2, "none"),
            "fresh": run_ranks(2, choose, [str(empty)] * 2, "auto"),
            "named": run_ranks(2, choose, [str(shared)] * 2, "checkpoints/step_00000002"),
        }


def test_all_ranks_take_the_latest(outcomes):
    assert outcomes["shared"] == ["step_00000004", "step_00000004"]
    assert outcomes["named"] == ["step_00000002", "step_00000002"]
    assert outcomes["fresh"] == ["none", "none"]


def test_a_rank_that_does_not_see_the_checkpoint_fails_every_rank(outcomes):
    for message in outcomes["split"]:
        assert message.startswith("error: rank 0 chose to resume from ")
        assert "rank(s) [1] do not see it complete" in message and "filesystem every node shares" in message


def test_resume_none_refuses_an_existing_run_on_every_rank(outcomes):
    for message in outcomes["none_but_exists"]:
        assert message.startswith("error: ") and "already holds checkpoints and checkpoint.resume=none" in message


def test_one_process_behaves_the_same(tmp_path):
    assert CheckpointManager(tmp_path / "nothing").choose("auto") is None
    _save(tmp_path, [1])
    manager = CheckpointManager(tmp_path / "checkpoints")
    assert manager.choose("auto").name == "step_00000001"
    with pytest.raises(CheckpointError, match="is not a complete checkpoint"):
        manager.choose(str(tmp_path / "checkpoints" / "step_00000009"))
