"""The ``encdec`` family's config: a T5-style encoder-decoder (docs/encdec.md). The defaults are
the ``t5-tiny`` preset (configs/t5-tiny.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field

from models.attention.backends import BACKENDS
from models.config import FFNConfig, LayerKinds, ModelConfig, tied_pipeline_errors
from models.ffn.gated import GatedGELUConfig
from models.kernels import KernelsConfig

POSITIONS = ("relative", "rope")


@dataclass
class EncDecConfig(ModelConfig):
    """``encoder_layers`` bidirectional blocks and ``decoder_layers`` causal blocks with
    cross-attention, all with ``ffn``; ``n_heads`` heads of ``head_dim`` (None: d_model /
    n_heads) everywhere.

    ``position``: ``relative`` — T5's learned bias per head over ``relative_buckets`` buckets
    (log-spaced up to ``relative_max_distance``), one table for the encoder and one for decoder
    self-attention, shared by their layers; no 1/√d score scaling (T5 folds it into the init).
    ``rope`` — rotary embeddings on self-attention queries and keys, scores scaled by 1/√d.
    ``max_seq_len``: the longest encoder input; ``max_target_len``: the longest decoder input.
    ``tie_embeddings``: the head is the embedding, applied to the decoder output scaled by
    d_model^-½ (as T5). ``decoder_start_id``: the token that starts every decoder input (T5: the
    pad id 0). ``backend``: every attention layer's backend, unless ``kernels.attention`` is set
    (models/kernels.py); ``kernels.loss`` stays ``torch`` (no fused head in this family).
    """

    family: str = "encdec"
    vocab_size: int = 4196
    d_model: int = 256
    encoder_layers: int = 4
    decoder_layers: int = 4
    n_heads: int = 4
    head_dim: int | None = None
    max_seq_len: int = 512
    max_target_len: int = 128
    position: str = "relative"
    relative_buckets: int = 32
    relative_max_distance: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    init_factor: float = 1.0
    decoder_start_id: int = 0
    backend: str = "sdpa"
    ffn: FFNConfig = field(default_factory=lambda: GatedGELUConfig(d_ff=640))
    kernels: KernelsConfig = field(default_factory=KernelsConfig)

    @property
    def attention_backend(self) -> str:
        """The backend every attention layer runs: ``kernels.attention`` if set, else ``backend``."""
        return self.kernels.attention or self.backend

    @property
    def n_blocks(self) -> int:
        return self.encoder_layers + self.decoder_layers

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // max(1, self.n_heads)

    @property
    def attention_scale(self) -> float | None:
        """Softmax scale of every attention: 1 with T5's relative bias, else 1/√d (None)."""
        return 1.0 if self.position == "relative" else None

    def layers(self) -> LayerKinds:
        """Each block's FFN, encoder blocks first (the mixers are this family's own attention)."""
        return LayerKinds([], [self.ffn] * self.n_blocks)

    def problems(self) -> list[str]:
        errors = []
        for name in ("vocab_size", "d_model", "encoder_layers", "decoder_layers", "n_heads", "max_seq_len",
                     "max_target_len", "relative_buckets", "relative_max_distance"):
            if getattr(self, name) <= 0:
                errors.append(f"model.{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("rope_theta", "norm_eps", "init_factor"):
            if not getattr(self, name) > 0:
                errors.append(f"model.{name} must be > 0, got {getattr(self, name)}")
        if errors:
            return errors
        if self.position not in POSITIONS:
            errors.append(f"model.position {self.position!r} is unknown; choose one of {list(POSITIONS)}")
        if self.backend not in BACKENDS:
            errors.append(f"model.backend {self.backend!r} is unknown; choose one of {sorted(BACKENDS)}")
        if self.head_dim is None and self.d_model % self.n_heads:
            errors.append(
                f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads}), or set "
                "model.head_dim"
            )
        elif self.position == "rope" and self.resolved_head_dim % 2:
            errors.append(f"rotary embeddings need an even head dimension, got {self.resolved_head_dim}")
        if self.position == "relative" and self.relative_buckets % 2:
            errors.append(
                f"model.relative_buckets ({self.relative_buckets}) must be even: the encoder splits them "
                "between negative and positive offsets"
            )
        if not 0 <= self.decoder_start_id < self.vocab_size:
            errors.append(f"model.decoder_start_id ({self.decoder_start_id}) must be a token id < vocab_size")
        errors += self.ffn.problems("model.ffn", self.d_model)
        errors += self.kernels.problems()
        if self.kernels.fused_loss:
            errors.append(
                f"model.kernels.loss={self.kernels.loss} is not available in the encdec family (its head has no "
                "fused loss); use model.kernels.loss=torch"
            )
        return errors

    def tp_sizes(self) -> dict[str, int]:
        sizes = {"model.vocab_size": self.vocab_size, "model.n_heads": self.n_heads}
        sizes.update(self.ffn.tp_sizes("model.ffn", self.d_model))
        return sizes

    def layout_errors(self, *, tp: int, pp: int, stages: int) -> list[str]:
        return tied_pipeline_errors(self, pp)

    def context_parallel_errors(self) -> list[str]:
        bias = "T5's relative position bias (whole score matrices) and " if self.position == "relative" else ""
        return [
            f"model.family encdec: {bias}the decoder's cross-attention to the encoder output (another sequence) "
            "cannot be cut over ranks by context parallelism; set parallel.cp=1"
        ]
