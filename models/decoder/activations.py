"""Activation memory of one decoder block, derived from its ops: what each op's backward needs
(checked against measurement by tests/parallel/test_memory.py through
tools/activation_meter.py).

The way Korthikanti et al. 2022 count their GPT block (34·s·b·h + 5·a·s²·b bytes in 16-bit):
per op, what its backward needs. For our block (RMSNorm, SwiGLU, GQA, no dropout), T = s·b
tokens, f = d_ff, h_kv = n_kv_heads·head_dim, e bytes per activation:

- RMSNorm (×2, computed in fp32, models/norm.py): its input e·T·h and 1/rms 4·T (it recomputes
  x/rms in backward), and its output, kept by the GEMMs that read it, e·T·h. Under tensor
  parallelism (DTensors) the plain ops run and keep the fp32 input 4·T·h (x itself in fp32, a
  copy in bf16), 1/rms and x/rms before the gain e·T·h.
- attention, by its math: q and k after RoPE and v, e·T·(h + 2·h_kv); the output e·T·h (the
  output projection's input); the softmax statistics: the log-sum-exp 4·T·a for a kernel that
  recomputes the probabilities (flash), the probabilities 4·a·s²·b for one that keeps them.
  What a backend keeps beyond that is listed separately (``extra.*`` terms), each with its
  reason in BACKEND_EXTRAS: SDPA with a document mask expands K/V to all heads and keeps an fp32
  mask (4·b·s²); the math backend also expands K/V, keeps the probabilities twice and keeps
  boolean masks.
- SwiGLU: gate and up projections (its product recomputes SiLU(gate) in backward) and their
  product, the down projection's input: 3·e·T·f.

With e = 2 and the fused kernel that is s·b·h·(12 + 4·h_kv/h + 6·f/h) + s·b·(8 + 4·a) bytes per
block: 37·s·b·h for the 1b preset against GPT's 34 (a 4h SwiGLU keeps 24 where GPT's GeLU MLP
keeps 19; flash attention removes the 5·a·s²·b term). The plain norms (under TP) add 8·s·b·h.

Modes: ``selective`` keeps the attention kernel's inputs and output only (drops the
log-sum-exp, or the probabilities); ``full`` keeps the block input; ``op`` keeps the block input,
the GEMM outputs (q, k, v, o, gate, up, down — under TP the reduced o and down instead) and the
kernel's output and log-sum-exp. Under tensor parallelism head- and FFN-sharded tensors divide by
tp; with sequence parallelism the norm region divides by tp too, but the all-gathered GEMM
inputs stay whole (Megatron keeps the shard and gathers again in backward; ``op`` does so).

The derivation covers decoders whose blocks are all full attention + SwiGLU (the presets).
"""

from __future__ import annotations

from dataclasses import dataclass


KERNELS = ("fused", "fused_masked", "unfused", "unfused_masked")


@dataclass(frozen=True)
class BlockShape:
    """Per-rank sizes: T tokens (s·b), h model width, f FFN width per rank, q/kv widths per rank,
    a heads per rank; ``sp_tokens`` = tokens of the sequence-parallel region per rank."""

    batch: int
    seq: int
    h: int
    f: int
    q: int
    kv: int
    heads: int
    sp_tokens: int

    @classmethod
    def of(cls, model, batch: int, seq: int, tp: int = 1, sp: bool = False) -> BlockShape:
        attention, d_ff = model.mixer, model.ffn.d_ff
        head_dim = attention.resolved_head_dim(model.d_model)
        tokens = batch * seq
        return cls(
            batch, seq, model.d_model, d_ff // tp, attention.n_heads * head_dim // tp,
            attention.n_kv_heads * head_dim // tp, attention.n_heads // tp, tokens // tp if sp else tokens,
        )

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


def _norm_terms(shape: BlockShape, e: int, lean: bool) -> dict[str, int]:
    """One RMSNorm over the sequence-parallel region, and its output as kept by the next GEMMs:
    whole (replicated, or all-gathered under SP). Lean (plain tensors, models/norm.py): its input
    in its own dtype and 1/rms. Plain ops (DTensors under TP): the fp32 input (x itself in
    fp32, a copy in bf16), 1/rms and x/rms before the gain (the gain's gradient)."""
    n, h = shape.sp_tokens, shape.h
    kept = {"x": e * n * h} if lean else {"x_fp32": 4 * n * h, "x_normed": e * n * h}
    return {**kept, "inv_rms": 4 * n, "gemm_input": e * shape.tokens * h}


# What the attention backends keep beyond the math (``extra.<name>`` terms), and why.
BACKEND_EXTRAS = {
    "k_expanded": "SDPA's efficient kernel with a mask, and the math backend, take K repeated to every query "
    "head (no native GQA): the copy is saved instead of k, costing the (n_heads - n_kv_heads) extra heads",
    "v_expanded": "the same for V",
    "mask_fp32": "SDPA turns the boolean document mask into an additive fp32 mask [b, s, s] and saves it",
    "probs_masked": "the math backend saves the probabilities twice: softmax's output, and the copy with "
    "fully-masked rows zeroed that multiplies V",
    "masks_bool": "the math backend saves the inverted boolean mask and its per-row any() (per row of documents)",
}


def _attention_math(shape: BlockShape, e: int, materialised: bool) -> dict[str, int]:
    """What attention's backward needs by its math: q and k after RoPE, v, the output (the
    output projection's input), and the softmax's statistics — the log-sum-exp per query and
    head when the kernel recomputes the probabilities (flash), the probabilities themselves
    [b, a, s, s] (fp32) when it materialises them (math backend)."""
    t, s, b, a = shape.tokens, shape.seq, shape.batch, shape.heads
    terms = {"q": e * t * shape.q, "k": e * t * shape.kv, "v": e * t * shape.kv, "out": e * t * shape.q}
    if materialised:
        terms["probs"] = 4 * b * a * s * s
    else:
        terms["lse_fp32"] = 4 * t * a
    return terms


def _attention_extras(shape: BlockShape, e: int, kernel: str) -> dict[str, int]:
    """What ``kernel`` keeps beyond the math, by BACKEND_EXTRAS name."""
    t, s, b, a = shape.tokens, shape.seq, shape.batch, shape.heads
    if kernel == "fused":
        return {}
    expanded = e * t * (shape.q - shape.kv)
    extras = {"k_expanded": expanded, "v_expanded": expanded}
    if kernel == "fused_masked":
        extras["mask_fp32"] = 4 * b * s * s
    else:
        rows = b if kernel == "unfused_masked" else 1
        extras.update(probs_masked=4 * b * a * s * s, masks_bool=rows * (s * s + s))
    return extras


def _attention_terms(shape: BlockShape, e: int, kernel: str) -> dict[str, int]:
    terms = _attention_math(shape, e, materialised=kernel.startswith("unfused"))
    terms.update({f"extra.{k}": v for k, v in _attention_extras(shape, e, kernel).items()})
    return terms


def _ffn_terms(shape: BlockShape, e: int) -> dict[str, int]:
    n = e * shape.tokens * shape.f
    return {"gate": n, "up": n, "gate_x_up": n}  # silu(gate) is recomputed (models/ffn/swiglu.py)


def block_activation_terms(
    model, batch: int, seq: int, mode: str = "none", *, kernel: str = "fused", tp: int = 1, sp: bool = False,
    element_bytes: int = 4,
) -> dict[str, int]:
    """Bytes one block keeps for backward on one rank, by tensor, for ``mode`` (none | selective
    | op | full), attention ``kernel`` (``fused``: SDPA flash on unpacked causal rows;
    ``fused_masked``: SDPA with a document mask; ``unfused`` / ``unfused_masked``: the math
    backend without / with documents, fp32 only) and activations of ``element_bytes`` (4: fp32;
    2: bf16 parameters)."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; one of {KERNELS}")
    if element_bytes != 4 and kernel != "fused":
        raise ValueError("the derivation covers bf16 activations for the fused kernel only")
    e = element_bytes
    shape = BlockShape.of(model, batch, seq, tp, sp)
    t, h = shape.tokens, shape.h
    if mode == "full":
        return {"block_input": e * shape.sp_tokens * h}
    if mode == "op":
        terms = {"block_input": e * shape.sp_tokens * h, "q": e * t * shape.q, "k": e * t * shape.kv,
                 "v": e * t * shape.kv, "gate": e * t * shape.f, "up": e * t * shape.f}
        if tp > 1:  # the reduce-scatter (SP) or all-reduce outputs, not the unreduced GEMM outputs
            terms.update(o_reduced=e * shape.sp_tokens * h, down_reduced=e * shape.sp_tokens * h)
        else:
            terms.update(o_proj=e * t * h, down_proj=e * t * h)
        if kernel.startswith("unfused"):  # its batched matmuls: scores, and probabilities times V
            terms.update(scores=4 * shape.batch * shape.heads * shape.seq**2, probs_v=e * t * shape.q)
        else:
            terms.update(attention_out=e * t * shape.q, lse_fp32=4 * t * shape.heads)
        return terms
    lean = tp == 1  # the lean norm runs on plain tensors; under TP they are DTensors
    terms = {f"mixer_norm.{k}": v for k, v in _norm_terms(shape, e, lean).items()}
    if mode == "selective":  # the kernel's inputs and output only
        terms.update(q=e * t * shape.q, k=e * t * shape.kv, v=e * t * shape.kv, out=e * t * shape.q)
    elif mode == "none":
        terms.update(_attention_terms(shape, e, kernel))
    else:
        raise ValueError(f"unknown recompute mode {mode!r}")
    terms.update({f"ffn_norm.{k}": v for k, v in _norm_terms(shape, e, lean).items()})
    terms.update(_ffn_terms(shape, e))
    return terms


def block_activation_bytes(model, batch: int, seq: int, mode: str = "none", **kwargs) -> int:
    """Total of :func:`block_activation_terms`."""
    return sum(block_activation_terms(model, batch, seq, mode, **kwargs).values())
