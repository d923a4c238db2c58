"""The ``decoder`` family's config: a Llama-style decoder-only model. The defaults are the
``tiny`` preset (configs/tiny.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from models.attention.layer import AttentionConfig
from models.config import (
    FFNConfig, LayerKinds, LayerOverride, MixerConfig, ModelConfig, resolve_layers, select_layers,
    tied_pipeline_errors,
)
from models.configtree import ConfigError
from models.ffn.swiglu import SwiGLUConfig
from models.kernels import KernelsConfig

# Keys of the flat model section before families had their own configs.
_MOVED = {
    "n_heads": "model.mixer.n_heads",
    "n_kv_heads": "model.mixer.n_kv_heads",
    "attention_backend": "model.mixer.backend",
    "d_ff": "model.ffn.d_ff",
}


@dataclass
class DecoderConfig(ModelConfig):
    RENAMED: ClassVar[dict[str, str]] = _MOVED

    family: str = "decoder"
    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 8
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    rope_interpolation: float = 1.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    mixer: MixerConfig = field(default_factory=AttentionConfig)
    ffn: FFNConfig = field(default_factory=SwiGLUConfig)
    layer_overrides: list[LayerOverride] = field(default_factory=list)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)

    @property
    def n_blocks(self) -> int:
        return self.n_layers

    def layers(self) -> LayerKinds:
        """The mixer and FFN config of every block (overrides applied)."""
        return resolve_layers(self.mixer, self.ffn, self.layer_overrides, self.n_layers)

    def problems(self) -> list[str]:
        errors = []
        for name in ("vocab_size", "d_model", "n_layers", "max_seq_len"):
            if getattr(self, name) <= 0:
                errors.append(f"model.{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("rope_theta", "rope_interpolation", "norm_eps", "init_std"):
            if not getattr(self, name) > 0:
                errors.append(f"model.{name} must be > 0, got {getattr(self, name)}")
        errors += self.kernels.problems()
        if errors:
            return errors
        try:
            layers = self.layers()
        except ConfigError as e:
            return [str(e)]
        seen = set()
        for i, (mixer, ffn) in enumerate(zip(layers.mixers, layers.ffns)):
            for config, where in ((mixer, self._where(i, "mixer")), (ffn, self._where(i, "ffn"))):
                for problem in config.problems(where, self.d_model):
                    if problem not in seen:
                        seen.add(problem)
                        errors.append(problem)
        return errors

    def _where(self, layer: int, role: str) -> str:
        """Config key of block ``layer``'s mixer or FFN (the override that set it, if any)."""
        for i in reversed(range(len(self.layer_overrides))):
            override = self.layer_overrides[i]
            if getattr(override, role) is not None:
                try:
                    if layer in select_layers(override.layers, self.n_layers, ""):
                        return f"model.layer_overrides[{i}].{role}"
                except ConfigError:
                    pass
        return f"model.{role}"

    def tp_sizes(self) -> dict[str, int]:
        sizes = {"model.vocab_size": self.vocab_size}
        layers = self.layers()
        for i, (mixer, ffn) in enumerate(zip(layers.mixers, layers.ffns)):
            sizes.update(mixer.tp_sizes(self._where(i, "mixer"), self.d_model))
            sizes.update(ffn.tp_sizes(self._where(i, "ffn"), self.d_model))
        return sizes

    def decode_cache_bytes(self, batch: int, length: int, element_bytes: int = 2) -> int:
        """Bytes of the decode state after ``length`` positions: each layer's mixer state
        (``decode_state_bytes``: a full-attention layer's K and V for every position, a
        sliding-window layer's for the last W − 1, a retention layer's constant state)."""
        return sum(m.decode_state_bytes(self.d_model, batch, length, element_bytes) for m in self.layers().mixers)

    def layout_errors(self, *, tp: int, pp: int, stages: int) -> list[str]:
        return tied_pipeline_errors(self, pp)

    def context_parallel_errors(self) -> list[str]:
        """Every block's mixer and FFN, each problem once (blocks share their config keys)."""
        layers, errors = self.layers(), []
        for i, (mixer, ffn) in enumerate(zip(layers.mixers, layers.ffns)):
            problems = mixer.context_parallel_errors(self._where(i, "mixer"))
            problems += ffn.context_parallel_errors(self._where(i, "ffn"))
            errors += [problem for problem in problems if problem not in errors]
        return errors
