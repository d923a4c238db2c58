"""The ``yoco`` family's config (Sun et al. 2024, "You Only Cache Once"; docs/yoco.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

from models.attention.layer import AttentionConfig
from models.config import FFNConfig, LayerKinds, MixerConfig, ModelConfig, tied_pipeline_errors
from models.ffn.swiglu import SwiGLUConfig
from models.kernels import KernelsConfig


@dataclass
class CrossAttentionConfig:
    """The cross-decoder's attention over the one global K,V: query heads ``n_heads`` (K,V
    have ``n_kv_heads``, made once by the global KV projection); head dimension
    d_model / n_heads. ``backend``: unless ``model.kernels.attention`` is set (it overrides it)."""

    n_heads: int = 8
    n_kv_heads: int = 4
    backend: str = "sdpa"

    def problems(self, prefix: str, d_model: int) -> list[str]:
        return AttentionConfig(n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, backend=self.backend).problems(
            prefix, d_model
        )

    def tp_sizes(self, prefix: str, d_model: int) -> dict[str, int]:
        return {f"{prefix}.n_heads": self.n_heads, f"{prefix}.n_kv_heads": self.n_kv_heads}


@dataclass
class YocoConfig(ModelConfig):
    """``n_layers`` blocks: the first ``self_layers`` (default half) form the self-decoder
    (``mixer``: sliding-window attention, or gated retention with ``kind: retention``), the rest
    the cross-decoder (``cross``), all with ``ffn``."""

    family: str = "yoco"
    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 8
    self_layers: int | None = None
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    rope_interpolation: float = 1.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    mixer: MixerConfig = field(default_factory=lambda: AttentionConfig(window=64))
    cross: CrossAttentionConfig = field(default_factory=CrossAttentionConfig)
    ffn: FFNConfig = field(default_factory=SwiGLUConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)

    @property
    def n_self(self) -> int:
        return self.n_layers // 2 if self.self_layers is None else self.self_layers

    @property
    def n_blocks(self) -> int:
        return self.n_layers

    def layers(self) -> LayerKinds:
        """Each block's FFN config, and the self-decoder blocks' mixers (the cross-decoder's
        attention is ``cross``)."""
        return LayerKinds([self.mixer] * self.n_self, [self.ffn] * self.n_layers)

    def problems(self) -> list[str]:
        errors = []
        for name in ("vocab_size", "d_model", "n_layers", "max_seq_len"):
            if getattr(self, name) <= 0:
                errors.append(f"model.{name} must be a positive integer, got {getattr(self, name)}")
        if not self.rope_interpolation > 0:
            errors.append(f"model.rope_interpolation must be > 0 (1: plain RoPE), got {self.rope_interpolation}")
        if errors:
            return errors
        if not 1 <= self.n_self < self.n_layers:
            errors.append(
                f"model.self_layers ({self.n_self}) must leave at least one block to each half of the "
                f"{self.n_layers} blocks; e.g. self_layers={self.n_layers // 2}"
            )
        errors += self.mixer.problems("model.mixer", self.d_model)
        errors += self.cross.problems("model.cross", self.d_model)
        errors += self.ffn.problems("model.ffn", self.d_model)
        errors += self.kernels.problems()
        return errors

    def tp_sizes(self) -> dict[str, int]:
        sizes = {"model.vocab_size": self.vocab_size}
        sizes.update(self.mixer.tp_sizes("model.mixer", self.d_model))
        sizes.update(self.cross.tp_sizes("model.cross", self.d_model))
        sizes.update(self.ffn.tp_sizes("model.ffn", self.d_model))
        return sizes

    def decode_cache_bytes(self, batch: int, length: int, element_bytes: int = 2) -> int:
        """Bytes of the decode state after ``length`` positions: the one global K,V for every
        position (sized for ``length``), plus each self-decoder layer's mixer state (a window
        layer's K and V of the last W − 1 positions, a retention layer's constant state)."""
        head_dim = self.d_model // self.cross.n_heads
        total = 2 * self.cross.n_kv_heads * head_dim * element_bytes * batch * length
        return total + self.n_self * self.mixer.decode_state_bytes(self.d_model, batch, length, element_bytes)

    def layout_errors(self, *, tp: int, pp: int, stages: int) -> list[str]:
        return tied_pipeline_errors(self, pp)

    def context_parallel_errors(self) -> list[str]:
        """The self-decoder's mixer and the FFN; the cross-decoder attends over the one global
        K,V of the same sequence, which context parallelism cuts like the queries."""
        return self.mixer.context_parallel_errors("model.mixer") + self.ffn.context_parallel_errors("model.ffn")
