"""Training-step throughput and peak memory on CPU: our decoder vs Hugging Face's
LlamaForCausalLM of the same shape, side by side in one run.

    python bench/train_step.py --presets tiny 125m --steps 8 --repeats 3 --threads 1

Variants, each run ``--repeats`` times in its own fresh subprocess (so peak RSS is its own),
alternating so that a slow spell on a shared machine hits all of them:

- ``hf-llama``: a plain PyTorch loop around transformers' LlamaForCausalLM
  (attn_implementation="sdpa"), torch.nn.functional.cross_entropy, torch.nn.utils.clip_grad_norm_
  and torch.optim.AdamW (its default foreach kernels);
- ``ours``: the project's pieces as the trainer runs them: models.spec.build_model (oneDNN CPU
  GEMMs on AVX-512 CPUs, models/linear.py), models.loss.language_model_loss, pretrain.parallel.clip and
  pretrain.optim.build_optimizer (fused AdamW);
- ``ours+compile``: the same with every block compiled (pretrain.parallel.compile, inductor).

All in fp32 on the same random token batches. Each step is forward, cross entropy, backward,
gradient clipping and an AdamW step. The first steps are warm-up (one; two with compile, whose
first step compiles) and are not timed. Reported: the median step over all timed steps of all
repeats, as tokens/s of wall time and tokens per CPU-second of the process (``time.process_time``,
which other jobs on a shared machine disturb less), and the largest peak RSS of any repeat.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

VARIANTS = ("hf-llama", "ours", "ours+compile")


def build_step(variant: str, model_config):
    """(model, one training step on (inputs, labels) returning the loss)."""
    if variant == "hf-llama":
        from transformers import LlamaForCausalLM

        from models.decoder.hf import LLAMA_ADAPTER

        model = LlamaForCausalLM(LLAMA_ADAPTER.config_to_hf(model_config))
        model.config._attn_implementation = "sdpa"
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)

        def loss_of(inputs, labels):
            logits = model(input_ids=inputs).logits
            return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())

        clip = torch.nn.utils.clip_grad_norm_
    else:
        from models.loss import language_model_loss
        from models.spec import build_model
        from pretrain.optim import OptimConfig, build_optimizer
        from pretrain.parallel.clip import clip_grad_norm_

        model = build_model(model_config)
        model.init_weights()
        if variant == "ours+compile":
            from pretrain.parallel.compile import apply_compile

            apply_compile(model)
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


def run_variant(variant: str, preset: str, steps: int, batch: int, seq: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    from pretrain.config import load_config

    model_config = load_config(preset).model
    warmup = 2 if variant == "ours+compile" else 1
    tokens = torch.randint(0, model_config.vocab_size, (warmup + steps, batch, seq + 1))
    model, step = build_step(variant, model_config)
    wall, cpu = [], []
    for index in range(warmup + steps):
        inputs, labels = tokens[index, :, :-1], tokens[index, :, 1:]
        started, cpu_started = time.perf_counter(), time.process_time()
        loss = step(inputs, labels)
        if index >= warmup:
            wall.append(time.perf_counter() - started)
            cpu.append(time.process_time() - cpu_started)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "wall": wall,
        "cpu": cpu,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "final_loss": float(loss),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "125m"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per run")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per variant")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.preset, args.steps, args.batch, args.seq, args.threads)))
        return
    tokens = args.batch * args.seq
    print(f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {args.threads}, "
          f"batch {args.batch} x seq {args.seq}, fp32, {args.steps} timed steps x {args.repeats} runs per variant, "
          "median step\n")
    header = "| preset | variant | tokens/s | vs HF | tokens/CPU-s | vs HF | peak RSS GiB | final loss |"
    print(header + "\n|---|---|---:|---:|---:|---:|---:|---:|")
    for preset in args.presets:
        runs = {variant: [] for variant in args.variants}
        for _ in range(args.repeats):
            for variant in args.variants:
                out = subprocess.run(
                    [sys.executable, __file__, "--variant", variant, "--preset", preset, "--steps", str(args.steps),
                     "--batch", str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads)],
                    check=True, capture_output=True, text=True,
                ).stdout
                runs[variant].append(json.loads(out.strip().splitlines()[-1]))
        rates = {}
        for variant, results in runs.items():
            wall = statistics.median(t for r in results for t in r["wall"])
            cpu = statistics.median(t for r in results for t in r["cpu"])
            rates[variant] = (tokens / wall, tokens / cpu)
        base = rates.get("hf-llama")
        for variant, results in runs.items():
            per_s, per_cpu_s = rates[variant]
            vs = (f"{per_s / base[0]:.2f}x", f"{per_cpu_s / base[1]:.2f}x") if base else ("", "")
            print(f"| {preset} ({results[0]['params'] / 1e6:.1f}M) | {variant} | {per_s:,.0f} | {vs[0]} | "
                  f"{per_cpu_s:,.0f} | {vs[1]} | {max(r['peak_rss_gib'] for r in results):.2f} | "
                  f"{results[0]['final_loss']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
