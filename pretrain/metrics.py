"""Where training metrics go: console, ``metrics.jsonl`` in the run directory, and wandb.

Only rank 0 writes. On a terminal the console shows a progress bar with an ETA and the latest
metrics; elsewhere (Slurm logs, CI) it prints one concise line per log interval. wandb runs
offline unless ``WANDB_MODE`` or ``logging.wandb_mode`` says otherwise.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass
class LoggingConfig:
    interval: int = 10
    wandb: bool = False
    wandb_project: str = "pretrain"
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    progress_bar: Literal["auto", "on", "off"] = "auto"

    def validate(self) -> list[str]:
        return [] if self.interval > 0 else [f"logging.interval must be > 0, got {self.interval}"]


CONSOLE_FIELDS = (
    ("loss", "loss {:.4f}"),
    ("valid_loss", "valid loss {:.4f}"),
    ("lr", "lr {:.2e}"),
    ("grad_norm", "gnorm {:.3f}"),
    ("tokens_per_s", "{:,.0f} tok/s"),
    ("tflops", "{:.2f} TFLOP/s"),
    ("mfu", "MFU {:.1%}"),
    ("peak_mem_gib", "mem {:.2f} GiB"),
    ("data_wait_s", "data {:.3f}s"),
)


def format_metrics(metrics: dict) -> str:
    parts = [f"step {metrics['step']}"]
    for key, template in CONSOLE_FIELDS:
        value = metrics.get(key)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            parts.append(template.format(value))
    return " | ".join(parts)


class MetricsLogger:
    def __init__(self, run_dir: Path, config: LoggingConfig, max_steps: int, start_step: int,
                 full_config: dict, is_main: bool = True) -> None:
        self.is_main = is_main
        self._jsonl = None
        self._bar = None
        self._wandb = None
        if not is_main:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self._jsonl = open(self.path, "a", buffering=1)
        use_bar = config.progress_bar == "on" or (config.progress_bar == "auto" and sys.stderr.isatty())
        if use_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True)
        if config.wandb:
            import wandb

            os.environ.setdefault("WANDB_MODE", config.wandb_mode)
            self._wandb = wandb.init(
                project=config.wandb_project, dir=str(run_dir), name=run_dir.name,
                config=full_config, resume="allow", id=_wandb_id(run_dir),
            )

    def log(self, metrics: dict) -> None:
        if not self.is_main:
            return
        self._jsonl.write(json.dumps({**metrics, "time": time.time()}) + "\n")
        if self._bar is not None:
            self._bar.n = metrics["step"]
            self._bar.set_postfix_str(format_metrics(metrics).split(" | ", 1)[-1], refresh=True)
        else:
            print(format_metrics(metrics), flush=True)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in metrics.items() if k != "step"}, step=metrics["step"])

    def message(self, text: str) -> None:
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()


def _wandb_id(run_dir: Path) -> str:
    """A stable id per run directory, so a resumed run continues the same wandb run."""
    import hashlib

    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
