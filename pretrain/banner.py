"""The lines ``pretrain train`` prints before its first step: what will run, on what, for how long.

Everything here is read from the validated config, the resolved layout and the data on disk, so
the banner costs no more than opening the shards' index files.
"""

from __future__ import annotations

from data.blend import parse_blend
from data.gpt_dataset import TokenSource
from models.counting import param_counts
from models.kernels import attention_overrides
from pretrain.config import Config
from pretrain.parallel.mesh import ParallelDims


def _millions(n: int) -> str:
    return f"{n / 1e6:,.2f}M"


def run_banner(
    config: Config, dims: ParallelDims, data_paths: list, resumed_from: str | None, step: int, preset: str | None = None
) -> list[str]:
    """``model``, ``layout``, ``batch``, ``length``, ``data``, ``run`` and ``resume`` lines;
    ``preset`` is the ``--config`` the run was loaded from (a preset name or a YAML path)."""
    model, train, seq_len = config.model, config.train, config.data.seq_len
    counts = param_counts(model)
    tokens_per_step = train.global_batch * seq_len
    accumulation = train.global_batch // (train.micro_batch * dims.dp)
    lines = [
        f"model   {model.family}{f' (preset {preset})' if preset else ''}, {model.n_blocks} blocks: "
        f"{_millions(counts.total)} parameters ({_millions(counts.active)} active per token, "
        f"{_millions(counts.embedding)} embedding)",
        f"layout  {dims.world} rank(s): {dims.describe()}",
        f"batch   {train.global_batch} sequences x {seq_len} tokens = {tokens_per_step:,} tokens per step "
        f"(micro-batch {train.micro_batch} per rank, {accumulation} accumulation step(s))",
        f"length  {train.max_steps:,} steps = {train.max_steps * tokens_per_step:,} tokens",
    ]
    lines += _kernel_lines(model)
    prefixes, weights = parse_blend(data_paths)
    for prefix, weight in zip(prefixes, weights or [None] * len(prefixes), strict=True):
        share = f", weight {weight:g}" if weight is not None else ""
        lines.append(f"data    {prefix} ({TokenSource(prefix).num_tokens:,} tokens{share})")
    lines.append(f"run     {config.run.dir}")
    lines.append(f"resume  resumed from {resumed_from} at step {step}" if resumed_from else "resume  none: from step 0")
    return lines


def _kernel_lines(model) -> list[str]:
    """With ``model.kernels.attention`` set: the backend every attention layer runs, and the
    per-layer backends it overrides."""
    kernels = getattr(model, "kernels", None)
    if kernels is None or kernels.attention is None:
        return []
    overrides = attention_overrides(model)
    overridden = f" (overrides {', '.join(overrides)})" if overrides else ""
    return [f"kernels attention={kernels.attention} in every attention layer{overridden}"]
