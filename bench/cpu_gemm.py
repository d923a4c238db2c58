"""fp32 GEMM rate on CPU, aten (MKL sgemm) against oneDNN, for the three products of every linear
layer of a preset: forward x·Wᵀ, input gradient g·W and weight gradient gᵀ·x.

    python bench/cpu_gemm.py --presets tiny 125m --tokens 1024 --threads 1

This is the measurement behind models/linear.py's choice (on AVX-512 CPUs oneDNN for the forward
and the input gradient, aten for the weight gradient and for the input gradient of very large weights). Each product is timed in the layout autograd hands it
over (no copies made for it); reported is GFLOP/s of the median of ``--repeats`` calls in
process CPU time.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from models.linear import _onednn_mm_nt


def layer_shapes(preset: str) -> list[tuple[str, int, int]]:
    """(name, in_features, out_features) of each distinct linear layer of a preset."""
    from pretrain.config import load_config

    config = load_config(preset).model
    attention, ffn = config.mixer, config.ffn  # the presets: uniform attention + SwiGLU blocks
    head_dim = attention.resolved_head_dim(config.d_model)
    shapes = {
        "wq": (config.d_model, attention.n_heads * head_dim),
        "wk/wv": (config.d_model, attention.n_kv_heads * head_dim),
        "wo": (attention.n_heads * head_dim, config.d_model),
        "w1/w3": (config.d_model, ffn.d_ff),
        "w2": (ffn.d_ff, config.d_model),
        "head": (config.d_model, config.vocab_size),
    }
    return [(name, d_in, d_out) for name, (d_in, d_out) in shapes.items()]


def cpu_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.process_time()
        fn()
        times.append(time.process_time() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "125m"])
    parser.add_argument("--tokens", type=int, default=1024, help="rows of x: batch × sequence")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {args.threads}, "
          f"{args.tokens} tokens, fp32, GFLOP/s (median of {args.repeats} calls, CPU time)\n")
    print("| preset | layer | in → out | forward aten | forward oneDNN | input grad aten | input grad oneDNN "
          "| weight grad aten | weight grad oneDNN |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for preset in args.presets:
        for name, d_in, d_out in layer_shapes(preset):
            x, weight, grad = torch.randn(args.tokens, d_in), torch.randn(d_out, d_in), torch.randn(args.tokens, d_out)
            products = [
                lambda: x.mm(weight.t()),
                lambda: _onednn_mm_nt(x, weight),
                lambda: grad.mm(weight),
                lambda: _onednn_mm_nt(grad, weight.t()),
                lambda: grad.t().mm(x),
                lambda: _onednn_mm_nt(grad.t(), x.t()),
            ]
            flop = 2 * args.tokens * d_in * d_out
            rates = [flop / cpu_seconds(fn, args.repeats) / 1e9 for fn in products]
            print(f"| {preset} | {name} | {d_in} → {d_out} | " + " | ".join(f"{r:.0f}" for r in rates) + " |",
                  flush=True)


if __name__ == "__main__":
    main()
