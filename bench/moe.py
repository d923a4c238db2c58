"""Mixture-of-experts benchmarks on CPU, each comparison side by side in one run.

    python bench/moe.py step      # training step: ours vs HF MixtralForCausalLM of the same shape
    python bench/moe.py profile   # the same steps under torch.profiler: GEMMs, attention, the rest
    python bench/moe.py gemm      # the experts: grouped GEMM vs the per-expert loop
    python bench/moe.py ep        # 2 ranks (gloo): EP2 vs EP1 (FSDP2) at equal work
    python bench/moe.py quality   # validation loss: moe-tiny vs tiny after the same tokens (CLI)

``step``: the moe-tiny shape with Mixtral's router (``topk_softmax``), fp32, one thread. Each
variant runs ``--repeats`` times in its own fresh subprocess (so peak RSS is its own),
alternating: ``hf-mixtral`` is a plain loop around transformers' MixtralForCausalLM (sdpa, its default
experts implementation — ``grouped_mm`` in transformers 5: ``torch._grouped_mm`` on a fused
gate|up weight — ``output_router_logits`` with its Switch loss at our coefficient, cross entropy,
clipping, torch AdamW); ``ours`` the project's model, loss, clipping and fused AdamW. Reported: median
step as tokens/s of wall time and per CPU-second, largest peak RSS.

``profile``: both steps under torch.profiler (self CPU time per op, one thread; of
``--repeats`` alternating runs each variant's fastest, as the profiler's times are wall-clock
and inflate when the machine is shared): the GEMMs and
attention both must do at equal FLOPs, the rest, and the ceiling of any speed-up over HF that
runs its GEMMs and attention as fast as HF does (HF's step over its GEMM + attention time).

``gemm``: one MoE layer's experts at moe-tiny's shape (2048 tokens × top-2 rows, d 256, f 512,
8 experts, a skewed routing), forward + backward, median of ``--repeats``.

``ep``: the moe-tiny shape on 2 ranks (gloo), the same global batch, EP1 (FSDP2 over both,
every rank all 8 experts) vs EP2 (4 experts per rank, all-to-all dispatch); median step time
after a warm-up step, alternating layouts per repeat.

``quality``: ``pretrain train`` of the moe-tiny and tiny presets (same data, batch and schedule:
the same tokens; both at once): by default the presets' own run with validation every 50 steps,
or ``--steps`` steps of ``--batch`` sequences; the validation losses and the last training loss.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def moe_tiny_config(router: str = "topk_softmax"):
    import dataclasses

    from pretrain.config import load_config

    config = load_config("moe-tiny").model
    return dataclasses.replace(config, ffn=dataclasses.replace(config.ffn, router=router, z_loss_coef=0.0))


# ----------------------------------------------------------------------------- step
def build_step(variant: str, config):
    if variant == "hf-mixtral":
        from transformers import MixtralForCausalLM

        from models.decoder.hf_moe import MIXTRAL_ADAPTER

        hf_config = MIXTRAL_ADAPTER.config_to_hf(config)
        hf_config.output_router_logits = True
        model = MixtralForCausalLM(hf_config)
        model.config._attn_implementation = "sdpa"
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)

        def loss_of(inputs, labels):
            out = model(input_ids=inputs)
            ce = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), labels.flatten())
            return ce + hf_config.router_aux_loss_coef * out.aux_loss

        clip = torch.nn.utils.clip_grad_norm_
    else:
        from models.loss import language_model_loss
        from models.spec import build_model
        from pretrain.optim import OptimConfig, build_optimizer
        from pretrain.parallel.clip import clip_grad_norm_

        model = build_model(config)
        model.init_weights()
        optimizer = build_optimizer(model, OptimConfig())

        def loss_of(inputs, labels):
            return language_model_loss(model(inputs), labels)[0]

        clip = clip_grad_norm_

    def step(inputs, labels):
        loss = loss_of(inputs, labels)
        loss.backward()
        clip(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return model, step


def run_step_variant(variant: str, steps: int, batch: int, seq: int) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = moe_tiny_config()
    tokens = torch.randint(0, config.vocab_size, (1 + steps, batch, seq + 1))
    model, step = build_step(variant, config)
    experts = getattr(model.config, "_experts_implementation", None) if variant == "hf-mixtral" else None
    wall, cpu = [], []
    for index in range(1 + steps):
        started, cpu_started = time.perf_counter(), time.process_time()
        step(tokens[index, :, :-1], tokens[index, :, 1:])
        if index:
            wall.append(time.perf_counter() - started)
            cpu.append(time.process_time() - cpu_started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"wall": wall, "cpu": cpu, "peak_rss_gib": peak, "experts": experts, "load": os.getloadavg()[0]}


def bench_step(args) -> None:
    variants = ("hf-mixtral", "ours")
    runs = {v: [] for v in variants}
    for _ in range(args.repeats):
        for variant in variants:
            out = subprocess.run(
                [sys.executable, __file__, "step", "--variant", variant, "--steps", str(args.steps),
                 "--batch", str(args.batch), "--seq", str(args.seq)],
                check=True, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
            ).stdout
            runs[variant].append(json.loads(out.strip().splitlines()[-1]))
    tokens = args.batch * args.seq
    loads = [r["load"] for results in runs.values() for r in results]
    print(f"moe-tiny shape (8 experts top-2, topk_softmax), batch {args.batch} x seq {args.seq}, fp32, 1 thread, "
          f"{args.steps} timed steps x {args.repeats} runs per variant, median step; HF experts implementation "
          f"{runs['hf-mixtral'][0]['experts']!r}; 1-minute load average after each run {min(loads):.1f} to {max(loads):.1f}\n")
    print("| variant | tokens/s | vs HF | tokens/CPU-s | vs HF | peak RSS GiB |\n|---|---:|---:|---:|---:|---:|")
    rates = {}
    for variant, results in runs.items():
        rates[variant] = (
            tokens / statistics.median(t for r in results for t in r["wall"]),
            tokens / statistics.median(t for r in results for t in r["cpu"]),
        )
    base = rates["hf-mixtral"]
    for variant, results in runs.items():
        per_s, per_cpu = rates[variant]
        peak = max(r["peak_rss_gib"] for r in results)
        print(f"| {variant} | {per_s:,.0f} | {per_s / base[0]:.2f}x | {per_cpu:,.0f} | {per_cpu / base[1]:.2f}x | {peak:.2f} |")


# ----------------------------------------------------------------------------- profile
GEMM_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "mkldnn::_linear_pointwise")


def run_profile_variant(variant: str, steps: int, batch: int, seq: int) -> dict:
    """Self CPU time per op over ``steps`` profiled steps after a warm-up step, in three parts:
    GEMMs (dense and grouped: the grouped GEMM's groups run as aten::mm), attention, the rest."""
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = moe_tiny_config()
    tokens = torch.randint(0, config.vocab_size, (1 + steps, batch, seq + 1))
    _, step = build_step(variant, config)
    step(tokens[0, :, :-1], tokens[0, :, 1:])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for index in range(1, 1 + steps):
            step(tokens[index, :, :-1], tokens[index, :, 1:])
    ops = {e.key: e.self_cpu_time_total / 1e6 / steps for e in prof.key_averages()}
    gemm = sum(ops.get(name, 0.0) for name in GEMM_OPS)
    attention = sum(t for name, t in ops.items() if "scaled_dot_product" in name)
    top = sorted(((t, name) for name, t in ops.items() if name not in GEMM_OPS and "scaled_dot_product" not in name), reverse=True)
    return {"total": sum(ops.values()), "gemm": gemm, "attention": attention, "top": top[:8]}


def bench_profile(args) -> None:
    results, loads = {}, []
    for _ in range(args.repeats):  # alternating; each variant's least disturbed run is kept
        for variant in ("hf-mixtral", "ours"):
            out = subprocess.run(
                [sys.executable, __file__, "profile", "--variant", variant, "--steps", str(args.steps),
                 "--batch", str(args.batch), "--seq", str(args.seq)],
                check=True, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
            ).stdout
            run = json.loads(out.strip().splitlines()[-1])
            loads.append(os.getloadavg()[0])
            if variant not in results or run["total"] < results[variant]["total"]:
                results[variant] = run
    print(f"moe-tiny shape, batch {args.batch} x seq {args.seq}, fp32, 1 thread, torch.profiler self CPU time per "
          f"step (mean of {args.steps} after a warm-up; the fastest of {args.repeats} alternating runs per variant); "
          f"1-minute load average {min(loads):.1f} to {max(loads):.1f}\n")
    print("| variant | step s | GEMMs s | attention s | rest s | GEMMs + attention |\n|---|---:|---:|---:|---:|---:|")
    for variant, r in results.items():
        fixed = r["gemm"] + r["attention"]
        print(f"| {variant} | {r['total']:.3f} | {r['gemm']:.3f} | {r['attention']:.3f} | {r['total'] - fixed:.3f} | "
              f"{100 * fixed / r['total']:.0f}% |")
    hf = results["hf-mixtral"]
    print(f"\nceiling of a speed-up over HF at HF's GEMM and attention time: {hf['total'] / (hf['gemm'] + hf['attention']):.2f}x; "
          f"measured here: {hf['total'] / results['ours']['total']:.2f}x")
    for variant, r in results.items():
        print(f"\n{variant}, largest other ops (s per step): " + ", ".join(f"{name} {t:.3f}" for t, name in r["top"]))


# ----------------------------------------------------------------------------- gemm
def bench_gemm(args) -> None:
    from models.ffn.moe.experts import GroupedExperts

    torch.set_num_threads(1)
    tokens, k, d, f, n = 2048, 2, 256, 512, 8
    g = torch.Generator().manual_seed(0)
    experts = torch.multinomial(torch.tensor([8.0, 4, 2, 1, 1, 0.5, 0.5, 0]), tokens * k, replacement=True, generator=g)
    counts = torch.bincount(experts, minlength=n)
    x = torch.randn(tokens * k, d, generator=g)
    times = {}
    for grouped in (True, False, True, False):
        module = GroupedExperts(n, d, f, grouped_gemm=grouped)
        module.init_weights(0.02, 0.02)
        rows = x.clone().requires_grad_()
        elapsed = []
        for _ in range(args.repeats + 1):
            started = time.perf_counter()
            module(rows, counts=counts).square().sum().backward()
            elapsed.append(time.perf_counter() - started)
        times.setdefault(grouped, []).extend(elapsed[1:])
    print(f"experts forward+backward, {tokens} tokens x top-{k}, d {d}, f {f}, {n} experts (one empty), fp32, "
          f"1 thread, median of {2 * args.repeats}\n")
    print("| path | ms | vs loop |\n|---|---:|---:|")
    loop = statistics.median(times[False])
    for grouped, label in ((True, "grouped GEMM (torch._grouped_mm)"), (False, "per-expert loop")):
        ms = statistics.median(times[grouped])
        print(f"| {label} | {ms * 1e3:.1f} | {loop / ms:.2f}x |")


# ----------------------------------------------------------------------------- ep
def _ep_worker(rank: int, world: int, steps: int, repeats: int, micro: int, batch: int, seq: int) -> dict:
    from models.passes import PLAIN
    from pretrain.optim import OptimConfig, build_optimizer
    from pretrain.parallel.config import ParallelConfig
    from pretrain.parallel.mesh import build_mesh, check_layout
    from pretrain.parallel.parallelize import build_parts
    from pretrain.parallel.runtime import ParallelRunner

    config = moe_tiny_config("softmax_topk")
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, config.vocab_size, (steps + 1, batch, seq + 1), generator=g)
    times: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(repeats):
        for ep in (1, 2):
            parallel = ParallelConfig(ep=ep)
            dims = check_layout(parallel, config, world, global_batch=batch, micro_batch=micro, seq_len=seq)
            mesh = build_mesh(dims, "cpu")
            parts = build_parts(config, parallel, dims, mesh, torch.device("cpu"), seed=0)
            runner = ParallelRunner(parts, dims, mesh, torch.device("cpu"), n_microbatches=batch // (world * micro))
            optimizer = build_optimizer(parts.parts[0], OptimConfig())
            per_rank = batch // world
            for step in range(steps + 1):
                rows = data[step, rank * per_rank : (rank + 1) * per_rank]
                mbs = [
                    {
                        "input_ids": rows[i : i + micro, :-1], "labels": rows[i : i + micro, 1:],
                        "position_ids": torch.arange(seq).expand(micro, seq),
                        "doc_ids": torch.zeros(micro, seq, dtype=torch.long),
                        "loss_mask": torch.ones(micro, seq, dtype=torch.long),
                    }
                    for i in range(0, per_rank, micro)
                ]
                torch.distributed.barrier()
                started = time.perf_counter()
                runner.forward_backward(mbs, float(batch * seq), PLAIN)
                runner.clip_grad_norm_(1.0)
                optimizer.step()
                runner.post_step()
                optimizer.zero_grad()
                torch.distributed.barrier()
                if step:
                    times[ep].append(time.perf_counter() - started)
    return times


def bench_ep(args) -> None:
    from tests.parallel.launch import run_ranks

    micro = args.batch // 4
    results = run_ranks(2, _ep_worker, args.steps, args.repeats, micro, args.batch, args.seq)
    ep1, ep2 = (statistics.median(results[0][ep]) for ep in (1, 2))
    tokens = args.batch * args.seq
    print(f"moe-tiny shape (8 experts top-2), 2 ranks (gloo, 1 thread each), global batch {args.batch} x seq "
          f"{args.seq} in micro-batches of {micro}, fp32, median of {args.steps} x {args.repeats} steps\n")
    print("| layout | step s | tokens/s | overhead vs EP1 |\n|---|---:|---:|---:|")
    print(f"| EP1 (FSDP2, 8 experts per rank) | {ep1:.3f} | {tokens / ep1:,.0f} | |")
    print(f"| EP2 (4 experts per rank, all-to-all) | {ep2:.3f} | {tokens / ep2:,.0f} | {100 * (ep2 / ep1 - 1):+.1f}% |")


# ----------------------------------------------------------------------------- quality
def bench_quality(args) -> None:
    common = ["train.eval_batches=8", "checkpoint.interval=0", "data.num_workers=0"]
    if args.steps:  # a shortened run: this many steps of --batch sequences
        common += [
            f"train.max_steps={args.steps}", f"train.eval_interval={args.steps}", f"train.global_batch={args.batch}",
            f"train.micro_batch={args.batch}", f"logging.interval={args.steps}",
            f"schedule.warmup_steps={max(1, args.steps // 8)}",
        ]
    else:  # the presets' own run (150 steps x 16 x 256, their schedule), validation every 50 steps
        common += ["train.eval_interval=50"]
    presets = ("tiny", "moe-tiny")
    with tempfile.TemporaryDirectory() as root:
        started = time.perf_counter()
        runs = [  # both at once, one thread each
            subprocess.Popen(
                [sys.executable, "-m", "pretrain", "train", "--config", preset, *common, f"run.dir={root}/{preset}"],
                cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            for preset in presets
        ]
        if any(run.wait() for run in runs):
            raise RuntimeError("a training run failed")
        elapsed = time.perf_counter() - started
        rows = []
        for preset in presets:
            records = [json.loads(line) for line in (Path(root) / preset / "metrics.jsonl").read_text().splitlines()]
            valid = [r for r in records if "valid_loss" in r]
            train = [r for r in records if "loss" in r][-1]
            loads = [v for k, v in train.items() if k.endswith("/max_load")]
            rows.append((preset, train, valid, max(loads) if loads else None))
    shape = f"{args.steps} steps of {args.batch} x 256 tokens" if args.steps else "the presets' own run"
    print(f"pretrain train --config <preset>, {shape} (the same tokens), built-in corpus, "
          f"both runs at once with 1 thread each ({elapsed:.0f} s)\n")
    print("| preset | step | tokens | train loss | validation loss | max load / mean (worst layer) |\n"
          "|---|---:|---:|---:|---:|---:|")
    from pretrain.config import load_config

    per_step = (args.batch if args.steps else load_config("moe-tiny").train.global_batch) * 256
    for preset, train, valid, load in rows:
        shown = f"{load:.2f}" if load is not None else "–"
        for record in valid:
            last = record is valid[-1]
            loss = f"{train['loss']:.3f}" if last else ""
            tokens = f"{record['step'] * per_step:,}"
            print(f"| {preset} | {record['step']} | {tokens} | {loss} | {record['valid_loss']:.3f} | {shown if last else ''} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("step", "profile", "gemm", "ep", "quality"))
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.what == "step" and args.variant:
        print(json.dumps(run_step_variant(args.variant, args.steps or 4, args.batch, args.seq)))
        return
    if args.what == "profile" and args.variant:
        print(json.dumps(run_profile_variant(args.variant, args.steps or 2, args.batch, args.seq)))
        return
    print(f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}\n")
    if args.steps is None:
        args.steps = {"step": 4, "profile": 2, "gemm": 0, "ep": 4, "quality": 0}[args.what]
    what = {"step": bench_step, "profile": bench_profile, "gemm": bench_gemm, "ep": bench_ep, "quality": bench_quality}
    what[args.what](args)


if __name__ == "__main__":
    main()
