"""Model ladders: shapes for a target size, training recipes by OLMo's ladder rule, IsoFLOP grids.

N below is always the *active* non-embedding parameters (blocks + output head, see
accounting.py; ``active_non_embedding``), and a compute budget C means 6·N·D. For a dense model
active = all; for a mixture of experts (``n_experts`` > 0) N counts the router, the k routed
experts and the shared experts a token uses, not the other E − k experts.

Mixture of experts. With ``n_experts`` = E > 0 every block's FFN is an MoE of E experts, top-``top_k``
routing (router softmax_topk) and ``n_shared_experts`` shared experts; each expert's width is
``expert_d_ff`` when given, else ``expert_ffn_ratio · d_model`` rounded up to a multiple of
``ffn_multiple · tp`` (default ratio ``ffn_ratio / top_k``: the same active FFN width as the dense
shape). The shape search and the recipe below then use the active N.

Shapes. Width is a multiple of ``head_dim · kv_ratio · tp`` so that query and key/value heads
both divide by the tensor-parallel degree; d_ff is ``ffn_ratio · d_model`` rounded up to a
multiple of ``ffn_multiple · tp``; the vocabulary must divide by tp. Among all (depth, width)
whose aspect ratio d_model/n_layers lies in ``aspect_range``, the shape closest in N to the
target is kept when it is within ``size_tolerance``; of several such, the one whose aspect is
closest to ``aspect``.

Recipe (OLMo's ladder, REFERENCES §6). Batch ≈ 160·(N/108M)^(2/3) sequences of 2048 tokens,
which we convert to tokens, divide by our sequence length and round to a multiple of
``batch_multiple`` sequences (OLMo: 32), never below one multiple; it is also capped so a run
takes at least ``min_steps`` steps. Peak lr = 0.0047·(N/108M)^(−1/3) · ``lr_scale``. Warmup = N
tokens, capped at a quarter of the run. Cosine decay to 1% of the peak, AdamW β = (0.9, 0.95),
weight decay 0.05.

Tokens. Compute-optimal D = ``tokens_per_param`` · N (20 by default, Chinchilla's rule of
thumb); a ladder trains each size at multiples of it. An IsoFLOP grid places ``sizes_per_budget``
targets log-uniformly in [N*/spread, N*·spread] around N* = sqrt(C/(6·tokens_per_param)) and
gives each the D = C/(6N) that spends the budget, rounded to whole steps (error ≤ 0.5/steps).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from models.attention.layer import AttentionConfig
from models.decoder.config import DecoderConfig
from models.ffn.moe.config import MoEConfig
from models.ffn.swiglu import SwiGLUConfig
from models.counting import param_counts, training_flops_per_token

OLMO_REFERENCE_N = 108e6
OLMO_REFERENCE_BATCH = 160
OLMO_REFERENCE_SEQ = 2048
OLMO_REFERENCE_LR = 0.0047


@dataclass
class LadderSettings:
    vocab_size: int = 4096
    seq_len: int = 256
    head_dim: int = 64
    kv_ratio: int = 2
    tp: int = 1
    aspect: float = 64.0
    aspect_range: tuple[float, float] = (16.0, 256.0)
    min_layers: int = 2
    max_layers: int = 128
    ffn_ratio: float = 8 / 3
    ffn_multiple: int = 64
    tie_embeddings: bool = False
    size_tolerance: float = 0.05
    tokens_per_param: float = 20.0
    batch_multiple: int = 32
    micro_batch: int = 8
    lr_scale: float = 1.0
    min_steps: int = 20
    n_experts: int = 0
    top_k: int = 2
    expert_d_ff: int = 0
    expert_ffn_ratio: float | None = None
    n_shared_experts: int = 0
    extra: list[str] = field(default_factory=list)

    def validate(self) -> None:
        errors = []
        if self.vocab_size % self.tp:
            errors.append(f"vocab_size {self.vocab_size} must divide by tp {self.tp} (vocabulary-parallel head)")
        if self.head_dim % 2:
            errors.append(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.batch_multiple % self.micro_batch:
            errors.append(
                f"batch_multiple {self.batch_multiple} must be a multiple of micro_batch {self.micro_batch} "
                "(every run then evaluates on the same validation sequences)"
            )
        low, high = self.aspect_range
        if not 0 < low <= self.aspect <= high:
            errors.append(f"aspect {self.aspect} must lie in aspect_range {self.aspect_range}")
        for name in ("head_dim", "kv_ratio", "tp", "min_layers", "ffn_multiple", "micro_batch", "min_steps"):
            if getattr(self, name) < 1:
                errors.append(f"{name} must be >= 1, got {getattr(self, name)}")
        errors += self._moe_problems()
        if errors:
            raise ValueError("invalid ladder settings:\n  - " + "\n  - ".join(errors))

    def _moe_problems(self) -> list[str]:
        if self.n_experts < 0:
            return [f"n_experts must be >= 0 (0: dense), got {self.n_experts}"]
        if not self.n_experts:
            moe_only = {"top_k": 2, "expert_d_ff": 0, "expert_ffn_ratio": None, "n_shared_experts": 0}
            changed = [k for k, default in moe_only.items() if getattr(self, k) != default]
            return [f"{', '.join(changed)} apply only to a mixture of experts: set n_experts > 0"] if changed else []
        errors = []
        if not 1 <= self.top_k <= self.n_experts:
            errors.append(f"top_k must be in 1..n_experts ({self.n_experts}), got {self.top_k}")
        if self.expert_d_ff and self.expert_ffn_ratio is not None:
            errors.append(
                "give expert_d_ff (one width for every shape) or expert_ffn_ratio (a multiple of d_model), not both"
            )
        if self.expert_d_ff < 0 or (self.expert_ffn_ratio is not None and self.expert_ffn_ratio <= 0):
            errors.append(
                f"expert_d_ff must be >= 0 and expert_ffn_ratio > 0, got {self.expert_d_ff}, {self.expert_ffn_ratio}"
            )
        if self.n_shared_experts < 0:
            errors.append(f"n_shared_experts must be >= 0, got {self.n_shared_experts}")
        if self.n_shared_experts and self.expert_d_ff % self.tp:
            errors.append(
                f"expert_d_ff {self.expert_d_ff} must divide by tp {self.tp} "
                "(tensor parallelism shards the shared experts)"
            )
        return errors

    @property
    def moe(self) -> bool:
        return self.n_experts > 0

    @property
    def width_unit(self) -> int:
        return self.head_dim * self.kv_ratio * self.tp


def active_non_embedding(config) -> int:
    """The scaling laws' N: active parameters without the input table (dense: non_embedding)."""
    counts = param_counts(config)
    return counts.active - counts.embedding


def _round_up(x: float, unit: int) -> int:
    return math.ceil(x / unit) * unit


def model_config(d_model: int, n_layers: int, s: LadderSettings) -> DecoderConfig:
    """The decoder config of one (width, depth) under the settings' divisibility rules."""
    unit = s.ffn_multiple * s.tp
    if s.moe:
        ratio = s.ffn_ratio / s.top_k if s.expert_ffn_ratio is None else s.expert_ffn_ratio
        width = s.expert_d_ff or _round_up(ratio * d_model, unit)
        ffn = MoEConfig(n_experts=s.n_experts, top_k=s.top_k, d_ff=width, n_shared_experts=s.n_shared_experts)
    else:
        ffn = SwiGLUConfig(d_ff=_round_up(s.ffn_ratio * d_model, unit))
    n_heads = d_model // s.head_dim
    config = DecoderConfig(
        vocab_size=s.vocab_size, d_model=d_model, n_layers=n_layers, max_seq_len=s.seq_len,
        tie_embeddings=s.tie_embeddings, mixer=AttentionConfig(n_heads=n_heads, n_kv_heads=n_heads // s.kv_ratio),
        ffn=ffn,
    )
    config.validate()
    return config


_PER_WIDTH: dict[tuple[int, str], tuple[int, int]] = {}


def _non_embedding(d_model: int, n_layers: int, s: LadderSettings) -> int:
    """Counted from the modules of one- and two-block models of this width: every block of a
    ladder shape is the same, so the count is linear in depth (the search asks thousands of
    shapes; building each at full depth took minutes)."""
    key = (d_model, repr(s))
    if key not in _PER_WIDTH:
        one, two = (active_non_embedding(model_config(d_model, n, s)) for n in (1, 2))
        _PER_WIDTH[key] = (one, two - one)
    one, per_block = _PER_WIDTH[key]
    return one + (n_layers - 1) * per_block


def shape_for_params(target: float, s: LadderSettings) -> DecoderConfig:
    """The shape whose N is nearest ``target`` (see the module docstring for the rule)."""
    s.validate()
    low, high = s.aspect_range
    unit = s.width_unit
    candidates = []
    for layers in range(s.min_layers, s.max_layers + 1):
        first = max(1, math.ceil(low * layers / unit))
        last = math.floor(high * layers / unit)
        for k in range(first, last + 1):
            n = _non_embedding(k * unit, layers, s)
            candidates.append((abs(math.log(n / target)), abs(math.log(k * unit / layers / s.aspect)), k * unit, layers))
            if n > target:
                break
    if not candidates:
        raise ValueError(f"no shape satisfies aspect_range {s.aspect_range} with width unit {unit}")
    near = [c for c in candidates if c[0] <= math.log1p(s.size_tolerance)]
    best = min(near, key=lambda c: (c[1], c[0])) if near else min(candidates)
    if not near and best[0] > math.log(2):
        n = _non_embedding(best[2], best[3], s)
        raise ValueError(
            f"no shape within a factor 2 of N={target:.3g} (nearest: {n:.3g}, d_model={best[2]}, "
            f"n_layers={best[3]}); lower head_dim/kv_ratio/ffn_multiple or widen aspect_range"
        )
    return model_config(best[2], best[3], s)


def olmo_batch_sequences(n: float, s: LadderSettings) -> int:
    """OLMo's batch rule in sequences of ``s.seq_len``, rounded to ``s.batch_multiple``."""
    tokens = OLMO_REFERENCE_BATCH * OLMO_REFERENCE_SEQ * (n / OLMO_REFERENCE_N) ** (2 / 3)
    return max(1, round(tokens / s.seq_len / s.batch_multiple)) * s.batch_multiple


def olmo_lr(n: float, s: LadderSettings | None = None) -> float:
    scale = 1.0 if s is None else s.lr_scale
    return OLMO_REFERENCE_LR * (n / OLMO_REFERENCE_N) ** (-1 / 3) * scale


def compute_optimal_params(budget: float, tokens_per_param: float = 20.0) -> float:
    """N with C = 6·N·(tokens_per_param·N)."""
    return math.sqrt(budget / (6 * tokens_per_param))


@dataclass
class RunSpec:
    """One planned training run and the recipe the ladder chose for it."""

    name: str
    model: dict
    n: int
    n_total: int
    seq_len: int
    global_batch: int
    micro_batch: int
    max_steps: int
    lr: float
    warmup_steps: int
    tokens: int
    flops: float
    flops_exact: float
    budget: float | None = None
    extra: list[str] = field(default_factory=list)
    n_active: int | None = None

    def overrides(self, run_dir: str | None) -> list[str]:
        """``key=value`` overrides for ``pretrain train`` (``run.dir`` unless None); ``self.extra``
        comes last, so it wins."""
        model = [
            f"model.{MODEL_FIELDS[k]}={str(v).lower() if isinstance(v, bool) else v}" for k, v in self.model.items()
        ]
        where = [] if run_dir is None else [f"run.dir={run_dir}"]
        return model + where + [
            f"data.seq_len={self.seq_len}",
            "data.allow_repeat=true",
            f"train.max_steps={self.max_steps}",
            f"train.global_batch={self.global_batch}",
            f"train.micro_batch={self.micro_batch}",
            f"train.eval_interval={self.max_steps}",
            f"optim.lr={self.lr:.6g}",
            "optim.beta1=0.9",
            "optim.beta2=0.95",
            "optim.weight_decay=0.05",
            "schedule.kind=cosine",
            f"schedule.warmup_steps={self.warmup_steps}",
            "schedule.min_lr_ratio=0.01",
            "checkpoint.interval=0",
        ] + list(self.extra)

    def to_dict(self) -> dict:
        return asdict(self)


# A run's model as a flat row (the sweep tables' columns) → each field's key in the config tree.
MODEL_FIELDS = {
    "vocab_size": "vocab_size", "d_model": "d_model", "n_layers": "n_layers", "n_heads": "mixer.n_heads",
    "n_kv_heads": "mixer.n_kv_heads", "ffn_kind": "ffn.kind", "d_ff": "ffn.d_ff", "n_experts": "ffn.n_experts",
    "top_k": "ffn.top_k", "n_shared_experts": "ffn.n_shared_experts", "max_seq_len": "max_seq_len",
    "tie_embeddings": "tie_embeddings",
}
MOE_FIELDS = ("ffn_kind", "n_experts", "top_k", "n_shared_experts")


def _field(config: DecoderConfig, key: str):
    value = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _si(x: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


def make_run(config: DecoderConfig, tokens: float, s: LadderSettings, name: str | None = None,
             budget: float | None = None) -> RunSpec:
    """The run that trains ``config`` for about ``tokens`` tokens with the OLMo recipe."""
    n = active_non_embedding(config)
    batch = olmo_batch_sequences(n, s)
    fit = math.floor(tokens / (s.min_steps * s.seq_len) / s.batch_multiple) * s.batch_multiple
    batch = max(s.batch_multiple, min(batch, fit))
    batch_tokens = batch * s.seq_len
    steps = max(1, round(tokens / batch_tokens))
    warmup = min(math.ceil(n / batch_tokens), steps // 4)
    d = steps * batch_tokens
    moe = isinstance(config.ffn, MoEConfig)
    model = {k: _field(config, key) for k, key in MODEL_FIELDS.items() if moe or k not in MOE_FIELDS}
    counts = param_counts(config)
    return RunSpec(
        name=name or f"N{_si(n)}_D{_si(d)}", model=model, n=n, n_total=counts.total,
        seq_len=s.seq_len, global_batch=batch, micro_batch=s.micro_batch, max_steps=steps, lr=olmo_lr(n, s),
        warmup_steps=warmup, tokens=d, flops=6.0 * n * d,
        flops_exact=float(training_flops_per_token(config, s.seq_len)) * d, budget=budget, extra=list(s.extra),
        n_active=counts.active,
    )


def size_ladder(sizes: list[float], multiples: list[float], s: LadderSettings) -> list[RunSpec]:
    """Each target size trained for each multiple of its compute-optimal token count."""
    runs = []
    for target in sizes:
        config = shape_for_params(target, s)
        n = active_non_embedding(config)
        for m in multiples:
            runs.append(make_run(config, m * s.tokens_per_param * n, s, name=f"N{_si(n)}_x{m:g}"))
    return runs


def budget_run(budget: float, s: LadderSettings) -> RunSpec:
    """The compute-optimal run (by ``tokens_per_param``) for a budget."""
    config = shape_for_params(compute_optimal_params(budget, s.tokens_per_param), s)
    n = active_non_embedding(config)
    return make_run(config, budget / (6 * n), s, name=f"C{_si(budget)}_N{_si(n)}", budget=budget)


def isoflop_grid(budgets: list[float], sizes_per_budget: int, spread: float, s: LadderSettings) -> list[RunSpec]:
    """Several sizes per budget, each spending the budget (Chinchilla's approach 2)."""
    if sizes_per_budget < 1 or spread < 1:
        raise ValueError("an IsoFLOP grid needs sizes_per_budget >= 1 and spread >= 1")
    runs = []
    for budget in budgets:
        centre = compute_optimal_params(budget, s.tokens_per_param)
        seen = set()
        for i in range(sizes_per_budget):
            t = 0.0 if sizes_per_budget == 1 else i / (sizes_per_budget - 1) * 2 - 1
            config = shape_for_params(centre * spread**t, s)
            key = (config.d_model, config.n_layers)
            if key in seen:
                continue
            seen.add(key)
            n = active_non_embedding(config)
            runs.append(make_run(config, budget / (6 * n), s, name=f"C{_si(budget)}_N{_si(n)}", budget=budget))
    return runs
