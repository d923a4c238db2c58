"""Context parallelism through the real trainer on the built-in corpus: a CP2 run (parallel.cp=2:
each sequence cut over two ranks, parameters sharded over them) trains with the losses of one
process, and its step-4 checkpoint resumes under CP1 (one process) and under CP2 with TP2; the
one-process run's step-4 checkpoint resumes under CP2; each continues with the losses of the
uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.parallel.launch import run_ranks
from tests.parallel.test_layout_resume import checkpoint, losses, train


@pytest.fixture(scope="module")
def runs(cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("cp_runs")

    def run(name: str, world: int, *overrides: str) -> Path:
        results = run_ranks(world, train, str(cache), str(root / name), list(overrides))
        assert all(r["code"] == 0 for r in results), results
        return root / name

    single = run("single", 1)
    cp2 = run("cp2", 2, "parallel.cp=2", "parallel.dp_shard=1")
    return {
        "single": single,
        "cp2": cp2,
        "cp2_to_cp1": run("cp2_to_cp1", 1, f"checkpoint.resume={checkpoint(cp2, 4)}"),
        "cp2_to_cp2_tp2": run("cp2_to_cp2_tp2", 4, "parallel.cp=2", "parallel.tp=2",
                              f"checkpoint.resume={checkpoint(cp2, 4)}"),
        "cp1_to_cp2": run("cp1_to_cp2", 2, "parallel.cp=2", "parallel.dp_shard=1",
                          f"checkpoint.resume={checkpoint(single, 4)}"),
    }


def test_cp2_trains_like_one_process(runs):
    reference, got = losses(runs["single"]), losses(runs["cp2"])
    assert sorted(got) == list(range(1, 9)) and reference[8] < reference[1] - 0.5
    for step in range(1, 9):
        assert got[step] == pytest.approx(reference[step], abs=1e-5), step


@pytest.mark.parametrize("name, source", [("cp2_to_cp1", "cp2"), ("cp2_to_cp2_tp2", "cp2"), ("cp1_to_cp2", "single")])
def test_checkpoint_resumes_under_another_cp_degree(runs, name, source):
    uninterrupted, resumed = losses(runs[source]), losses(runs[name])
    assert sorted(resumed) == [5, 6, 7, 8], "the run continues at step 5"
    for step in resumed:
        assert resumed[step] == pytest.approx(uninterrupted[step], abs=1e-5), step
