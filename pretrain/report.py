"""``pretrain report RUN_DIR [RUN_DIR ...]``: plots and a markdown summary of training runs, read
from their ``metrics.jsonl``; written automatically into ``RUN_DIR/report/`` when a run ends.

Plots (PNG, one per quantity, every run on the same axes): training and validation loss,
learning rate, gradient norm, tokens/s, MFU, data-wait time, and every other numeric metric the
runs logged (auxiliary loss terms, per-module metrics such as expert load). The summary lists per
run the steps, the final training and validation loss, the mean throughput and MFU over the
logged steps, the wall time between the first and last record, and the checkpoints on disk.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from pretrain.errors import ReportError

# Plotted first, in this order, with these titles; any other numeric key follows, by name.
KNOWN = {
    "loss": "training loss",
    "lr": "learning rate",
    "grad_norm": "gradient norm",
    "tokens_per_s": "tokens/s (all ranks)",
    "mfu": "MFU",
    "data_wait_s": "data wait per logging window (s)",
}
NOT_PLOTTED = {"step", "time", "skipped", "valid_loss", "tokens_per_s_per_device", "tflops", "peak_mem_gib"}


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training records, validation records), each sorted by step; where a resumed run logged a
    step again, its last record wins."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"{path} does not exist; pass a run directory that `pretrain train` wrote")
    train: dict[int, dict] = {}
    valid: dict[int, dict] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ReportError(f"{path}:{number} is not a JSON line") from None
        target = valid if "valid_loss" in record else train
        target[int(record["step"])] = record
    return [train[s] for s in sorted(train)], [valid[s] for s in sorted(valid)]


def _mean(values: list) -> float | None:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def summarize(run_dir: Path) -> dict:
    """The summary numbers of one run (None where the run did not log the quantity)."""
    train, valid = read_metrics(run_dir)
    from pretrain.checkpoint import CheckpointManager

    times = [r["time"] for r in train + valid if "time" in r]
    checkpoints = CheckpointManager(Path(run_dir) / "checkpoints").checkpoints()
    return {
        "run": str(run_dir),
        "steps": train[-1]["step"] if train else 0,
        "final_loss": train[-1].get("loss") if train else None,
        "final_valid_loss": valid[-1]["valid_loss"] if valid else None,
        "mean_tokens_per_s": _mean([r.get("tokens_per_s") for r in train]),
        "mean_mfu": _mean([r.get("mfu") for r in train]),
        "wall_time_s": max(times) - min(times) if len(times) > 1 else None,
        "checkpoints": [p.name for p in checkpoints],
    }


def _cell(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def summary_markdown(summaries: list[dict]) -> str:
    lines = [
        "| run | steps | final loss | final valid loss | tokens/s (mean) | MFU (mean) | wall time (s) | checkpoints |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        lines.append(
            f"| {s['run']} | {s['steps']} | {_cell(s['final_loss'], '.4f')} | {_cell(s['final_valid_loss'], '.4f')} "
            f"| {_cell(s['mean_tokens_per_s'], ',.0f')} | {_cell(s['mean_mfu'], '.2%')} "
            f"| {_cell(s['wall_time_s'], '.1f')} | {', '.join(s['checkpoints']) or '—'} |"
        )
    return "\n".join(lines) + "\n"


def _plotted_keys(runs: list[list[dict]]) -> list[str]:
    present = set()
    for records in runs:
        for record in records:
            present.update(k for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    extra = sorted(present - set(KNOWN) - NOT_PLOTTED)
    return [k for k in KNOWN if k in present] + extra


def _file_name(key: str) -> str:
    """A metric's plot file name: module metrics (``layers.0.ffn.routed/max_load``) hold a '/'."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", key)


def write_report(run_dirs: list[Path], output: Path) -> list[Path]:
    """Write ``summary.md`` and one PNG per metric into ``output``; return the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {Path(d): read_metrics(d) for d in run_dirs}
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for key in _plotted_keys([train for train, _ in runs.values()]):
        fig, ax = plt.subplots(figsize=(7, 4))
        for run_dir, (train, valid) in runs.items():
            points = [(r["step"], r[key]) for r in train if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), label=f"{run_dir.name} train" if key.split("/")[0] == "loss" else run_dir.name)
            valid_key = f"valid_{key}"  # loss → valid_loss; loss/<pass> → valid_loss/<pass>
            if key.split("/")[0] == "loss" and any(valid_key in r for r in valid):
                ax.plot([r["step"] for r in valid if valid_key in r], [r[valid_key] for r in valid if valid_key in r],
                        "o--", label=f"{run_dir.name} validation")
        ax.set_xlabel("step")
        ax.set_title(KNOWN.get(key, key))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = output / f"{_file_name(key)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    summary = output / "summary.md"
    summary.write_text("# Run report\n\n" + summary_markdown([summarize(d) for d in runs]))
    written.append(summary)
    return written
