"""``pretrain train | generate | export | report | matformer``: argument parsing only; each
command imports what it runs (so ``pretrain data`` does not load torch)."""

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
    gen.add_argument("--prefill-chunk", type=int, default=None, help="feed the prompt in chunks of this many tokens")
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
    from pretrain.config import DEFAULT_PRESET, load_config
    from pretrain.train import train

    return train(load_config(args.config, args.overrides), preset=args.config or DEFAULT_PRESET)


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


def add_matformer_commands(commands) -> None:
    matformer = commands.add_parser("matformer", help="extract or sweep the nested models of a MatFormer checkpoint")
    sub = matformer.add_subparsers(dest="matformer_command", required=True, metavar="ACTION")
    extract = sub.add_parser("extract", help="write a standalone model of chosen FFN widths")
    extract.add_argument("--checkpoint", required=True, help="a checkpoint directory or a checkpoints/ root (latest)")
    which = extract.add_mutually_exclusive_group(required=True)
    which.add_argument("--granularity", type=int, help="one FFN width for every MatFormer layer")
    which.add_argument("--per-layer", help="one width per MatFormer layer, comma-separated (Mix'n'Match)")
    extract.add_argument("--output", required=True, help="output directory (checkpoints/ and, for one width, hf/)")
    extract.set_defaults(run=_extract)
    sweep = sub.add_parser("sweep", help="validation loss vs parameters of Mix'n'Match choices")
    sweep.add_argument("--checkpoint", required=True)
    sweep.add_argument(
        "--choices", default=None,
        help="';'-separated choices, each one width or a comma-separated per-layer list; "
        "default: every uniform width and monotone (non-decreasing with depth) mixes",
    )
    sweep.add_argument("--output", required=True, help="output directory")
    sweep.add_argument("--batches", type=int, default=None, help="validation batches (default: the run's)")
    sweep.set_defaults(run=_sweep)


def _extract(args) -> int:
    from pretrain.matformer import extract_main, parse_widths

    per_layer = parse_widths(args.per_layer) if args.per_layer else None
    out = extract_main(args.checkpoint, args.output, args.granularity, per_layer)
    print(f"wrote {out}")
    return 0


def _sweep(args) -> int:
    from pretrain.matformer import parse_widths, sweep_main

    choices = [parse_widths(c) for c in args.choices.split(";")] if args.choices else None
    rows = sweep_main(args.checkpoint, args.output, choices, args.batches)
    for r in sorted(rows, key=lambda r: r["params"]):
        print(f"{','.join(map(str, r['widths']))}: {r['params']:,} parameters, valid loss {r['valid_loss']:.4f}")
    return 0
