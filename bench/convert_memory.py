"""Peak memory and time of ``pretrain convert --from dcp --to hf`` on a preset with random
weights, against ``pretrain export`` (which holds the whole model) as the baseline, each in its
own process (peak RSS from the kernel's ``ru_maxrss`` of that child).

``python bench/convert_memory.py --preset 1b --work /tmp/convbench`` writes the random checkpoint
(itself streamed in 1 GB DCP batches, so the bench never holds the model), converts it, runs the
baseline unless ``--no-baseline``, and prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pretrain.config import load_config  # noqa: E402
from pretrain.convert.dcp_io import write_dcp  # noqa: E402
from pretrain.convert.tensorfile import nbytes  # noqa: E402
from pretrain.convert.weights import Weights, expected_names  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def random_checkpoint(preset: str, out: Path) -> tuple[int, int]:
    """A run directory with a random-weight checkpoint of ``preset``; returns (total bytes,
    largest tensor bytes)."""
    config = load_config(preset).model
    listing, _ = expected_names(config)

    def read():
        generator = torch.Generator().manual_seed(0)
        for name, (shape, dtype) in listing.items():
            yield name, torch.randn(shape, dtype=dtype, generator=generator) * 0.02

    weights = Weights(config, listing, read, None, 0, f"random {preset}")
    if not (out / "checkpoints").is_dir():
        out.mkdir(parents=True, exist_ok=True)
        write_dcp(weights, out, batch_bytes=10**9)
    sizes = [nbytes(s, d) for s, d in listing.values()]
    return sum(sizes), max(sizes)


def measured(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in GB) of ``cmd`` run as a child process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    pid = subprocess.Popen(cmd, env=env).pid
    _, status, usage = os.wait4(pid, 0)
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with status {status}")
    return time.perf_counter() - start, usage.ru_maxrss * 1024 / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="1b")
    parser.add_argument("--work", default="/tmp/convert-bench")
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()
    work = Path(args.work)
    run = work / f"{args.preset}-run"
    total, largest = random_checkpoint(args.preset, run)
    py = sys.executable
    rows = []
    out = work / "hf"
    shutil.rmtree(out, ignore_errors=True)
    seconds, peak = measured([py, "-m", "pretrain", "convert", "--from", "dcp", "--to", "hf", str(run), str(out)])
    rows.append(("pretrain convert --from dcp --to hf (streaming, verified)", seconds, peak))
    shutil.rmtree(out, ignore_errors=True)
    if not args.no_baseline:
        single = work / "export.safetensors"
        seconds, peak = measured([py, "-m", "pretrain", "export", "--checkpoint", str(run / "checkpoints"), "--output", str(single)])
        rows.append(("baseline: pretrain export (whole model in memory)", seconds, peak))
        single.unlink(missing_ok=True)
    print(f"\n{args.preset}: {total / 1e9:.2f} GB of fp32 weights, largest tensor {largest / 1e9:.2f} GB; "
          f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}\n")
    print("| command | time (s) | peak RSS (GB) | peak − largest tensor (GB) |\n|---|---|---|---|")
    for name, seconds, peak in rows:
        print(f"| {name} | {seconds:.0f} | {peak:.2f} | {peak - largest / 1e9:.2f} |")


if __name__ == "__main__":
    main()
