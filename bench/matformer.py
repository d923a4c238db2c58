"""MatFormer on CPU, side by side in one run (docs/matformer.md):

    python bench/matformer.py [--steps 300] [--d-model 128] [--layers 4]

1. Quality: one MatFormer trained jointly over widths d_ff·{1/8, 1/4, 1/2, 1}, and four dense
   SwiGLU models of exactly those widths trained independently on the same tokens (same seed,
   data order, schedule). Validation loss of each extracted sub-model next to its dense twin.
2. Cost: time of a joint step vs a full-width dense step (taking turns, in this process), and
   the FLOPs ratio the counting predicts (Σ over widths of each width's FLOPs / the full
   model's). ``--cost-only`` runs just this.
3. Self-speculative decoding with each smaller width as the draft: acceptance rate and tokens/s
   vs plain greedy decoding of the full model, taking turns round by round (outputs checked
   identical). ``--decode-only --joint-run DIR`` runs just this on a finished joint run.
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


def step_times(configs: dict, seq: int, steps: int) -> dict[str, float]:
    """Median seconds per optimizer step (8 sequences, one micro-batch) of each model config,
    through the trainer's runner with its passes; the models take turns step by step, so a
    busy machine slows them alike."""
    from models.passes import train_passes
    from pretrain.optim import OptimConfig, build_optimizer
    from pretrain.parallel.config import ParallelConfig
    from pretrain.parallel.mesh import ParallelDims
    from pretrain.parallel.parallelize import build_parts
    from pretrain.parallel.runtime import ParallelRunner

    cpu = torch.device("cpu")
    dims = ParallelDims.resolve(ParallelConfig(), 1)
    setups = {}
    for name, config in configs.items():
        parts = build_parts(config, ParallelConfig(), dims, None, cpu, seed=0)
        runner = ParallelRunner(parts, dims, None, cpu, n_microbatches=1)
        setups[name] = (config, runner, build_optimizer(parts.parts[0], OptimConfig()))
    tokens = torch.randint(0, 4096, (8, seq + 1), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(8, seq, dtype=torch.long),
             "position_ids": torch.arange(seq).expand(8, seq), "doc_ids": torch.zeros(8, seq, dtype=torch.long)}
    times: dict[str, list[float]] = {name: [] for name in configs}
    for step in range(steps + 2):
        for name, (config, runner, optimizer) in setups.items():
            t0 = time.perf_counter()
            runner.forward_backward([batch], float(8 * seq), train_passes(config, step, 0))
            optimizer.step()
            optimizer.zero_grad()
            if step >= 2:  # warm-up steps not timed
                times[name].append(time.perf_counter() - t0)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def decoding(joint_dir: Path, widths: list[int], new_tokens: int, repeats: int) -> None:
    """Section 3: plain greedy decoding of the full model and self-speculative decoding with each
    smaller width as the draft (k = 2, 4), taking turns in every round (a busy machine slows them
    alike); median tokens/s over the rounds, speed-up = the median of each round's ratio to plain."""
    model, _ = load_checkpoint_model(joint_dir / "checkpoints")
    prompts = [torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
               for n in (4, 16, 32)]
    greedy = [generate(model, p, new_tokens) for p in prompts]
    drafts = [(m, k) for m in widths[:-1] for k in (2, 4)]
    speeds: dict = {None: [], **{d: [] for d in drafts}}
    proposed = dict.fromkeys(drafts, 0)
    accepted = dict.fromkeys(drafts, 0)
    same = dict.fromkeys(drafts, True)
    for _ in range(repeats):
        t0 = time.perf_counter()
        for p in prompts:
            generate(model, p, new_tokens)
        speeds[None].append(len(prompts) * new_tokens / (time.perf_counter() - t0))
        for m, k in drafts:
            t0 = time.perf_counter()
            results = [speculative_generate(model, p, new_tokens, draft_switch(model, m), k=k) for p in prompts]
            speeds[(m, k)].append(len(prompts) * new_tokens / (time.perf_counter() - t0))
            proposed[(m, k)] += sum(s.proposed for _, s in results)
            accepted[(m, k)] += sum(s.accepted for _, s in results)
            same[(m, k)] &= all(torch.equal(out, g) for (out, _), g in zip(results, greedy))

    def median(values):
        return sorted(values)[len(values) // 2]

    print(f"Decoding {new_tokens} tokens after prompts of 4, 16 and 32 tokens, batch 1, {repeats} rounds taking "
          "turns (medians):\n")
    print("| draft width | draft tokens k | acceptance | tokens/s | vs plain greedy | output identical |")
    print("|---:|---:|---:|---:|---:|---|")
    print(f"| (plain greedy, full model) | – | – | {median(speeds[None]):.1f} | 1.00× | – |")
    for m, k in drafts:
        ratio = median([a / b for a, b in zip(speeds[(m, k)], speeds[None])])
        print(f"| {m} | {k} | {accepted[(m, k)] / proposed[(m, k)]:.0%} | {median(speeds[(m, k)]):.1f} | "
              f"{ratio:.2f}× | {same[(m, k)]} |")


def train(run_dir: Path, overrides: list[str]) -> list[dict]:
    """``pretrain train`` with these arguments; the run's metrics records."""
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
    parser.add_argument("--cost-only", action="store_true", help="only the step-cost comparison (section 2)")
    parser.add_argument("--joint-run", default=None, help="reuse this finished joint run directory (same settings)")
    parser.add_argument("--decode-only", action="store_true", help="only section 3, on the --joint-run checkpoint")
    parser.add_argument("--repeats", type=int, default=5, help="decoding rounds (section 3); medians are reported")
    args = parser.parse_args()
    d_ff = 8 * args.d_model
    widths = [d_ff // 8, d_ff // 4, d_ff // 2, d_ff]
    if args.decode_only:
        if not args.joint_run:
            parser.error("--decode-only needs --joint-run (a finished joint run of these settings)")
        decoding(Path(args.joint_run), widths, args.new_tokens, args.repeats)
        return
    common = [
        f"model.d_model={args.d_model}", f"model.n_layers={args.layers}",
        "model.mixer.n_heads=4", "model.mixer.n_kv_heads=2", f"model.ffn.d_ff={d_ff}",
        f"model.max_seq_len={args.seq}", f"data.seq_len={args.seq}", "data.num_workers=0", "train.global_batch=8",
        "train.micro_batch=8", f"train.max_steps={args.steps}", f"train.eval_interval={args.steps}",
        "train.eval_batches=8", f"schedule.warmup_steps={args.steps // 10}", "logging.interval=10",
        f"checkpoint.interval={args.steps}",
    ]
    config = load_config("matformer-tiny", [*common, f"model.ffn.granularities={widths}"])
    dense_config = load_config("tiny", common)
    flops = [training_flops_per_token(config.model, args.seq, level) for level in range(len(widths))]
    times = step_times({"joint": config.model, "dense": dense_config.model}, args.seq, steps=10)
    cost = (f"Joint step vs dense full-width step (same shape, 8 × {args.seq} tokens, median of 10 alternating "
            f"steps): {times['joint'] * 1e3:.0f} ms vs {times['dense'] * 1e3:.0f} ms, "
            f"{times['joint'] / times['dense']:.2f}× the time; counted FLOPs predict {sum(flops) / flops[-1]:.2f}× "
            f"(FFN alone: Σm/d_ff = {sum(widths) / d_ff:.3f}).\n")
    if args.cost_only:
        print(cost)
        return
    root = Path(tempfile.mkdtemp(prefix="bench-matformer-"))
    started = time.time()
    if args.joint_run:  # a finished joint run of these settings (e.g. from an earlier invocation)
        joint_dir = Path(args.joint_run)
    else:
        joint_dir = root / "joint"
        train(joint_dir, ["--config", "matformer-tiny", *common, f"model.ffn.granularities={widths}"])
    dense = {m: train(root / f"dense{m}", ["--config", "tiny", *common, f"model.ffn.d_ff={m}"]) for m in widths}
    rows = sweep_main(joint_dir / "checkpoints", root / "sweep", [[m] for m in widths], batches=8)
    print(f"## MatFormer vs independently trained dense models — `python bench/matformer.py --steps {args.steps} "
          f"--d-model {args.d_model} --layers {args.layers}`\n")
    print(f"{args.steps} steps × 8 × {args.seq} tokens each, built-in corpus, seed 1234; d_model {args.d_model}, "
          f"{args.layers} layers; validation loss on the same 8 × 8 sequences.\n")
    print("| FFN width | parameters | MatFormer (extracted) | dense, trained alone | difference |")
    print("|---:|---:|---:|---:|---:|")
    for row, m in zip(rows, widths):
        alone = [r["valid_loss"] for r in dense[m] if "valid_loss" in r][-1]
        print(f"| {m} | {row['params']:,} | {row['valid_loss']:.4f} | {alone:.4f} | {row['valid_loss'] - alone:+.4f} |")
    print("\n" + cost)

    decoding(joint_dir, widths, args.new_tokens, args.repeats)
    print(f"\n(run took {time.time() - started:.0f} s; {torch.get_num_threads()} threads; run dirs in {root})")


if __name__ == "__main__":
    main()
