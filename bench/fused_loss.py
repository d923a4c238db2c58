"""Peak memory and time of a training step's forward and backward on CPU, fused vs unfused loss
head (model.kernels.loss: chunked vs torch), side by side in one run.

    python bench/fused_loss.py [--preset 1b] [--layers 1] [--d-model N] [--seq 4096] [--steps 2]
    python bench/fused_loss.py --device cuda     # the same measurement on a GPU (fp32)

The preset's model (default ``1b``: 128256-token vocabulary, d_model 2048, tied embeddings) cut
to ``--layers`` blocks (and to ``--d-model`` width with heads of 64 and d_ff = 4·d_model, if
given: the logits' size does not depend on it, the head's FLOPs do), fp32, micro-batch 1.
Variants, each in its own fresh subprocess (so the memory counters are its own), alternating
over ``--repeats``:

- ``unfused``: the head writes the [tokens, vocab] logits; models.loss.language_model_loss;
- ``fused``: models/fused_loss.py (chunks of ``CHUNK_ELEMENTS`` logits);
- ``trunk``: the same model without a head (backward from a fixed random projection of the
  final hidden states): what the step needs besides the loss path.

For every step after one warm-up step (gradients set to None in between, as the trainer does):
the peak memory during forward + backward above the memory before it (CPU: Linux VmHWM after
resetting it through /proc/self/clear_refs, glibc's mmap threshold pinned so that freed large
buffers go back to the system; GPU: torch.cuda's peak allocated bytes), the CPU time of the
process and the wall time.
"Loss path" = a variant's peak minus the trunk's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ("unfused", "fused", "trunk")
GIB = 2**30


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def run_variant(variant: str, preset: str, layers: int, d_model: int | None, seq: int, steps: int, device: str) -> dict:
    from models import causal_lm
    from models.kernels import KernelsConfig
    from models.spec import LossSettings, build_model
    from pretrain.config import load_config

    torch.manual_seed(0)
    config = load_config(preset).model
    config = dataclasses.replace(
        config, n_layers=layers, max_seq_len=max(seq, config.max_seq_len),
        kernels=KernelsConfig(loss="chunked" if variant == "fused" else "torch"),
    )
    if d_model is not None:
        heads = d_model // 64
        config = dataclasses.replace(
            config, d_model=d_model, mixer=dataclasses.replace(config.mixer, n_heads=heads, n_kv_heads=max(1, heads // 4)),
            ffn=dataclasses.replace(config.ffn, d_ff=4 * d_model),
        )
    dev = torch.device(device)
    model = build_model(config).to(dev)
    settings = LossSettings(fused_head=variant == "fused")
    if variant == "trunk":
        model.head = None
    tokens = torch.randint(0, config.vocab_size, (steps + 1, 1, seq + 1))
    probe = torch.randn(1, seq, config.d_model, device=dev)
    gpu = dev.type == "cuda"
    peaks, cpu, wall = [], [], []
    for index in range(steps + 1):
        batch = {
            "input_ids": tokens[index, :, :-1], "labels": tokens[index, :, 1:],
            "position_ids": torch.arange(seq)[None], "doc_ids": torch.zeros(1, seq, dtype=torch.long),
            "loss_mask": torch.ones(1, seq, dtype=torch.long),
        }
        batch = {key: value.to(dev) for key, value in batch.items()}
        args, kwargs = causal_lm.inputs_with_token_ids(batch)
        if gpu:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            before = _status("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")
        started, cpu_started = time.perf_counter(), time.process_time()
        out = model(*args, **kwargs)
        if variant == "trunk":
            loss = (out * probe).sum()
        else:
            loss = causal_lm.loss(out, causal_lm.targets(batch), None, settings)[0]
        loss.backward()
        if gpu:
            torch.cuda.synchronize()
        if index > 0:
            wall.append(time.perf_counter() - started)
            cpu.append(time.process_time() - cpu_started)
            peaks.append((torch.cuda.max_memory_allocated() if gpu else _status("VmHWM")) - before)
        del out, loss
        model.zero_grad(set_to_none=True)
    return {"peak": max(peaks), "cpu": cpu, "wall": wall, "params": sum(p.numel() for p in model.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="1b")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--d-model", type=int, default=None, help="default: the preset's")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs per variant")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        torch.set_num_threads(args.threads)
        print(json.dumps(run_variant(args.variant, args.preset, args.layers, args.d_model, args.seq, args.steps,
                                     args.device)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(args.repeats):
        for variant in VARIANTS:
            out = subprocess.run(
                [sys.executable, __file__, "--variant", variant, "--preset", args.preset, "--layers", str(args.layers),
                 "--seq", str(args.seq), "--steps", str(args.steps), "--threads", str(args.threads),
                 "--device", args.device, *(["--d-model", str(args.d_model)] if args.d_model else [])],
                check=True, capture_output=True, text=True, env=env,
            ).stdout
            runs[variant].append(json.loads(out.strip().splitlines()[-1]))
    from models.fused_loss import CHUNK_ELEMENTS

    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU {platform.processor() or platform.machine()}"
    width = f", d_model {args.d_model}" if args.d_model else ""
    print(f"{where}, torch {torch.__version__}, threads {args.threads}; "
          f"preset {args.preset} cut to {args.layers} block(s){width}, micro-batch 1 x seq {args.seq}, fp32, "
          f"fused chunk {CHUNK_ELEMENTS} logits; {args.steps} timed steps x {args.repeats} runs, median\n")
    print("| variant | peak above rest GiB | loss path GiB | CPU s / step | wall s / step |")
    print("|---|---:|---:|---:|---:|")
    trunk = max(r["peak"] for r in runs["trunk"])
    for variant, results in runs.items():
        peak = max(r["peak"] for r in results)
        path = f"{(peak - trunk) / GIB:.2f}" if variant != "trunk" else ""
        cpu = statistics.median(t for r in results for t in r["cpu"])
        wall = statistics.median(t for r in results for t in r["wall"])
        print(f"| {variant} | {peak / GIB:.2f} | {path} | {cpu:.2f} | {wall:.2f} |")


if __name__ == "__main__":
    main()
