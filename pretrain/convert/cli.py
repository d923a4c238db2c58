"""``pretrain convert``: argument parsing only (the work is in pretrain/convert)."""

from __future__ import annotations


def add_convert_commands(commands) -> None:
    from pretrain.convert import FORMATS, WRITABLE

    convert = commands.add_parser(
        "convert", help="convert a model between our checkpoints, Hugging Face directories and safetensors",
        description="Convert weights between formats, streaming one tensor at a time, e.g. "
        "pretrain convert --from dcp --to hf runs/x/checkpoints hf/x",
    )
    convert.add_argument("--from", dest="src", required=True, choices=FORMATS)
    convert.add_argument("--to", dest="dst", required=True, choices=WRITABLE)
    convert.add_argument("input", help="dcp: a checkpoint, checkpoints/ root or run directory (its latest); hf: a model "
                         "directory; megatron: a Megatron-LM directory or iteration directory; deepspeed: a save_checkpoint directory "
                         "or one of its tags; safetensors: FILE.safetensors (with FILE.config.json)")
    convert.add_argument("output", help="a directory (dcp, hf) or FILE.safetensors; must not exist unless --overwrite")
    convert.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"), help="cast floating tensors")
    convert.add_argument("--family", default=None, help="refuse the input unless it is a model of this family")
    convert.add_argument("--shard-size", default="5GB", help="largest safetensors shard (hf) or DCP write batch")
    convert.add_argument("--tokenizer", default=None, help="tokenizer file to ship (default: the input's)")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    convert.add_argument("--model-config", default=None,
                         help="our model config (a YAML with a model section, or a preset) for a megatron input without "
                         "Megatron-LM args or a deepspeed checkpoint of our model")
    convert.set_defaults(run=_convert)


def _convert(args) -> int:
    from pretrain.convert import convert

    convert(
        args.src, args.dst, args.input, args.output, dtype=args.dtype, family=args.family,
        shard_size=args.shard_size, tokenizer=args.tokenizer, overwrite=args.overwrite,
        model_config=args.model_config,
    )
    return 0
