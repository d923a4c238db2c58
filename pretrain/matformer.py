"""``pretrain matformer extract | sweep``: standalone models out of a MatFormer checkpoint
(models/ffn/matformer, docs/matformer.md).

- ``extract`` cuts every MatFormer layer to one width (``--granularity m``) or to one width per
  layer (``--per-layer m1,m2,...``, Mix'n'Match; decoders) and writes a standalone dense
  checkpoint in our format (``OUTPUT/checkpoints/step_N``: ``pretrain generate`` and ``export``
  read it) and, when every layer has the same width and a Hugging Face class holds the
  extracted config, a Hugging Face directory (``OUTPUT/hf``, ``LlamaForCausalLM`` for a
  decoder; an encdec's SwiGLU FFNs have no T5 form, so none there, and the reason is printed).
- ``sweep`` evaluates validation loss and parameter count of a list of Mix'n'Match choices — by
  default every uniform width and the paper's monotone choices (widths non-decreasing with depth)
  — and writes ``sweep.md``, ``sweep.json`` and ``sweep.png`` (loss vs parameters).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from models.configtree import to_dict
from models.ffn.matformer import set_granularity
from models.ffn.matformer.extract import extract_config, extract_state_dict, per_layer_widths
from models.spec import LossSettings, build_model, get_spec, hf_adapter
from pretrain.errors import CheckpointError
from pretrain.generation import load_checkpoint_model


def parse_widths(text: str) -> list[int]:
    try:
        return [int(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise CheckpointError(f"widths {text!r} must be integers separated by commas, e.g. 256,256,512") from None


def _widths(config, granularity: int | None, per_layer: list[int] | None) -> list[int]:
    try:
        return per_layer_widths(config, granularity, per_layer)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def _run_config(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "config.json").read_text())


def extract_main(checkpoint, output, granularity: int | None = None, per_layer: list[int] | None = None) -> Path:
    """Write the standalone model; returns OUTPUT (see the module doc)."""
    from pretrain.checkpoint import CheckpointManager, read_marker

    model, path = load_checkpoint_model(checkpoint)
    widths = _widths(model.config, granularity, per_layer)
    config = extract_config(model.config, widths)
    with torch.device("meta"):
        dense = build_model(config)
    dense.to_empty(device="cpu")
    dense.load_state_dict(extract_state_dict(model, widths))
    output = Path(output)
    run_config = _run_config(path)
    run_config["model"] = to_dict(config)
    step = int(read_marker(path)["step"])
    extra = {"step": step, "config": run_config, "extracted_from": str(path), "widths": widths}
    CheckpointManager(output / "checkpoints").save(step, dense, None, extra)
    for name in ("tokenizer.model", "tokenizer.json"):
        source = path.parent.parent / name
        if source.is_file():
            shutil.copyfile(source, output / name)
    if len(set(widths)) == 1 and not getattr(config, "layer_overrides", None) and get_spec(config).hf:
        try:
            adapter = hf_adapter(config)
        except ValueError as e:  # e.g. an encdec with SwiGLU FFNs: T5 has gated-GELU or ReLU ones
            print(f"no Hugging Face directory written: {e}", file=sys.stderr)
        else:
            adapter.to_hf_model(dense).save_pretrained(output / "hf")
    return output


def monotone_choices(granularities: list[int], n_layers: int) -> list[list[int]]:
    """Every uniform width, and between each two neighbouring widths a and b the mixes that
    switch from a to b after a quarter, a half and three quarters of the layers (the paper's
    rule: widths never shrink with depth)."""
    choices = [[g] * n_layers for g in granularities]
    for a, b in zip(granularities, granularities[1:]):
        for cut in sorted({n_layers // 4, n_layers // 2, 3 * n_layers // 4} - {0, n_layers}):
            choices.append([a] * cut + [b] * (n_layers - cut))
    return choices


def sub_model_params(config, widths: list[int]) -> tuple[int, int]:
    """(total, non-embedding) parameters of the sub-model with these widths: the model's, less
    the hidden units each narrowed MatFormer layer leaves out. Counted on the narrowed model, so
    it also holds for mixes a family cannot extract (YOCO)."""
    from models.counting import build_meta, count_params
    from models.ffn.matformer import matformer_ffns

    model = build_meta(config)
    set_granularity(model, widths)
    counts = count_params(model)
    left_out = sum(ffn.inactive_params_per_token() for ffn in matformer_ffns(model))
    return counts.total - left_out, counts.non_embedding - left_out


def sweep_main(checkpoint, output, choices: list[list[int]] | None = None, batches: int | None = None) -> list[dict]:
    """Validation loss and parameters of each choice (rows, also written to OUTPUT)."""
    from data.loader import build_loader
    from models.configtree import from_dict
    from models.ffn.matformer.extract import matformer_layers
    from pretrain.builtin_data import resolve_data
    from pretrain.config import Config
    from pretrain.distributed import DistInfo

    model, path = load_checkpoint_model(checkpoint)
    run = from_dict(Config, _run_config(path))
    ffns = [model.config.layers().ffns[i] for i in matformer_layers(model.config)]
    if not ffns:
        raise CheckpointError(f"{path} holds no MatFormer model (model.ffn.kind is not matformer)")
    if choices is None:
        choices = monotone_choices(ffns[0].granularities, len(ffns))
    rows_widths = [_widths(model.config, None, c if len(c) > 1 else c * len(ffns)) for c in choices]
    data = resolve_data(run, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    n = batches or run.train.eval_batches
    loader = build_loader(data, "valid", dp_rank=0, dp_size=1, global_batch=run.train.micro_batch,
                          micro_batch=run.train.micro_batch, num_samples=n * run.train.micro_batch)
    batches_iter = iter(loader)
    valid = [next(batches_iter) for _ in range(n)]
    spec = get_spec(model.config)
    rows = []
    for widths in rows_widths:
        set_granularity(model, widths)
        total = tokens = 0.0
        with torch.no_grad():
            for batch in valid:
                args, kwargs = spec.inputs(batch)
                settings = LossSettings(fused_head=getattr(model, "fused_loss", False))
                loss, _ = spec.loss(model(*args, **kwargs), spec.targets(batch), 1.0, settings)
                total += float(loss)
                tokens += float(spec.loss_tokens(batch))
        params, non_embedding = sub_model_params(model.config, widths)
        rows.append({"widths": widths, "params": params, "non_embedding": non_embedding,
                     "valid_loss": total / max(tokens, 1.0)})
    set_granularity(model, None)
    _write_sweep(rows, Path(output), path)
    return rows


def _write_sweep(rows: list[dict], output: Path, source: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output.mkdir(parents=True, exist_ok=True)
    (output / "sweep.json").write_text(json.dumps({"checkpoint": str(source), "rows": rows}, indent=2) + "\n")
    lines = [f"# Mix'n'Match sweep of {source}", "", "| widths per layer | parameters | non-embedding | valid loss |",
             "|---|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: r["params"]):
        widths = ",".join(map(str, r["widths"]))
        lines.append(f"| {widths} | {r['params']:,} | {r['non_embedding']:,} | {r['valid_loss']:.4f} |")
    (output / "sweep.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4))
    uniform = [r for r in rows if len(set(r["widths"])) == 1]
    mixed = [r for r in rows if len(set(r["widths"])) > 1]
    for group, style, label in ((uniform, "o-", "uniform width"), (mixed, "x", "Mix'n'Match (monotone)")):
        group = sorted(group, key=lambda r: r["params"])
        if group:
            ax.plot([r["params"] / 1e6 for r in group], [r["valid_loss"] for r in group], style, label=label)
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(output / "sweep.png", dpi=100)
    plt.close(fig)
