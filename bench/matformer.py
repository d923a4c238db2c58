"""MatFormer on CPU, side by side in one run (docs/matformer.md):

    python bench/matformer.py [--steps 300] [--d-model 128] [--layers 4]

1. Quality: one MatFormer trained jointly over widths d_ff·{1/8, 1/4, 1/2, 1}, and four dense
   SwiGLU models of exactly those widths trained independently on the same tokens (same seed,
   data order, schedule). Validation loss of each extracted sub-model next to its dense twin.
2. Cost: tokens/s of the joint step vs the full-width dense step, and the FLOPs ratio the
   counting predicts (Σ over widths of each width's FLOPs / the full model's).
3. Self-speculative decoding with each smaller width as the draft: acceptance rate and tokens/s
   vs plain greedy decoding of the full model (outputs checked identical).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.counting import training_flops_per_token  # noqa: E402
from models.generate import generate  # noqa: E402
from models.speculative import speculative_generate  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.generation import draft_switch, load_checkpoint_model  # noqa: E402
from pretrain.matformer import sweep_main  # noqa: E402


def train(run_dir: Path, overrides: list[str]) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    subprocess.run([sys.executable, "-m", "pretrain", "train", *overrides, f"run.dir={run_dir}"], env=env,
                   check=True, capture_output=True, text=True, cwd=ROOT)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    d_ff = 8 * args.d_model
    widths = [d_ff // 8, d_ff // 4, d_ff // 2, d_ff]
    common = [
        "--config", "matformer-tiny", f"model.d_model={args.d_model}", f"model.n_layers={args.layers}",
        "model.mixer.n_heads=4", "model.mixer.n_kv_heads=2", f"model.ffn.d_ff={d_ff}",
        f"model.max_seq_len={args.seq}", f"data.seq_len={args.seq}", "data.num_workers=0", "train.global_batch=8",
        "train.micro_batch=8", f"train.max_steps={args.steps}", f"train.eval_interval={args.steps}",
        "train.eval_batches=8", f"schedule.warmup_steps={args.steps // 10}", "logging.interval=10",
        f"checkpoint.interval={args.steps}",
    ]
    root = Path(tempfile.mkdtemp(prefix="bench-matformer-"))
    started = time.time()
    joint = train(root / "joint", [*common, f"model.ffn.granularities={widths}"])
    dense = {m: train(root / f"dense{m}", [*common, "model.ffn.kind=swiglu", f"model.ffn.d_ff={m}"]) for m in widths}
    rows = sweep_main(root / "joint" / "checkpoints", root / "sweep", [[m] for m in widths], batches=8)

    def rate(records):  # steady-state tokens/s: the logged windows after the first
        values = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]
        return sum(values) / len(values)

    print(f"## MatFormer vs independently trained dense models — `python bench/matformer.py --steps {args.steps} "
          f"--d-model {args.d_model} --layers {args.layers}`\n")
    print(f"{args.steps} steps × 8 × {args.seq} tokens each, built-in corpus, seed 1234; d_model {args.d_model}, "
          f"{args.layers} layers; validation loss on the same 8 × 8 sequences.\n")
    print("| FFN width | parameters | MatFormer (extracted) | dense, trained alone | difference |")
    print("|---:|---:|---:|---:|---:|")
    for row, m in zip(rows, widths):
        alone = [r["valid_loss"] for r in dense[m] if "valid_loss" in r][-1]
        print(f"| {m} | {row['params']:,} | {row['valid_loss']:.4f} | {alone:.4f} | {row['valid_loss'] - alone:+.4f} |")
    config = load_config(None, [a for a in common if "=" in a] + [f"model.ffn.granularities={widths}"])
    flops = [training_flops_per_token(config.model, args.seq, level) for level in range(len(widths))]
    predicted = sum(flops) / flops[-1]
    measured = rate(dense[d_ff]) / rate(joint)
    print(f"\nJoint step vs dense full-width step: {rate(joint):.0f} vs {rate(dense[d_ff]):.0f} tokens/s, "
          f"{measured:.2f}× the time; counted FLOPs predict {predicted:.2f}× "
          f"(FFN alone: Σm/d_ff = {sum(widths) / d_ff:.3f}).\n")

    model, _ = load_checkpoint_model(root / "joint" / "checkpoints")
    prompts = [torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
               for n in (4, 16, 32)]
    t0 = time.perf_counter()
    greedy = [generate(model, p, args.new_tokens) for p in prompts]
    plain = len(prompts) * args.new_tokens / (time.perf_counter() - t0)
    print("| draft width | draft tokens k | acceptance | tokens/s | vs plain greedy | output identical |")
    print("|---:|---:|---:|---:|---:|---|")
    print(f"| (plain greedy, full model) | – | – | {plain:.1f} | 1.00× | – |")
    for m in widths[:-1]:
        for k in (2, 4):
            t0 = time.perf_counter()
            results = [speculative_generate(model, p, args.new_tokens, draft_switch(model, m), k=k) for p in prompts]
            speed = len(prompts) * args.new_tokens / (time.perf_counter() - t0)
            accepted = sum(s.accepted for _, s in results) / sum(s.proposed for _, s in results)
            same = all(torch.equal(out, g) for (out, _), g in zip(results, greedy))
            print(f"| {m} | {k} | {accepted:.0%} | {speed:.1f} | {speed / plain:.2f}× | {same} |")
    print(f"\n(run took {time.time() - started:.0f} s; {torch.get_num_threads()} threads; run dirs in {root})")


if __name__ == "__main__":
    main()
