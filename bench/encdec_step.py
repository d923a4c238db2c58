"""Encoder-decoder training step on CPU: our ``encdec`` model vs Hugging Face's
T5ForConditionalGeneration of the same shape, side by side in one run.

    python bench/encdec_step.py --preset t5-tiny --steps 6 --repeats 3 --threads 1

Variants, each run ``--repeats`` times in its own fresh subprocess (its own peak RSS),
alternating so that a slow spell on a shared machine hits both:

- ``hf-t5``: a plain PyTorch loop around transformers' T5ForConditionalGeneration (the preset
  converted by our adapter, dropout 0, attn_implementation="sdpa" where transformers offers it),
  torch.nn.functional.cross_entropy, torch.nn.utils.clip_grad_norm_ and torch.optim.AdamW;
- ``ours``: models.spec.build_model, models.loss.language_model_loss, pretrain.parallel.clip and
  pretrain.optim.build_optimizer (fused AdamW), as the trainer runs them;
- ``ours-onednn``: the same with every fp32 linear layer on oneDNN's GEMM (what models/linear.py
  chooses on AVX-512 CPUs only), to measure that choice on the machine at hand.

fp32, the same random rows: ``--batch`` rows of ``--enc`` encoder and ``--dec`` decoder tokens
(t5-tiny's span corruption: 256 and 58). One step = forward, cross entropy, backward, clipping,
AdamW. The first step is warm-up. Reported: the median step as (encoder + decoder) tokens per
second of wall time and per CPU-second of the process, and the largest peak RSS of any repeat.

``--profile VARIANT``: instead, one warm-up and two profiled steps of that variant in this
process, printed as torch.profiler's self CPU time per op.
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

VARIANTS = ("hf-t5", "ours", "ours-onednn")


def build_step(variant: str, model_config):
    from models.spec import build_model

    if variant == "ours-onednn":
        import models.linear

        models.linear.PREFER_ONEDNN = models.linear.ONEDNN_AVAILABLE
    ours = build_model(model_config)
    if variant == "hf-t5":
        from models.encdec.hf import T5_ADAPTER

        model = T5_ADAPTER.to_hf_model(ours).train()
        del ours
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)

        def loss_of(inputs, decoder, labels):
            logits = model(input_ids=inputs, decoder_input_ids=decoder).logits
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())

        clip = torch.nn.utils.clip_grad_norm_
    else:
        from models.loss import language_model_loss
        from pretrain.optim import OptimConfig, build_optimizer
        from pretrain.parallel.clip import clip_grad_norm_

        model = ours.train()
        optimizer = build_optimizer(model, OptimConfig())

        def loss_of(inputs, decoder, labels):
            return language_model_loss(model(inputs, decoder_input_ids=decoder), labels)[0]

        clip = clip_grad_norm_

    def step(inputs, decoder, labels):
        loss = loss_of(inputs, decoder, labels)
        loss.backward()
        clip(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return model, step


def run_variant(variant: str, preset: str, steps: int, batch: int, enc: int, dec: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    from pretrain.config import load_config

    model_config = load_config(preset).model
    vocab = model_config.vocab_size
    inputs = torch.randint(0, vocab, (1 + steps, batch, enc))
    targets = torch.randint(0, vocab, (1 + steps, batch, dec + 1))
    model, step = build_step(variant, model_config)
    wall, cpu = [], []
    for index in range(1 + steps):
        started, cpu_started = time.perf_counter(), time.process_time()
        loss = step(inputs[index], targets[index, :, :-1], targets[index, :, 1:])
        if index:
            wall.append(time.perf_counter() - started)
            cpu.append(time.process_time() - cpu_started)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "wall": wall,
        "cpu": cpu,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "final_loss": float(loss),
    }


def profile_variant(variant: str, preset: str, batch: int, enc: int, dec: int, threads: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    from pretrain.config import load_config

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model_config = load_config(preset).model
    inputs = torch.randint(0, model_config.vocab_size, (3, batch, enc))
    targets = torch.randint(0, model_config.vocab_size, (3, batch, dec + 1))
    _, step = build_step(variant, model_config)
    step(inputs[0], targets[0, :, :-1], targets[0, :, 1:])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for index in (1, 2):
            step(inputs[index], targets[index, :, :-1], targets[index, :, 1:])
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=50))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="t5-tiny")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per run")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--enc", type=int, default=256)
    parser.add_argument("--dec", type=int, default=58)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per variant")
    parser.add_argument("--profile", choices=VARIANTS, help="profile two steps of this variant instead")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.profile:
        profile_variant(args.profile, args.preset, args.batch, args.enc, args.dec, args.threads)
        return
    shape = (args.steps, args.batch, args.enc, args.dec, args.threads)
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.preset, *shape)))
        return
    tokens = args.batch * (args.enc + args.dec)
    print(f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {args.threads}, "
          f"{args.preset}, batch {args.batch} x ({args.enc} + {args.dec}) tokens, fp32, {args.steps} timed steps x "
          f"{args.repeats} runs per variant, median step\n")
    print("| variant | tokens/s | vs HF | tokens/CPU-s | vs HF | peak RSS GiB | final loss |\n"
          "|---|---:|---:|---:|---:|---:|---:|")
    runs = {variant: [] for variant in VARIANTS}
    for _ in range(args.repeats):
        for variant in VARIANTS:
            out = subprocess.run(
                [sys.executable, __file__, "--variant", variant, "--preset", args.preset, "--steps", str(args.steps),
                 "--batch", str(args.batch), "--enc", str(args.enc), "--dec", str(args.dec),
                 "--threads", str(args.threads)],
                check=True, capture_output=True, text=True,
            ).stdout
            runs[variant].append(json.loads(out.strip().splitlines()[-1]))
    rates = {}
    for variant, results in runs.items():
        wall = statistics.median(t for r in results for t in r["wall"])
        cpu = statistics.median(t for r in results for t in r["cpu"])
        rates[variant] = (tokens / wall, tokens / cpu)
    base = rates["hf-t5"]
    for variant, results in runs.items():
        per_s, per_cpu_s = rates[variant]
        print(f"| {variant} ({results[0]['params'] / 1e6:.1f}M) | {per_s:,.0f} | {per_s / base[0]:.2f}x | "
              f"{per_cpu_s:,.0f} | {per_cpu_s / base[1]:.2f}x | {max(r['peak_rss_gib'] for r in results):.2f} | "
              f"{results[0]['final_loss']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
