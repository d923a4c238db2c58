"""``pretrain train | generate | export | report``."""

from __future__ import annotations


def add_run_commands(commands) -> None:
    train = commands.add_parser(
        "train", help="train a model (no arguments: the tiny preset on the built-in corpus, on CPU)",
        description="Train from a YAML preset plus dotted overrides, e.g. "
        "pretrain train --config configs/tiny.yaml train.max_steps=50 optim.lr=3e-4 run.dir=runs/x",
    )
    train.add_argument("--config", default=None, help="a YAML file or a preset name (tiny, 125m, 350m, 1b); default tiny")
    train.add_argument("overrides", nargs="*", help="section.key=value (value parsed as YAML)")
    train.set_defaults(run=_train)

    gen = commands.add_parser("generate", help="sample text from a checkpoint with a KV cache")
    gen.add_argument("--checkpoint", required=True, help="a checkpoint directory or a run's checkpoints/ root (latest)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=100)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--tokenizer", default=None, help="default: the tokenizer saved in the run directory")
    gen.add_argument("--no-bos", dest="bos", action="store_false", help="do not prepend BOS to the prompt")
    gen.add_argument(
        "--draft-granularity", type=int, default=None,
        help="MatFormer: greedy self-speculative decoding with the nested sub-model of this FFN width as the draft",
    )
    gen.add_argument("--draft-tokens", type=int, default=4, help="tokens the draft proposes per round")
    gen.set_defaults(run=_generate)

    export = commands.add_parser("export", help="consolidate a checkpoint's weights into one safetensors file")
    export.add_argument("--checkpoint", required=True, help="a checkpoint directory or a checkpoints/ root (latest)")
    export.add_argument("--output", required=True, help="FILE.safetensors")
    export.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"))
    export.set_defaults(run=_export)

    report = commands.add_parser(
        "report", help="plots and a markdown summary of one or more runs (from their metrics.jsonl)",
        description="Plot training/validation loss, learning rate, gradient norm, throughput, MFU, data wait and "
        "every other logged metric, several runs on the same axes, and write summary.md.",
    )
    report.add_argument("run_dirs", nargs="+", help="run directories (each holding metrics.jsonl)")
    report.add_argument("--output", default=None, help="default: RUN_DIR/report of the first run")
    report.set_defaults(run=_report)


def _train(args) -> int:
    from pretrain.config import load_config
    from pretrain.train import train

    return train(load_config(args.config, args.overrides))


def _generate(args) -> int:
    from pretrain.generation import generate_main

    return generate_main(args)


def _report(args) -> int:
    from pathlib import Path

    from pretrain.report import write_report

    output = Path(args.output) if args.output else Path(args.run_dirs[0]) / "report"
    written = write_report([Path(d) for d in args.run_dirs], output)
    print(f"wrote {len(written)} files to {output}: {', '.join(p.name for p in written)}")
    return 0


def _export(args) -> int:
    from pretrain.export import export_main

    return export_main(args.checkpoint, args.output, args.dtype)
