"""YOCO against the same-depth decoder on CPU, side by side in one run: prefill time and the
decode state after the prompt, and training-step throughput.

    python bench/yoco.py --lengths 4096 16384 32768 --chunk 2048 --train-seq 256 --threads 2

Models: the ``tiny`` decoder and the ``yoco-tiny`` (sliding-window self-decoder) and
``yoco-tiny-retention`` (gated-retention self-decoder) presets, random weights, fp32, with
``max_seq_len`` raised to the longest length. Prefill: a batch-1 prompt fed in chunks of
``--chunk`` tokens with a decode state (``state.prefill``: YOCO runs its cross-decoder for each
chunk's last position only), as ``generate(..., prefill_chunk=)`` does — chunks bound the
attention's working memory, which on CPU (explicit masks) would otherwise grow with the square of
the prompt; the median of ``--repeats`` in this process after one warm-up at the shortest length.
The state's bytes are measured on the live caches (and equal ``decode_cache_bytes``, as the tests
check).
Training: forward, loss, backward and AdamW steps on random tokens of ``--train-seq``; median
step time over ``--steps`` after one warm-up step.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.loss import language_model_loss  # noqa: E402
from models.spec import build_model  # noqa: E402
from pretrain.config import load_config  # noqa: E402

PRESETS = ("tiny", "yoco-tiny", "yoco-tiny-retention")


def model_of(preset: str, max_len: int):
    config = dataclasses.replace(load_config(preset).model, max_seq_len=max_len)
    torch.manual_seed(0)
    return build_model(config).eval(), config


@torch.no_grad()
def prefill(model, length: int, chunk: int) -> tuple[float, int]:
    """(seconds, decode-state bytes) of one prefill of ``length`` tokens in chunks."""
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
    state = model.new_decode_state(1, length, torch.float32, "cpu")
    state.prefill = True
    start = time.perf_counter()
    for begin in range(0, length, chunk):
        model(ids[:, begin : begin + chunk], state=state)
    return time.perf_counter() - start, state.nbytes()


def train_step_seconds(preset: str, seq: int, batch: int, steps: int) -> list[float]:
    model, config = model_of(preset, seq)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    times = []
    for step in range(steps + 1):
        ids = torch.randint(0, config.vocab_size, (batch, seq + 1), generator=generator)
        start = time.perf_counter()
        loss = language_model_loss(model(ids[:, :-1]), ids[:, 1:])[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", nargs="+", type=int, default=[4096, 16384, 32768])
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--train-seq", type=int, default=256)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = {p: model_of(p, max(args.lengths))[0] for p in PRESETS}
    for model in models.values():
        prefill(model, min(args.lengths), args.chunk)  # warm-up
    print(f"Prefill, batch 1, chunks of {args.chunk}, fp32, {args.threads} threads (median of {args.repeats}); "
          "state bytes after the prompt\n")
    print("| length | " + " | ".join(f"{p} s | {p} state MiB" for p in PRESETS) + " | prefill speed-up (yoco, retention) |")
    print("|---:|" + "---:|---:|" * len(PRESETS) + "---|")
    for length in args.lengths:
        row = {}
        for preset, model in models.items():
            runs = [prefill(model, length, args.chunk) for _ in range(args.repeats)]
            row[preset] = (statistics.median(t for t, _ in runs), runs[0][1] / 2**20)
        base = row["tiny"][0]
        cells = " | ".join(f"{t:.2f} | {mib:,.1f}" for t, mib in row.values())
        print(f"| {length} | {cells} | {base / row['yoco-tiny'][0]:.1f}×, {base / row['yoco-tiny-retention'][0]:.1f}× |")
    print(f"\nTraining step, batch {args.train_batch} × seq {args.train_seq}, fp32 (median of {args.steps} steps)\n")
    print("| preset | step s | tokens/s | vs tiny |")
    print("|---|---:|---:|---:|")
    base = None
    for preset in PRESETS:
        seconds = statistics.median(train_step_seconds(preset, args.train_seq, args.train_batch, args.steps))
        tokens = args.train_batch * args.train_seq / seconds
        base = base or tokens
        print(f"| {preset} | {seconds:.3f} | {tokens:,.0f} | {tokens / base:.2f}× |")


if __name__ == "__main__":
    main()
