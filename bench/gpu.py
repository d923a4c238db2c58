"""Everything a GPU run should measure, in one script (under 10 minutes on one H100/H200):

    python bench/gpu.py                       # 1b preset, seq 4096, bf16, every backend × recompute mode
    python bench/gpu.py --output gpu.md       # also write the markdown tables to a file
    python bench/gpu.py --device cpu --preset tiny --seq 256 --steps 2 --backends sdpa --recompute none \
        --kernels torch chunked               # a dry run of the same code on CPU

1. Training step of the preset at ``--seq`` with micro-batch 1, one device, bf16 autocast over
   fp32 master weights (what the trainer does on one GPU): for each attention backend, set for
   every attention layer by ``model.kernels.attention`` (``sdpa``, ``cudnn`` — SDPA restricted to
   cuDNN —, ``flex``, ``flash`` when flash-attn is installed; ``math`` on request with
   ``--backends``, O(S²) memory) and recompute mode, median
   step time, tokens/s, model TFLOP/s and MFU (models/counting.py: active training FLOPs per
   token over the device's dense bf16 peak), and peak memory. Each variant runs in its own
   subprocess (its own peak memory; an out-of-memory variant is reported, not fatal).
   Then, with SDPA and no recompute, each kernel set of ``model.kernels`` (models/kernels.py):
   ``chunked`` (the fused chunked loss), ``compile`` (norm, SwiGLU and RoPE through
   torch.compile, chunked loss), ``liger`` (liger-kernel for all four, when installed).
2. NCCL all-reduce bus bandwidth when several GPUs are visible (torchrun-free: mp.spawn).
3. The GPU-only tests (they skip on CPU): attention kernels against the math reference (each
   backend of the attention switch on the same inputs included), the CUDA loss path against fp64, inductor on GPU, the kernel switch's GPU kernels against the
   pure-torch path.

Needs nothing but the project installed (random tokens, no data, no network).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.kernels import ATTENTION_KERNELS  # noqa: E402  (after the path: runs from a checkout)

# model.kernels choices of each kernel set (the rest stay torch).
KERNEL_SETS = {
    "torch": {},
    "chunked": {"loss": "chunked"},
    "compile": {"norm": "compile", "swiglu": "compile", "rope": "compile", "loss": "chunked"},
    "liger": {"norm": "liger", "swiglu": "liger", "rope": "liger", "loss": "liger"},
}


def run_variant(preset: str, seq: int, backend: str, recompute: str, kernels: str, steps: int, device: str,
                overrides: list[str] = ()) -> dict:
    """One variant in this process: timings and memory of ``steps`` timed steps after 2 warm-up."""
    from contextlib import nullcontext

    from models.counting import mfu, training_flops_per_token
    from pretrain.config import load_config
    from pretrain.optim import build_optimizer
    from pretrain.parallel.config import ParallelConfig
    from pretrain.parallel.mesh import ParallelDims
    from pretrain.parallel.parallelize import build_parts
    from pretrain.parallel.runtime import ParallelRunner

    choices = [f"model.kernels.{slot}={kind}" for slot, kind in KERNEL_SETS[kernels].items()]
    config = load_config(preset, [f"model.kernels.attention={backend}", f"data.seq_len={seq}",
                                  f"model.max_seq_len={max(seq, 1)}", *choices, *overrides])
    dev = torch.device(device)
    dims = ParallelDims.resolve(ParallelConfig(), 1)
    parts = build_parts(config.model, ParallelConfig(), dims, None, dev, recompute=recompute, seed=0)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if dev.type == "cuda" else nullcontext
    runner = ParallelRunner(parts, dims, None, dev, n_microbatches=1, autocast=autocast)
    optimizer = build_optimizer(parts.parts[0], config.optim)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.model.vocab_size, (1, seq + 1), generator=g)
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(1, seq, dtype=torch.long),
             "position_ids": torch.arange(seq)[None], "doc_ids": torch.zeros(1, seq, dtype=torch.long)}
    batch = {k: v.to(dev) for k, v in batch.items()}
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times = []
    for step in range(steps + 2):
        sync()
        started = time.perf_counter()
        runner.forward_backward([batch], float(seq))
        runner.clip_grad_norm_(1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if step >= 2:
            times.append(time.perf_counter() - started)
    step_s = statistics.median(times)
    flops = training_flops_per_token(config.model, seq)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    util = mfu(seq / step_s, flops, name) if dev.type == "cuda" else None
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    return {"step_ms": step_s * 1e3, "tokens_per_s": seq / step_s, "tflops": seq / step_s * flops / 1e12,
            "mfu": util, "peak_gib": peak, "device": name}


def _variant_subprocess(args, backend: str, recompute: str, kernels: str) -> dict:
    command = [sys.executable, __file__, "--variant", backend, recompute, kernels, "--preset", args.preset, "--seq",
               str(args.seq), "--steps", str(args.steps), "--device", args.device, "--set", *args.set]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": "out of memory" if "out of memory" in done.stderr.lower() else last[:160]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _allreduce_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    rows = []
    for mib in (16, 256, 1024):
        x = torch.ones(mib * 2**20 // 2, dtype=torch.bfloat16, device="cuda")
        for _ in range(3):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(10):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - started) / 10
        rows.append({"mib": mib, "ms": seconds * 1e3, "bus_gbps": 2 * (world - 1) / world * x.nbytes / seconds / 1e9})
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def allreduce_table() -> list[str]:
    import socket
    import tempfile

    import torch.multiprocessing as mp

    world = torch.cuda.device_count()
    if world < 2:
        return [f"NCCL all-reduce: skipped ({world} GPU visible; needs 2 or more)."]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tempfile.mktemp(suffix=".json")
    mp.spawn(_allreduce_worker, args=(world, port, out), nprocs=world)
    rows = json.loads(Path(out).read_text())
    lines = [f"NCCL all-reduce over {world} GPUs (bf16, median of 10):", "", "| size MiB | ms | bus GB/s |",
             "|---:|---:|---:|"]
    lines += [f"| {r['mib']} | {r['ms']:.2f} | {r['bus_gbps']:.1f} |" for r in rows]
    return lines


def gpu_tests() -> list[str]:
    files = ["tests/models/test_attention.py", "tests/models/test_attention_switch.py", "tests/models/test_loss.py", "tests/parallel/test_compile.py",
             "tests/models/test_norm.py", "tests/models/test_kernels.py", "tests/models/test_fused_loss.py",
             "tests/models/test_retention.py", "tests/models/test_moe_layer.py"]
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *files],
                          capture_output=True, text=True, cwd=ROOT)
    summary = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    skipped = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED")]
    return [f"GPU test files ({', '.join(files)}): {summary}", *[f"- {s}" for s in skipped]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="1b")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backends", nargs="+", default=None, choices=list(ATTENTION_KERNELS),
                        help="model.kernels.attention choices; default: sdpa, cudnn, flex, and flash if installed")
    parser.add_argument("--recompute", nargs="+", default=["none", "selective", "full"])
    parser.add_argument("--kernels", nargs="+", default=None, choices=list(KERNEL_SETS),
                        help="kernel sets (SDPA, no recompute); default: torch, chunked, compile, and liger if installed")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for every variant, e.g. model.n_layers=4 (a cut-down 1b-moe)")
    parser.add_argument("--no-tests", action="store_true")
    parser.add_argument("--output", default=None)
    parser.add_argument("--variant", nargs=3, metavar=("BACKEND", "RECOMPUTE", "KERNELS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.preset, args.seq, *args.variant, args.steps, args.device, args.set)))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU machine, or try the script with --device cpu --preset tiny --seq 256")
    import importlib.util

    backends = args.backends
    if backends is None:
        backends = ["sdpa", "cudnn", "flex"] + (["flash"] if importlib.util.find_spec("flash_attn") else [])
    kernel_sets = args.kernels
    if kernel_sets is None:
        kernel_sets = ["torch", "chunked", "compile"] + (["liger"] if importlib.util.find_spec("liger_kernel") else [])
    variants = [(b, r, "torch") for b in backends for r in args.recompute]
    variants += [("sdpa", "none", k) for k in kernel_sets if ("sdpa", "none", k) not in variants]
    started = time.time()
    extra = f" --set {' '.join(args.set)}" if args.set else ""
    lines = [f"## GPU run — `python bench/gpu.py --preset {args.preset} --seq {args.seq}{extra}`", "",
             f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}; micro-batch 1 × {args.seq}, "
             f"{'bf16 autocast' if args.device == 'cuda' else 'fp32'}, "
             f"median of {args.steps} steps after 2 warm-up.", "",
             "| attention | recompute | kernels | step ms | tokens/s | TFLOP/s | MFU | peak GiB |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    device = None
    for backend, recompute, kernels in variants:
        r = _variant_subprocess(args, backend, recompute, kernels)
        if "error" in r:
            lines.append(f"| {backend} | {recompute} | {kernels} | {r['error']} | | | | |")
            continue
        device = r["device"]
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "–"
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "–"
        lines.append(f"| {backend} | {recompute} | {kernels} | {r['step_ms']:.0f} | {r['tokens_per_s']:.0f} | "
                     f"{r['tflops']:.1f} | {mfu} | {peak} |")
        print(lines[-1], file=sys.stderr, flush=True)
    lines[2] = f"Device: {device}. " + lines[2]
    lines.append("")
    if args.device == "cuda":
        lines += allreduce_table() + [""]
    if not args.no_tests:
        lines += gpu_tests() + [""]
    lines.append(f"(took {time.time() - started:.0f} s)")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        Path(args.output).write_text(text)


if __name__ == "__main__":
    main()
