"""The MoE decoder ↔ Hugging Face ``MixtralForCausalLM`` and ``Qwen3MoeForCausalLM``.

Both are our decoder with an ``moe`` FFN; attention, norms, embeddings and head convert as for
Llama (models/decoder/hf.py). Per MoE block (transformers 5 in-memory layout, fused experts):

    layers.<i>.ffn.routed.router.gate.weight [E, d]    model.layers.<i>.mlp.gate.weight
    layers.<i>.ffn.routed.experts.w1, w3 [E, f, d]     model.layers.<i>.mlp.experts.gate_up_proj
                                                       [E, 2f, d] = cat(w1, w3) on dim 1 (gate first)
    layers.<i>.ffn.routed.experts.w2 [E, d, f]         model.layers.<i>.mlp.experts.down_proj

``save_pretrained`` writes the per-expert on-disk layout itself (Mixtral
``block_sparse_moe.experts.<e>.w1/w2/w3`` and ``block_sparse_moe.gate``, Qwen3-MoE
``mlp.experts.<e>.{gate,up,down}_proj``) and ``from_pretrained`` fuses it again, so a model
converted here saves and loads offline. ``disk_map`` is that layout: our w1 / w3 / w2 ``[E, ...]``
stacked from the per-expert tensors (``TensorMap.stacked``), for conversions that stream files.

- Mixtral: router ``topk_softmax`` (softmax over the top-k logits, which equals HF's softmax,
  top-k, renormalise), every block MoE, no shared experts.
- Qwen3-MoE: router ``softmax_topk`` with ``renormalize`` = ``norm_topk_prob``; query/key
  RMSNorms (``mixer.qk_norm_eps`` = ``rms_norm_eps``); ``mlp_only_layers`` = the first
  ``first_dense_layers`` blocks, dense of width ``dense_d_ff`` = ``intermediate_size``
  (``decoder_sparse_step`` must be 1).

HF's Switch loss is k times ours at the same coefficient (its f sums to k; docs/moe.md), so
``aux_loss_coef`` = k · ``router_aux_loss_coef``. HF has no router z-loss (converted models get
``z_loss_coef`` 0) and no capacity (a capacity factor is refused: it changes the logits).
"""

from __future__ import annotations

import torch

from models.attention.layer import AttentionConfig
from models.decoder.hf import HEAD, RULES, decoder_config_from_hf, llama_like_fields
from models.ffn.moe.config import MoEConfig
from models.hf import HFAdapter, TensorMap, TensorRule, expand_rules

_ATTENTION_AND_NORMS = [r for r in RULES if ".ffn." not in r.ours]
_DENSE = [r for r in RULES if ".ffn." in r.ours]
_QK_NORMS = [
    TensorRule("layers.{i}.mixer.q_norm.weight", "model.layers.{i}.self_attn.q_norm.weight"),
    TensorRule("layers.{i}.mixer.k_norm.weight", "model.layers.{i}.self_attn.k_norm.weight"),
]
_MOE = [
    TensorRule("layers.{i}.ffn.routed.router.gate.weight", "model.layers.{i}.mlp.gate.weight"),
    TensorRule("layers.{i}.ffn.routed.experts.w2", "model.layers.{i}.mlp.experts.down_proj"),
]
_GATE, _UP = "layers.{i}.ffn.routed.experts.w1", "layers.{i}.ffn.routed.experts.w3"
_GATE_UP = "model.layers.{i}.mlp.experts.gate_up_proj"


class _MoEAdapter(HFAdapter):
    router = ""
    qk_norm = False
    disk_block = "mlp"
    disk_experts = ("gate_proj", "up_proj", "down_proj")

    def refusal(self, config) -> str | None:
        if config.family != "decoder":
            return f"family {config.family!r} is not a decoder"
        if config.layer_overrides:
            return "per-layer overrides"
        if not isinstance(config.mixer, AttentionConfig) or config.mixer.window is not None:
            return "a mixer other than full attention"
        if (config.mixer.qk_norm_eps is not None) != self.qk_norm:
            return "query/key norms (mixer.qk_norm_eps)" + (" are required" if self.qk_norm else " are not held")
        ffn = config.ffn
        if not isinstance(ffn, MoEConfig):
            return f"ffn kind {ffn.kind!r} (not moe)"
        if ffn.router != self.router:
            return f"router {ffn.router!r} (this class routes like {self.router})"
        if ffn.n_shared_experts:
            return "shared experts"
        if ffn.capacity_factor:
            return "a capacity factor (HF is dropless)"
        return self._ffn_refusal(ffn)

    def _ffn_refusal(self, ffn: MoEConfig) -> str | None:
        return None

    def _common_to_hf(self, config) -> dict:
        return dict(
            **llama_like_fields(config),
            num_experts_per_tok=config.ffn.top_k,
            router_aux_loss_coef=config.ffn.aux_loss_coef / config.ffn.top_k,
            sliding_window=None,
        )

    def _common_from_hf(self, hf, backend: str, ffn: MoEConfig, qk_norm_eps: float | None):
        problems = []
        if getattr(hf, "attention_bias", False):
            problems.append("attention biases are not supported")
        if hf.hidden_act != "silu":
            problems.append(f"hidden_act={hf.hidden_act!r} (only silu)")
        if getattr(hf, "sliding_window", None) is not None and getattr(hf, "use_sliding_window", True):
            problems.append("a sliding window")
        return decoder_config_from_hf(hf, backend, ffn, problems, qk_norm_eps)

    # ----------------------------------------------------------- tensors
    def _moe_layers(self, config) -> list[int]:
        return list(range(config.ffn.first_dense_layers, config.n_layers))

    def tensor_map(self, config) -> TensorMap:
        """Every tensor but the experts' w1/w3, which fuse into one HF tensor (state_to_hf)."""
        self._check(config)
        rules = expand_rules(_ATTENTION_AND_NORMS + (_QK_NORMS if self.qk_norm else []), config.n_layers)
        moe = set(self._moe_layers(config))
        for i in range(config.n_layers):
            for rule in _MOE if i in moe else _DENSE:
                rules[rule.ours.format(i=i)] = (rule.theirs.format(i=i), rule)
        if config.tie_embeddings:
            return TensorMap(rules, {"head.weight": "embed.weight"}, {"lm_head.weight": "model.embed_tokens.weight"})
        rules.update(expand_rules([HEAD], config.n_layers))
        return TensorMap(rules)

    def disk_map(self, config) -> TensorMap:
        """The per-expert layout of ``save_pretrained``: each of w1, w3, w2 stacked from E tensors."""
        memory = self.tensor_map(config)
        rules, stacked = dict(memory.rules), {}
        for i in self._moe_layers(config):
            block = f"model.layers.{i}.{self.disk_block}"
            del rules[_MOE[1].ours.format(i=i)]
            gate = _MOE[0].ours.format(i=i)
            rules[gate] = (f"{block}.gate.weight", rules[gate][1])
            for ours, theirs in zip((_GATE, _UP, _MOE[1].ours), self.disk_experts):
                names = tuple(f"{block}.experts.{e}.{theirs}.weight" for e in range(config.ffn.n_experts))
                stacked[ours.format(i=i)] = names
        return TensorMap(rules, memory.aliases, memory.hf_aliases, stacked)

    def state_to_hf(self, state, config) -> dict[str, torch.Tensor]:
        state, fused = dict(state), {}
        for i in self._moe_layers(config):
            gate, up = state.pop(_GATE.format(i=i)), state.pop(_UP.format(i=i))
            fused[_GATE_UP.format(i=i)] = torch.cat([gate, up], dim=1)
        return {**super().state_to_hf(state, config), **fused}

    def state_from_hf(self, hf_state, config) -> dict[str, torch.Tensor]:
        hf_state, split = dict(hf_state), {}
        for i in self._moe_layers(config):
            gate, up = hf_state.pop(_GATE_UP.format(i=i)).chunk(2, dim=1)
            split[_GATE.format(i=i)], split[_UP.format(i=i)] = gate.contiguous(), up.contiguous()
        return {**super().state_from_hf(hf_state, config), **split}


class MixtralAdapter(_MoEAdapter):
    architecture = "MixtralForCausalLM"
    router = "topk_softmax"
    disk_block = "block_sparse_moe"
    disk_experts = ("w1", "w3", "w2")

    def _ffn_refusal(self, ffn: MoEConfig) -> str | None:
        return "dense first blocks (every Mixtral block is MoE)" if ffn.first_dense_layers else None

    def config_to_hf(self, config):
        from transformers import MixtralConfig

        self._check(config)
        return MixtralConfig(
            **self._common_to_hf(config),
            intermediate_size=config.ffn.d_ff,
            num_local_experts=config.ffn.n_experts,
            router_jitter_noise=0.0,
        )

    def config_from_hf(self, hf, backend: str = "sdpa"):
        if getattr(hf, "router_jitter_noise", 0.0):
            raise ValueError("cannot convert this MixtralConfig: router_jitter_noise > 0 is not implemented")
        ffn = MoEConfig(
            n_experts=hf.num_local_experts, top_k=hf.num_experts_per_tok, d_ff=hf.intermediate_size,
            router="topk_softmax", aux_loss_coef=hf.router_aux_loss_coef * hf.num_experts_per_tok, z_loss_coef=0.0,
        )
        return self._common_from_hf(hf, backend, ffn, None)


class Qwen3MoeAdapter(_MoEAdapter):
    architecture = "Qwen3MoeForCausalLM"
    router = "softmax_topk"
    qk_norm = True

    def _check(self, config) -> None:
        super()._check(config)
        if config.mixer.qk_norm_eps != config.norm_eps:
            raise ValueError(
                f"cannot convert to {self.architecture}: its query/key norms use rms_norm_eps; set "
                f"model.mixer.qk_norm_eps = model.norm_eps ({config.norm_eps})"
            )

    def config_to_hf(self, config):
        from transformers import Qwen3MoeConfig

        self._check(config)
        ffn = config.ffn
        return Qwen3MoeConfig(
            **self._common_to_hf(config),
            intermediate_size=ffn.dense_d_ff or ffn.d_ff,
            moe_intermediate_size=ffn.d_ff,
            num_experts=ffn.n_experts,
            norm_topk_prob=ffn.renormalize,
            decoder_sparse_step=1,
            mlp_only_layers=list(range(ffn.first_dense_layers)),
            attention_bias=False,
            use_sliding_window=False,
        )

    def config_from_hf(self, hf, backend: str = "sdpa"):
        dense = sorted(hf.mlp_only_layers)
        if hf.decoder_sparse_step != 1 or dense != list(range(len(dense))):
            raise ValueError(
                "cannot convert this Qwen3MoeConfig: only the first blocks may be dense (mlp_only_layers "
                f"= 0..k-1 and decoder_sparse_step = 1), got mlp_only_layers={dense}, "
                f"decoder_sparse_step={hf.decoder_sparse_step}"
            )
        ffn = MoEConfig(
            n_experts=hf.num_experts, top_k=hf.num_experts_per_tok, d_ff=hf.moe_intermediate_size,
            router="softmax_topk", renormalize=bool(hf.norm_topk_prob),
            aux_loss_coef=hf.router_aux_loss_coef * hf.num_experts_per_tok, z_loss_coef=0.0,
            first_dense_layers=len(dense), dense_d_ff=hf.intermediate_size if dense else 0,
        )
        return self._common_from_hf(hf, backend, ffn, hf.rms_norm_eps)


MIXTRAL_ADAPTER = MixtralAdapter()
QWEN3_MOE_ADAPTER = Qwen3MoeAdapter()
