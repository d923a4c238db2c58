"""The ``moe`` FFN kind's config (``model.ffn: {kind: moe, ...}``); docs/moe.md explains each key.

    ffn:
      kind: moe
      n_experts: 8            # E routed experts, each a SwiGLU of width d_ff
      top_k: 2                # k experts per token
      d_ff: 512               # expert hidden width (independent of dense_d_ff)
      n_shared_experts: 0     # SwiGLUs of width d_ff every token goes through (fused into one)
      first_dense_layers: 0   # blocks 0..k-1 use a dense SwiGLU of width dense_d_ff instead
      dense_d_ff: 0
      router: softmax_topk    # softmax_topk | topk_softmax | sigmoid_bias | hash | compete
      aux_loss_coef: 0.01     # Switch load-balancing loss α
      z_loss_coef: 0.001      # router z-loss c
      capacity_factor: null   # null or 0: dropless
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from models.config import FFNConfig


@dataclass
class MoEConfig(FFNConfig):
    kind: str = "moe"
    n_experts: int = 8
    top_k: int = 2
    d_ff: int = 512
    n_shared_experts: int = 0
    first_dense_layers: int = 0
    dense_d_ff: int = 0
    router: Literal["softmax_topk", "topk_softmax", "sigmoid_bias", "hash", "compete"] = "softmax_topk"
    renormalize: bool = True
    aux_loss_coef: float = 0.01
    aux_loss_scope: Literal["batch", "sequence"] = "batch"
    z_loss_coef: float = 0.001
    bias_update_rate: float = 0.0
    capacity_factor: float | None = None
    grouped_gemm: bool = True
    n_groups: int = 1
    topk_groups: int = 1
    hash_vocab_size: int = 0
    hash_seed: int = 0
    compete_every: int = 4
    compete_loss_coef: float = 5.0

    def problems(self, prefix: str, d_model: int) -> list[str]:
        errors = []
        for name in ("n_experts", "top_k", "d_ff"):
            if getattr(self, name) <= 0:
                errors.append(f"{prefix}.{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("n_shared_experts", "first_dense_layers"):
            if getattr(self, name) < 0:
                errors.append(f"{prefix}.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate", "compete_loss_coef"):
            if getattr(self, name) < 0:
                errors.append(f"{prefix}.{name} must be >= 0, got {getattr(self, name)}")
        if self.top_k > self.n_experts > 0:
            errors.append(f"{prefix}.top_k ({self.top_k}) exceeds {prefix}.n_experts ({self.n_experts}): lower top_k")
        if self.first_dense_layers > 0 and self.dense_d_ff <= 0:
            errors.append(
                f"{prefix}.first_dense_layers = {self.first_dense_layers} needs the dense blocks' width: "
                f"set {prefix}.dense_d_ff to a positive integer"
            )
        if self.capacity_factor is not None and self.capacity_factor < 0:
            errors.append(f"{prefix}.capacity_factor must be null (dropless) or > 0, got {self.capacity_factor}")
        errors += self._router_problems(prefix)
        return errors

    def _router_problems(self, prefix: str) -> list[str]:
        errors = []
        router = self.router
        if not self.renormalize and router != "softmax_topk":
            errors.append(
                f"{prefix}.renormalize applies only to router softmax_topk ({router} always normalises its "
                f"weights over the k chosen experts): remove {prefix}.renormalize"
            )
        if self.bias_update_rate > 0 and router != "sigmoid_bias":
            errors.append(
                f"{prefix}.bias_update_rate (auxiliary-loss-free balancing) needs router sigmoid_bias, got {router}: "
                f"set {prefix}.router: sigmoid_bias or {prefix}.bias_update_rate: 0"
            )
        if (self.n_groups != 1 or self.topk_groups != 1) and router != "sigmoid_bias":
            errors.append(
                f"{prefix}.n_groups / topk_groups (group-limited routing) need router sigmoid_bias, got {router}: "
                "remove them"
            )
        if router == "sigmoid_bias" and self.n_groups > 1:
            if self.n_experts % self.n_groups:
                errors.append(f"{prefix}.n_groups ({self.n_groups}) must divide {prefix}.n_experts ({self.n_experts})")
            elif not 1 <= self.topk_groups <= self.n_groups:
                errors.append(f"{prefix}.topk_groups must be in 1..n_groups ({self.n_groups}), got {self.topk_groups}")
            elif self.topk_groups * (self.n_experts // self.n_groups) < self.top_k:
                errors.append(
                    f"{prefix}.topk_groups ({self.topk_groups}) groups of {self.n_experts // self.n_groups} experts "
                    f"hold fewer than top_k ({self.top_k}) experts: raise topk_groups"
                )
        elif router == "sigmoid_bias" and (self.n_groups < 1 or self.topk_groups != 1):
            errors.append(f"{prefix}.n_groups must be >= 1 and topk_groups 1 when n_groups is 1")
        if router == "hash":
            if self.hash_vocab_size <= 0:
                errors.append(
                    f"{prefix}.router hash maps token ids to experts: set {prefix}.hash_vocab_size to model.vocab_size"
                )
            if self.top_k != 1:
                errors.append(f"{prefix}.router hash sends each token to one expert: set {prefix}.top_k: 1")
            for name in ("aux_loss_coef", "z_loss_coef"):
                if getattr(self, name) > 0:
                    errors.append(
                        f"{prefix}.router hash has no router logits to balance or regularise: set {prefix}.{name}: 0"
                    )
        elif self.hash_vocab_size or self.hash_seed:
            errors.append(f"{prefix}.hash_vocab_size / hash_seed apply only to router hash: remove them")
        if router == "compete":
            if self.compete_every < 1:
                errors.append(f"{prefix}.compete_every must be >= 1 (1: every step competes), got {self.compete_every}")
        elif (self.compete_every, self.compete_loss_coef) != (4, 5.0):
            errors.append(f"{prefix}.compete_every / compete_loss_coef apply only to router compete: remove them")
        return errors

    def context_parallel_errors(self, prefix: str) -> list[str]:
        """A capacity keeps each expert's assignments with the largest weights among the tokens a
        rank routes: under context parallelism those are a rank's chunks, not the whole sequences
        (the balancing losses are exact: models/aux_loss.py)."""
        if self.capacity_factor:
            return [
                f"{prefix}.capacity_factor ({self.capacity_factor}) would drop tokens by their rank within each "
                f"context-parallel chunk, not the whole sequence; set {prefix}.capacity_factor: null (dropless) "
                "or parallel.cp=1"
            ]
        return []

    def tp_sizes(self, prefix: str, d_model: int) -> dict[str, int]:
        """Tensor parallelism shards the shared experts' hidden units (and a dense block's); the
        routed experts are replicated over the TP ranks (docs/moe.md)."""
        sizes = {}
        if self.n_shared_experts:
            sizes[f"{prefix}.n_shared_experts * {prefix}.d_ff"] = self.n_shared_experts * self.d_ff
        if self.first_dense_layers:
            sizes[f"{prefix}.dense_d_ff"] = self.dense_d_ff
        return sizes
