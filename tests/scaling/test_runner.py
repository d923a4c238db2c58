"""The sweep loop: plan → launch → collect. Collect on fabricated run directories (complete,
missing, failed, incomplete, diverged); launch --dry-run locally and for Slurm, the array file
read back by cluster/train.sh; and a real local launch of two tiny runs plus a failing one."""

from __future__ import annotations

import csv
import json
import math
import os
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pretrain.cli import main
from tools.scaling.ladder import LadderSettings, isoflop_grid
from tools.scaling.runner import collect, read_plan, write_plan

SMALL = LadderSettings(head_dim=16, aspect=32, batch_multiple=8)


def metrics(run_dir: Path, records: list[dict]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def fabricated(tmp_path):
    """Five planned runs: complete, missing, failed (exit 1), incomplete, diverged."""
    runs = isoflop_grid([3e13], 4, 3.0, SMALL) + isoflop_grid([1e14], 1, 1.0, SMALL)
    plan = write_plan(tmp_path / "sweep", runs, "tiny", {"kind": "test"})
    complete, missing, failed, incomplete, diverged = runs
    last = complete.max_steps
    metrics(plan.run_dir(complete), [
        {"step": 10, "loss": 6.0}, {"step": last, "loss": 4.5}, {"step": last, "valid_loss": 4.75},
        {"step": last, "loss": 4.25},  # a resumed run's later line wins
    ])
    metrics(plan.run_dir(failed), [{"step": 10, "loss": 6.0}])
    (plan.run_dir(failed) / "train.log").write_text("step 10 | loss 6.0\nRuntimeError: out of memory\n")
    (plan.run_dir(failed) / "launch.json").write_text(json.dumps({"returncode": 1}))
    metrics(plan.run_dir(incomplete), [{"step": incomplete.max_steps, "loss": 5.0}])
    metrics(plan.run_dir(diverged), [{"step": diverged.max_steps, "loss": 5.0},
                                     {"step": diverged.max_steps, "valid_loss": float("nan")}])
    return plan


def test_collect_names_missing_and_failed_runs(fabricated, capsys):
    rows, problems = collect(fabricated)
    runs = fabricated.runs
    assert [r["name"] for r in rows] == [runs[0].name]
    row = rows[0]
    assert row["loss"] == 4.75 and row["train_loss"] == 4.25 and row["N"] == runs[0].n and row["D"] == runs[0].tokens
    assert row["C"] == pytest.approx(6 * runs[0].n * runs[0].tokens)
    status = {p.name: (p.status, p.detail) for p in problems}
    assert status[runs[1].name][0] == "missing"
    assert status[runs[2].name][0] == "failed" and "exit 1" in status[runs[2].name][1]
    assert "out of memory" in status[runs[2].name][1]
    assert status[runs[3].name] == ("incomplete", f"no valid_loss at step {runs[3].max_steps}")
    assert status[runs[4].name][0] == "diverged"
    # With the training loss as the metric, the run without a validation loss counts.
    train_rows, _ = collect(fabricated, metric="train")
    assert {r["name"] for r in train_rows} == {runs[0].name, runs[3].name, runs[4].name}

    assert main(["scaling", "collect", str(fabricated.directory)]) == 0
    out, err = capsys.readouterr()
    for run in runs[1:]:
        assert run.name in err
    assert "collected 1 of 5 runs" in out and "1 diverged, 1 failed, 1 incomplete, 1 missing" in out
    with open(fabricated.directory / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["name"] for r in table] == [runs[0].name] and float(table[0]["loss"]) == 4.75


def test_collect_without_any_complete_run_is_an_error(tmp_path, capsys):
    write_plan(tmp_path / "s", isoflop_grid([3e13], 2, 2.0, SMALL), "tiny", {})
    assert main(["scaling", "collect", str(tmp_path / "s")]) == 2
    assert "error: no complete runs" in capsys.readouterr().err
    assert main(["scaling", "collect", str(tmp_path / "nothing")]) == 2
    assert "has no plan.json" in capsys.readouterr().err


def plan_cli(sweep: Path, *extra: str) -> list[str]:
    return ["scaling", "plan", str(sweep), "--isoflop", "3e13,1e14", "--sizes-per-budget", "3", "--head-dim", "16",
            "--aspect", "32", "--batch-multiple", "8", *extra]


def test_plan_and_local_dry_run(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    assert main(plan_cli(sweep, "--set", "train.eval_batches=3")) == 0
    out = capsys.readouterr().out
    assert "6 runs" in out and (sweep / "plan.csv").is_file()
    assert main(plan_cli(sweep)) == 2
    assert "pass --force" in capsys.readouterr().err
    plan = read_plan(sweep)
    assert main(["scaling", "launch", str(sweep), "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 6
    for line, run in zip(lines, plan.runs):
        words = shlex.split(line)
        assert words[1:6] == ["-m", "pretrain", "train", "--config", "tiny"]
        assert f"run.dir={sweep.resolve() / 'runs' / run.name}" in words
        assert f"model.d_model={run.model['d_model']}" in words and f"train.max_steps={run.max_steps}" in words
        assert words[-1] == "train.eval_batches=3"
    assert not (sweep / "runs").exists()
    assert main(["scaling", "launch", str(sweep), "--dry-run", "--only", "nope"]) == 2


def test_slurm_dry_run_and_train_sh_reads_the_array_file(tmp_path, capsys, monkeypatch):
    sweep = tmp_path / "sweep"
    assert main(plan_cli(sweep)) == 0
    capsys.readouterr()
    plan = read_plan(sweep)
    assert main(["scaling", "launch", str(sweep), "--slurm", "--dry-run", "--max-parallel", "2",
                 "--sbatch-arg=--time=01:00:00"]) == 0
    out = capsys.readouterr().out
    script_path, array_path = sweep.resolve() / "slurm" / "sweep.sbatch", sweep.resolve() / "slurm" / "array.txt"
    assert out.splitlines()[0] == f"sbatch {script_path}"
    script = out.split(f"# {script_path}\n")[1].split(f"# {array_path}\n")[0]
    array = out.split(f"# {array_path}\n")[1].strip().splitlines()
    assert "#SBATCH --array=0-5%2" in script and "#SBATCH --time=01:00:00" in script
    assert f"export ARRAY_FILE={array_path}" in script and "cluster/train.sh" in script
    assert not script_path.exists()  # a dry run writes nothing
    assert len(array) == 6
    for line, run in zip(array, plan.runs):
        words = line.split(" ")
        assert words[0] == str(plan.run_dir(run)) and words[1] == "tiny"
        assert all("=" in w and not w.startswith("run.dir=") for w in words[2:])

    # Submit through a stand-in sbatch that records its arguments, then run task 4 of the array
    # with train.sh's DRY_RUN under a fake Slurm environment.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/sbatch.args\necho Submitted batch job 41\n')
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho node1\n")
    for tool in ("sbatch", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    assert main(["scaling", "launch", str(sweep), "--slurm", "--max-parallel", "2", "--sbatch-arg=--time=01:00:00"]) == 0
    assert "Submitted batch job 41" in capsys.readouterr().out
    assert (tmp_path / "sbatch.args").read_text().strip() == str(script_path)
    assert script_path.read_text() == script and array_path.read_text().strip().splitlines() == array
    env = dict(os.environ, SLURM_JOB_ID="42", SLURM_ARRAY_TASK_ID="4",
               SLURM_JOB_NODELIST="node1", SLURM_JOB_NAME="scaling-sweep", DRY_RUN="1")
    result = subprocess.run(["bash", str(script_path)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    run = plan.runs[4]
    command = result.stdout.strip().splitlines()[-1]
    assert f"run.dir={plan.run_dir(run)}" in command
    for override in run.overrides(None):
        assert override in command


def learnable_shards(prefix: Path) -> str:
    """200 documents of 300 tokens; every token's successor is fixed (a cycle through 50 ids)."""
    from data.indexed import IndexedWriter

    writer = IndexedWriter(prefix, np.int32)
    for k in range(200):
        writer.add_document([10 + (k * 7 + i) % 50 for i in range(300)])
    writer.finalize()
    return str(prefix)


def test_real_launch_of_tiny_runs_and_collect(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    prefix = learnable_shards(tmp_path / "data" / "cycle")
    sweep = tmp_path / "sweep"
    assert main(["scaling", "plan", str(sweep), "--ladder", "170000", "--multiples", "0.005,0.01,0.02",
                 "--seq-len", "64", "--head-dim", "16", "--aspect", "16", "--batch-multiple", "8", "--min-steps", "5",
                 "--set", f"data.paths=[{prefix}]", "--set", "data.num_workers=0", "--set", "train.eval_batches=2",
                 "--set", "logging.interval=1"]) == 0
    capsys.readouterr()
    # Break the third run: the trainer must refuse its config and the sweep must say so.
    payload = json.loads((sweep / "plan.json").read_text())
    payload["runs"][2]["model"]["n_heads"] = 3
    (sweep / "plan.json").write_text(json.dumps(payload))
    plan = read_plan(sweep)
    assert plan.runs[0].max_steps >= 5 and plan.runs[1].tokens == pytest.approx(2 * plan.runs[0].tokens, rel=0.25)

    assert main(["scaling", "launch", str(sweep)]) == 1
    out = capsys.readouterr().out
    assert out.count("done in") == 2 and "failed after" in out
    assert main(["scaling", "launch", str(sweep), "--only", plan.runs[0].name]) == 0
    assert "complete, skipped" in capsys.readouterr().out

    rows, problems = collect(plan)
    assert [r["name"] for r in rows] == [r.name for r in plan.runs[:2]]
    for row in rows:
        assert math.isfinite(row["loss"]) and row["loss"] < math.log(4096) - 1  # it learned something
    assert rows[1]["loss"] < rows[0]["loss"]  # twice the tokens, lower loss
    assert len(problems) == 1 and problems[0].status == "failed" and "exit 2" in problems[0].detail
    assert "n_heads" in problems[0].detail
    config = (plan.run_dir(plan.runs[0]) / "config.yaml").read_text()
    assert f"max_steps: {plan.runs[0].max_steps}" in config
