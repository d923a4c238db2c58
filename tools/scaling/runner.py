"""Sweep plans on disk, launching them (locally or as a Slurm job array), collecting results.

A sweep directory holds ``plan.json`` (the runs with their recipes and the base config),
``plan.csv`` (the same as a table), ``runs/<name>/`` (one trainer run directory each, plus
``train.log`` and ``launch.json`` with the exit code when launched locally), ``slurm/`` (the
array script and its task file) and, after ``collect``, ``results.csv``. Runs start in the
directory ``launch`` (or ``sbatch``) was called from, so relative paths in ``--set`` overrides
resolve from there; a base config given as a file is stored as an absolute path.
"""

from __future__ import annotations

import csv
import json
import math
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tools.scaling.ladder import RunSpec

REPO = Path(__file__).resolve().parents[2]
PLAN_FILE = "plan.json"
TABLE_COLUMNS = ("name", "budget", "N", "N_total", "N_active", "D", "C", "C_exact", "d_model", "n_layers", "n_heads",
                 "n_kv_heads", "d_ff", "n_experts", "top_k", "global_batch", "max_steps", "lr", "warmup_steps")
RESULT_COLUMNS = ("name", "N", "N_total", "N_active", "D", "C", "C_exact", "loss", "train_loss", "valid_loss",
                  "budget", "steps", "global_batch", "lr", "d_model", "n_layers", "n_experts", "top_k", "d_ff")
MOE_TABLE_COLUMNS = ("N_active", "n_experts", "top_k")


class PlanError(ValueError):
    """A sweep directory without a readable plan, or a request the plan cannot satisfy."""


@dataclass
class Plan:
    directory: Path
    base_config: str
    runs: list[RunSpec]
    description: dict

    def run_dir(self, run: RunSpec) -> Path:
        return self.directory / "runs" / run.name

    def select(self, names: list[str] | None) -> list[RunSpec]:
        if not names:
            return list(self.runs)
        known = {r.name: r for r in self.runs}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise PlanError(f"no run named {', '.join(unknown)} in {self.directory / PLAN_FILE}")
        return [known[n] for n in names]


def _active(run: RunSpec) -> int:
    """All active parameters, embedding included (a plan written before MoE: the total)."""
    return run.n_total if run.n_active is None else run.n_active


def _table_row(run: RunSpec) -> dict:
    m = run.model
    return {
        "name": run.name, "budget": "" if run.budget is None else f"{run.budget:.4g}", "N": run.n,
        "N_total": run.n_total, "N_active": _active(run), "n_experts": m.get("n_experts", 0),
        "top_k": m.get("top_k", 0), "D": run.tokens, "C": f"{run.flops:.4g}", "C_exact": f"{run.flops_exact:.4g}",
        "d_model": m["d_model"], "n_layers": m["n_layers"], "n_heads": m["n_heads"], "n_kv_heads": m["n_kv_heads"],
        "d_ff": m["d_ff"], "global_batch": run.global_batch, "max_steps": run.max_steps, "lr": f"{run.lr:.4g}",
        "warmup_steps": run.warmup_steps,
    }


def write_plan(directory, runs: list[RunSpec], base_config: str, description: dict, force: bool = False) -> Plan:
    """Write plan.json and plan.csv; refuse to replace another plan unless ``force``."""
    directory = Path(directory).resolve()
    names = [r.name for r in runs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise PlanError(f"run names must be unique; repeated: {', '.join(duplicates)}")
    path = directory / PLAN_FILE
    if path.exists() and not force:
        raise PlanError(f"{path} exists; choose another directory or pass --force to replace the plan")
    directory.mkdir(parents=True, exist_ok=True)
    plan = Plan(directory, base_config, runs, description)
    payload = {"base_config": base_config, "description": description, "runs": [r.to_dict() for r in runs]}
    path.write_text(json.dumps(payload, indent=1) + "\n")
    with open(directory / "plan.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=TABLE_COLUMNS)
        writer.writeheader()
        writer.writerows(_table_row(r) for r in runs)
    return plan


def read_plan(directory) -> Plan:
    directory = Path(directory).resolve()
    path = directory / PLAN_FILE
    if not path.is_file():
        raise PlanError(f"{directory} has no {PLAN_FILE}; create one with `pretrain scaling plan {directory} ...`")
    try:
        payload = json.loads(path.read_text())
        runs = [RunSpec(**r) for r in payload["runs"]]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise PlanError(f"{path} is not a plan written by `pretrain scaling plan`: {e}") from None
    return Plan(directory, payload["base_config"], runs, payload.get("description", {}))


def format_table(runs: list[RunSpec]) -> str:
    rows = [_table_row(r) for r in runs]
    hidden = ("N_total", "C_exact", "n_kv_heads") + (() if any(r["n_experts"] for r in rows) else MOE_TABLE_COLUMNS)
    columns = [c for c in TABLE_COLUMNS if c not in hidden]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    lines = ["  ".join(c.rjust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r[c]).rjust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- run status


@dataclass
class RunState:
    name: str
    status: str
    detail: str = ""
    steps: int = 0
    train_loss: float | None = None
    valid_loss: float | None = None


def _log_tail(run_dir: Path, lines: int = 1) -> str:
    log = run_dir / "train.log"
    if not log.is_file():
        return ""
    text = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return " | ".join(text[-lines:])


def run_state(plan: Plan, run: RunSpec, metric: str = "valid") -> RunState:
    """complete, missing, failed, incomplete or diverged, with a one-line reason."""
    run_dir = plan.run_dir(run)
    launched = run_dir / "launch.json"
    returncode = json.loads(launched.read_text()).get("returncode") if launched.is_file() else None
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        if returncode:
            return RunState(run.name, "failed", f"exit {returncode} before any metrics: {_log_tail(run_dir)}")
        return RunState(run.name, "missing", f"no {metrics}")
    train, valid = {}, {}
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in record:
            train[record["step"]] = record["loss"]
        if "valid_loss" in record:
            valid[record["step"]] = record["valid_loss"]
    last = max(train, default=0)
    state = RunState(run.name, "complete", steps=last, train_loss=train.get(last), valid_loss=valid.get(run.max_steps))
    if last < run.max_steps:
        state.status = "failed" if returncode else "incomplete"
        state.detail = f"step {last} of {run.max_steps}" + (f", exit {returncode}: {_log_tail(run_dir)}" if returncode else "")
    elif returncode:
        state.status, state.detail = "failed", f"exit {returncode}: {_log_tail(run_dir)}"
    elif metric == "valid" and state.valid_loss is None:
        state.status, state.detail = "incomplete", f"no valid_loss at step {run.max_steps}"
    else:
        value = state.valid_loss if metric == "valid" else state.train_loss
        if value is None or not math.isfinite(value):
            state.status, state.detail = "diverged", f"final {metric} loss {value}"
    return state


# --------------------------------------------------------------------------------- launch


def train_command(plan: Plan, run: RunSpec, python: str = sys.executable) -> list[str]:
    return [python, "-m", "pretrain", "train", "--config", plan.base_config, *run.overrides(str(plan.run_dir(run)))]


def launch_local(plan: Plan, names: list[str] | None = None, dry_run: bool = False, force: bool = False,
                 python: str = sys.executable, log=print) -> int:
    """Run the plan's runs one after another; complete runs are skipped unless ``force``.
    Returns the number of runs that failed."""
    runs = plan.select(names)
    failed = 0
    for i, run in enumerate(runs, 1):
        command = train_command(plan, run, python)
        if dry_run:
            log(shlex.join(command))
            continue
        run_dir = plan.run_dir(run)
        if run_state(plan, run).status == "complete" and not force:
            log(f"[{i}/{len(runs)}] {run.name}: complete, skipped (--force reruns it)")
            continue
        if force and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        log(f"[{i}/{len(runs)}] {run.name}: N={run.n:,} D={run.tokens:,} C={run.flops:.3g}, {run.max_steps} steps")
        started = time.time()
        with open(run_dir / "train.log", "w") as out:
            code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT)
        seconds = time.time() - started
        (run_dir / "launch.json").write_text(json.dumps({"returncode": code, "seconds": seconds, "command": command}))
        state = run_state(plan, run)
        if state.status == "complete":
            log(f"    done in {seconds:.0f} s: train loss {state.train_loss:.4f}, valid loss {state.valid_loss}")
        else:
            failed += 1
            log(f"    {state.status} after {seconds:.0f} s ({state.detail}); log: {run_dir / 'train.log'}")
    return failed


def slurm_files(plan: Plan, names: list[str] | None = None, max_parallel: int | None = None,
                sbatch_args: list[str] = ()) -> tuple[Path, str, Path, str]:
    """The array script and its task file (one "RUN_DIR CONFIG key=value ..." line per task, the
    format cluster/train.sh reads from ARRAY_FILE)."""
    runs = plan.select(names)
    lines = []
    config = str(Path(plan.base_config).resolve()) if Path(plan.base_config).is_file() else plan.base_config
    for run in runs:
        words = [str(plan.run_dir(run)), config, *run.overrides(None)]
        spaced = [w for w in words if not w or any(ch.isspace() for ch in w)]
        if spaced:
            raise PlanError(f"{run.name}: cluster/train.sh splits task lines on spaces; cannot pass {spaced}")
        lines.append(" ".join(words))
    slurm_dir = plan.directory / "slurm"
    array_file = slurm_dir / "array.txt"
    script_file = slurm_dir / "sweep.sbatch"
    array = f"0-{len(runs) - 1}" + (f"%{max_parallel}" if max_parallel else "")
    header = [
        f"--job-name=scaling-{plan.directory.name}", f"--array={array}", "--nodes=1", "--ntasks-per-node=1",
        "--signal=B:USR1@120", "--requeue", "--open-mode=append", f"--output={slurm_dir}/%x-%A_%a.out",
        *sbatch_args,
    ]
    script = "\n".join([
        "#!/usr/bin/env bash",
        f"# Scaling sweep {plan.directory}: {len(runs)} runs, one array task each (pretrain scaling launch --slurm).",
        *(f"#SBATCH {h}" for h in header),
        "set -euo pipefail",
        f"export ARRAY_FILE={shlex.quote(str(array_file))}",
        f"exec bash {shlex.quote(str(REPO / 'cluster' / 'train.sh'))}",
        "",
    ])
    return script_file, script, array_file, "\n".join(lines) + "\n"


def launch_slurm(plan: Plan, names: list[str] | None = None, dry_run: bool = False, max_parallel: int | None = None,
                 sbatch_args: list[str] = (), log=print) -> int:
    """Write the array script and submit it with sbatch (``dry_run``: print the command and files)."""
    script_file, script, array_file, array = slurm_files(plan, names, max_parallel, sbatch_args)
    command = ["sbatch", str(script_file)]
    if dry_run:
        log(shlex.join(command))
        log(f"# {script_file}\n{script}# {array_file}\n{array}", )
        return 0
    script_file.parent.mkdir(parents=True, exist_ok=True)
    script_file.write_text(script)
    array_file.write_text(array)
    if shutil.which("sbatch") is None:
        raise PlanError(f"sbatch is not on PATH; wrote {script_file}: submit it from a Slurm login node")
    result = subprocess.run(command, capture_output=True, text=True)
    log((result.stdout + result.stderr).strip())
    return result.returncode


# -------------------------------------------------------------------------------- collect


def collect(plan: Plan, metric: str = "valid") -> tuple[list[dict], list[RunState]]:
    """One result row per complete run, and the states of the runs that are not."""
    if metric not in ("valid", "train"):
        raise PlanError(f"metric must be valid or train, got {metric!r}")
    rows, problems = [], []
    for run in plan.runs:
        state = run_state(plan, run, metric)
        if state.status != "complete":
            problems.append(state)
            continue
        loss = state.valid_loss if metric == "valid" else state.train_loss
        rows.append({
            "name": run.name, "N": run.n, "N_total": run.n_total, "N_active": _active(run), "D": run.tokens,
            "C": run.flops, "C_exact": run.flops_exact, "loss": loss, "train_loss": state.train_loss,
            "valid_loss": "" if state.valid_loss is None else state.valid_loss,
            "budget": "" if run.budget is None else run.budget, "steps": state.steps,
            "global_batch": run.global_batch, "lr": run.lr, "d_model": run.model["d_model"],
            "n_layers": run.model["n_layers"], "n_experts": run.model.get("n_experts", 0),
            "top_k": run.model.get("top_k", 0), "d_ff": run.model["d_ff"],
        })
    return rows, problems


def write_results(rows: list[dict], path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path
