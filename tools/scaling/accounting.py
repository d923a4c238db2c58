"""Parameter and FLOP accounting for scaling-law work, under the conventions papers use.

Conventions (all *training* FLOPs per token, forward + backward = 3 × forward):

* ``exact``: ``models.counting.training_flops_per_token``, every matmul of our model plus causal
  attention; the number MFU uses.
* ``six_n``: 6·N with N = *active* non-embedding parameters (blocks + output head; the input
  table is a lookup, not a matmul; a mixture of experts counts the router and the k experts a
  token uses). This is the N the ladder and the fits use: 6N is then the matmul work.
* ``kaplan``: 3 × (2·N_blocks + 2·n_layers·n_ctx·d_attn) (Kaplan et al. 2020, table 1), N_blocks
  = the blocks' weights only, embedding and de-embedding excluded as in their N.
* ``chinchilla``: 3 × the forward count of Hoffmann et al. 2022, appendix F: embeddings as a
  matmul, Q/K/V and output projections, full (not causal) S×S logits and reductions, 3 FLOPs per
  softmax entry, the dense block, and the final logits.

Chinchilla's table A4 ratios (detailed / 6ND) reproduce when the forward count omits the
embedding and logits terms and N is their own parameter count (blocks with a relative-position
projection, d·(k·h), per layer, plus one V·d table); with the two terms included the ratios come
out 4-54% higher. ``chinchilla_table_a4`` computes both.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from models.attention.layer import AttentionConfig
from models.counting import ParamCounts, build_meta, param_counts, training_flops_per_token
from models.ffn.swiglu import SwiGLUConfig


@dataclass(frozen=True)
class ChinchillaShape:
    """A transformer shape in Chinchilla's vocabulary (their tables A4 and A9)."""

    n_layers: int
    d_model: int
    ffw_size: int
    n_heads: int
    key_size: int
    vocab_size: int = 32000
    n_kv_heads: int | None = None
    ffn_matrices: int = 2

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads


# Table A4: (label, shape, published FLOP ratio ours/6ND); sequence length 2048, vocabulary 32k.
CHINCHILLA_TABLE_A4 = [
    ("73M", ChinchillaShape(10, 640, 2560, 10, 64), 1.03),
    ("305M", ChinchillaShape(20, 1024, 4096, 16, 64), 1.10),
    ("552M", ChinchillaShape(24, 1280, 5120, 10, 128), 1.08),
    ("1.1B", ChinchillaShape(26, 1792, 7168, 14, 128), 1.04),
    ("1.6B", ChinchillaShape(28, 2048, 8192, 16, 128), 1.03),
    ("6.8B", ChinchillaShape(40, 3584, 14336, 28, 128), 0.99),
]
CHINCHILLA_SEQ_LEN = 2048


def chinchilla_param_count(shape: ChinchillaShape) -> int:
    """Chinchilla's N: per layer Q, K, V, O, the relative-position projection and the dense
    block; plus one vocabulary table (biases and norms are negligible and left out)."""
    attn = shape.key_size * shape.n_heads
    per_layer = 4 * shape.d_model * attn + shape.d_model * attn + shape.ffn_matrices * shape.d_model * shape.ffw_size
    return shape.n_layers * per_layer + shape.vocab_size * shape.d_model


def chinchilla_forward_flops(shape: ChinchillaShape, seq_len: int, include_embeddings: bool = True) -> int:
    """Forward FLOPs of one sequence by appendix F. Grouped-query attention (``n_kv_heads``) and a
    gated FFN (``ffn_matrices=3``) extend their formula in the obvious way."""
    s, d, k, h = seq_len, shape.d_model, shape.key_size, shape.n_heads
    qkv = 2 * s * d * k * (h + 2 * shape.kv_heads)
    logits = 2 * s * s * k * h
    softmax = 3 * h * s * s
    reduce = 2 * s * s * k * h
    out = 2 * s * k * h * d
    dense = 2 * s * shape.ffn_matrices * d * shape.ffw_size
    layers = shape.n_layers * (qkv + logits + softmax + reduce + out + dense)
    if not include_embeddings:
        return layers
    embed = 2 * s * shape.vocab_size * d
    final_logits = 2 * s * d * shape.vocab_size
    return embed + layers + final_logits


def chinchilla_table_a4(include_embeddings: bool = False) -> list[dict]:
    """Our reproduction of table A4: per published shape, N, detailed/6ND and the published ratio."""
    rows = []
    for label, shape, published in CHINCHILLA_TABLE_A4:
        n = chinchilla_param_count(shape)
        detailed = 3 * chinchilla_forward_flops(shape, CHINCHILLA_SEQ_LEN, include_embeddings)
        rows.append({
            "label": label, "N": n, "ratio": detailed / (6 * n * CHINCHILLA_SEQ_LEN), "published": published,
        })
    return rows


def _uniform_attention_swiglu(config) -> tuple[AttentionConfig, SwiGLUConfig]:
    """The mixer and FFN of a decoder whose blocks are all attention + SwiGLU (what these
    published conventions describe)."""
    mixer, ffn = getattr(config, "mixer", None), getattr(config, "ffn", None)
    if not isinstance(mixer, AttentionConfig) or not isinstance(ffn, SwiGLUConfig) or config.layer_overrides:
        raise ValueError(
            "the Kaplan and Chinchilla counts know decoders of uniform attention + swiglu blocks, not "
            f"family={config.family!r} mixer={mixer!r} ffn={ffn!r} with {len(getattr(config, 'layer_overrides', []))} "
            "layer overrides"
        )
    return mixer, ffn


def chinchilla_shape(config) -> ChinchillaShape:
    """Our decoder config in Chinchilla's terms (SwiGLU: three d×d_ff matrices)."""
    mixer, ffn = _uniform_attention_swiglu(config)
    return ChinchillaShape(
        n_layers=config.n_layers, d_model=config.d_model, ffw_size=ffn.d_ff, n_heads=mixer.n_heads,
        key_size=mixer.resolved_head_dim(config.d_model), vocab_size=config.vocab_size,
        n_kv_heads=mixer.n_kv_heads, ffn_matrices=3,
    )


def block_matmul_params(config) -> int:
    """Weights of the blocks' linear layers (Kaplan's N: no norms, no embedding or head)."""
    model = build_meta(config)
    blocks = [model.get_submodule(name) for name in model.block_names()]
    return sum(m.weight.numel() for b in blocks for m in b.modules() if isinstance(m, nn.Linear))


def kaplan_flops_per_token(config, seq_len: int) -> float:
    """Training FLOPs per token by Kaplan et al.: 3 × (2·N_blocks + 2·n_layers·n_ctx·d_attn)."""
    mixer, _ = _uniform_attention_swiglu(config)
    d_attn = mixer.n_heads * mixer.resolved_head_dim(config.d_model)
    return 3 * (2 * block_matmul_params(config) + 2 * config.n_layers * seq_len * d_attn)


def chinchilla_flops_per_token(config, seq_len: int, include_embeddings: bool = True) -> float:
    """Training FLOPs per token by Chinchilla's appendix F, applied to our architecture."""
    return 3 * chinchilla_forward_flops(chinchilla_shape(config), seq_len, include_embeddings) / seq_len


@dataclass(frozen=True)
class Accounting:
    """Parameters and training FLOPs per token of one model at one sequence length."""

    params: ParamCounts
    exact: float
    six_n: float
    kaplan: float | None
    chinchilla: float | None

    @property
    def n(self) -> int:
        """The N of our scaling laws: active non-embedding parameters (blocks + output head)."""
        return self.params.active - self.params.embedding


def account(config, seq_len: int) -> Accounting:
    """All four counts; for a mixture of experts (or any shape the published conventions do not
    describe) ``kaplan`` and ``chinchilla`` are None."""
    params = param_counts(config)
    try:
        kaplan = float(kaplan_flops_per_token(config, seq_len))
        chinchilla = float(chinchilla_flops_per_token(config, seq_len))
    except ValueError:
        kaplan = chinchilla = None
    return Accounting(
        params=params,
        exact=float(training_flops_per_token(config, seq_len)),
        six_n=6.0 * (params.active - params.embedding),
        kaplan=kaplan,
        chinchilla=chinchilla,
    )
