"""The decoder ↔ Hugging Face ``LlamaForCausalLM``.

Our decoder is a Llama (rotate-half RoPE, GQA, SwiGLU, RMSNorm, no biases), so conversion is
a renaming; no weight is permuted:

    embed.weight                     model.embed_tokens.weight
    layers.<i>.mixer_norm.weight     model.layers.<i>.input_layernorm.weight
    layers.<i>.mixer.w{q,k,v,o}      model.layers.<i>.self_attn.{q,k,v,o}_proj
    layers.<i>.ffn_norm.weight       model.layers.<i>.post_attention_layernorm.weight
    layers.<i>.ffn.w1 / w3 / w2      model.layers.<i>.mlp.gate_proj / up_proj / down_proj
    norm.weight                      model.norm.weight
    head.weight                      lm_head.weight   (the embedding itself when tied)

HF models we cannot represent exactly (RoPE scaling, biases, an activation other than SiLU) are
refused rather than converted approximately; so are our configs Llama cannot hold (per-layer
overrides, windows, other mixer or FFN kinds).
"""

from __future__ import annotations

from models.attention.layer import AttentionConfig
from models.ffn.swiglu import SwiGLUConfig
from models.hf import HFAdapter, TensorMap, TensorRule, expand_rules

RULES = [
    TensorRule("embed.weight", "model.embed_tokens.weight"),
    TensorRule("layers.{i}.mixer_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    TensorRule("layers.{i}.mixer.wq.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    TensorRule("layers.{i}.mixer.wk.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    TensorRule("layers.{i}.mixer.wv.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    TensorRule("layers.{i}.mixer.wo.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    TensorRule("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    TensorRule("layers.{i}.ffn.w1.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    TensorRule("layers.{i}.ffn.w3.weight", "model.layers.{i}.mlp.up_proj.weight"),
    TensorRule("layers.{i}.ffn.w2.weight", "model.layers.{i}.mlp.down_proj.weight"),
    TensorRule("norm.weight", "model.norm.weight"),
]
HEAD = TensorRule("head.weight", "lm_head.weight")


def _rope(hf) -> tuple[float, float]:
    """RoPE base and position-interpolation factor of an HF config (transformers 5
    ``rope_parameters`` or 4.x ``rope_theta``/``rope_scaling``): plain or ``linear`` RoPE; any other
    scaled RoPE is refused."""
    params = getattr(hf, "rope_parameters", None)
    if isinstance(params, dict):
        kind, theta = params.get("rope_type", "default"), params["rope_theta"]
    else:
        params = getattr(hf, "rope_scaling", None) or {}
        kind, theta = params.get("rope_type", params.get("type", "default")), hf.rope_theta
    if kind not in ("default", "linear"):
        raise ValueError(f"RoPE scaling {kind!r} is not implemented by our decoder; plain and linear RoPE convert")
    return float(theta), float(params["factor"]) if kind == "linear" else 1.0


def llama_like_fields(config) -> dict:
    """The arguments a Llama-like HF config (Llama, Mixtral, Qwen3-MoE) takes from our decoder:
    shape, attention, RoPE (position interpolation is HF's ``linear`` RoPE type), norms, init and
    tied embeddings."""
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_interpolation != 1.0:
        rope = {"rope_type": "linear", "factor": config.rope_interpolation, "rope_theta": config.rope_theta}
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.mixer.n_heads,
        num_key_value_heads=config.mixer.n_kv_heads,
        head_dim=config.mixer.resolved_head_dim(config.d_model),
        hidden_act="silu",
        max_position_embeddings=config.max_seq_len,
        initializer_range=config.init_std,
        rms_norm_eps=config.norm_eps,
        rope_parameters=rope,
        tie_word_embeddings=config.tie_embeddings,
    )


def decoder_config_from_hf(hf, backend: str, ffn, problems: list[str], qk_norm_eps: float | None = None):
    """The DecoderConfig of a Llama-like HF config (attention, RoPE, norms, embeddings) with
    ``ffn``; ``problems`` found by the caller raise first, in one message."""
    from models.decoder.config import DecoderConfig

    if problems:
        raise ValueError(f"cannot convert this {type(hf).__name__}: " + "; ".join(problems))
    head_dim = getattr(hf, "head_dim", None)
    theta, interpolation = _rope(hf)
    config = DecoderConfig(
        vocab_size=hf.vocab_size,
        d_model=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        max_seq_len=hf.max_position_embeddings,
        rope_theta=theta,
        rope_interpolation=interpolation,
        norm_eps=hf.rms_norm_eps,
        tie_embeddings=bool(hf.tie_word_embeddings),
        init_std=hf.initializer_range,
        mixer=AttentionConfig(
            n_heads=hf.num_attention_heads,
            n_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
            head_dim=None if head_dim in (None, hf.hidden_size // hf.num_attention_heads) else head_dim,
            backend=backend,
            qk_norm_eps=qk_norm_eps,
        ),
        ffn=ffn,
    )
    config.validate()
    return config


class LlamaAdapter(HFAdapter):
    architecture = "LlamaForCausalLM"

    def refusal(self, config) -> str | None:
        """Why ``config`` has no LlamaForCausalLM equivalent (None: it has)."""
        if config.family != "decoder":
            return f"family {config.family!r} is not a decoder"
        if config.layer_overrides:
            return "per-layer overrides (Llama blocks are all alike)"
        if not isinstance(config.mixer, AttentionConfig) or config.mixer.window is not None:
            return "a mixer other than full attention"
        if config.mixer.qk_norm_eps is not None:
            return "query/key norms (mixer.qk_norm_eps)"
        if not isinstance(config.ffn, SwiGLUConfig):
            return f"ffn kind {config.ffn.kind!r} (Llama's is swiglu)"
        return None

    def config_to_hf(self, config):
        from transformers import LlamaConfig

        self._check(config)
        return LlamaConfig(
            **llama_like_fields(config),
            intermediate_size=config.ffn.d_ff,
            attention_bias=False,
            mlp_bias=False,
        )

    def config_from_hf(self, hf, backend: str = "sdpa"):
        problems = []
        if getattr(hf, "attention_bias", False) or getattr(hf, "mlp_bias", False):
            problems.append("biases (attention_bias/mlp_bias) are not supported")
        if hf.hidden_act != "silu":
            problems.append(f"hidden_act={hf.hidden_act!r} (only silu)")
        return decoder_config_from_hf(hf, backend, SwiGLUConfig(d_ff=hf.intermediate_size), problems)

    def tensor_map(self, config) -> TensorMap:
        self._check(config)
        if config.tie_embeddings:
            rules = expand_rules(RULES, config.n_layers)
            return TensorMap(rules, {"head.weight": "embed.weight"}, {"lm_head.weight": "model.embed_tokens.weight"})
        return TensorMap(expand_rules([*RULES, HEAD], config.n_layers))


LLAMA_ADAPTER = LlamaAdapter()
