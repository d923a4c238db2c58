"""Step-time cost of each activation-recomputation mode on CPU.

    python bench/recompute.py [--preset tiny] [--batch 8] [--seq 256] [--steps 8] [--threads 1]

One process trains the preset's model (fp32, SDPA, packed rows without document masks) with each
mode of pretrain.parallel.recompute — none, selective (core attention), op (op-level policy),
full, and full on every second block — on the same random batches: forward, loss, backward,
AdamW. Modes take turns step by step, so that load from other jobs on a shared machine spreads
over all of them; the first round is a warm-up. The table gives the median wall-clock and CPU
time (``time.process_time``, robust to other jobs with ``--threads 1``) per step, the CPU time
relative to no recomputation, and the derived activation bytes per block, averaged over the
blocks (models.decoder.activations.block_activation_bytes; tests check it against measurement).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.decoder.activations import block_activation_bytes  # noqa: E402
from models.loss import language_model_loss  # noqa: E402
from models.spec import build_model  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.optim import OptimConfig, build_optimizer  # noqa: E402
from pretrain.parallel.recompute import apply_ac  # noqa: E402

VARIANTS = [("none", 1), ("selective", 1), ("op", 1), ("full", 1), ("full", 2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(args.preset).model
    models, optimizers = {}, {}
    for mode, every in VARIANTS:
        torch.manual_seed(0)
        model = build_model(config)
        apply_ac(model, mode, every)
        models[mode, every] = model
        optimizers[mode, every] = build_optimizer(model, OptimConfig())
    tokens = torch.randint(0, config.vocab_size, (args.steps + 1, args.batch, args.seq + 1))
    wall: dict = {v: [] for v in VARIANTS}
    cpu: dict = {v: [] for v in VARIANTS}
    for step in range(args.steps + 1):
        for variant in VARIANTS:
            started, started_cpu = time.perf_counter(), time.process_time()
            logits = models[variant](tokens[step, :, :-1])
            loss, _ = language_model_loss(logits, tokens[step, :, 1:])
            loss.backward()
            optimizers[variant].step()
            optimizers[variant].zero_grad(set_to_none=True)
            if step:  # the first round warms up
                wall[variant].append(time.perf_counter() - started)
                cpu[variant].append(time.process_time() - started_cpu)
    base = statistics.median(cpu["none", 1])
    print(
        f"{args.preset}: d_model {config.d_model}, {config.n_layers} blocks, batch {args.batch} x seq {args.seq}, "
        f"fp32, {args.threads} thread(s), {args.steps} timed steps; {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}\n"
    )
    print("| mode | blocks | wall ms/step | CPU ms/step | CPU time vs none | mean activations MiB/block |")
    print("|---|---|---|---|---|---|")
    for mode, every in VARIANTS:
        median_cpu = statistics.median(cpu[mode, every])
        recomputed = "all" if every == 1 else f"every {every}"
        recomputed_blocks = len(range(0, config.n_layers, every))
        per_block = [block_activation_bytes(config, args.batch, args.seq, m) for m in (mode, "none")]
        memory = (recomputed_blocks * per_block[0] + (config.n_layers - recomputed_blocks) * per_block[1])
        memory /= config.n_layers * 2**20
        print(
            f"| {mode} | {recomputed if mode != 'none' else '-'} | {statistics.median(wall[mode, every]) * 1e3:.0f} | "
            f"{median_cpu * 1e3:.0f} | {median_cpu / base:.3f} | {memory:.1f} |"
        )


if __name__ == "__main__":
    main()
