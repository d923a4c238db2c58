"""The encoder-decoder ↔ Hugging Face ``T5ForConditionalGeneration`` (T5 v1.1 gated-GELU and
the original ReLU variant). A renaming; no weight is permuted:

    embed.weight                         shared.weight (= {encoder,decoder}.embed_tokens.weight)
    encoder_bias.table.weight            encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight
    encoder.<i>.mixer_norm.weight        encoder.block.<i>.layer.0.layer_norm.weight
    encoder.<i>.mixer.w{q,k,v,o}         encoder.block.<i>.layer.0.SelfAttention.{q,k,v,o}
    encoder.<i>.ffn_norm.weight          encoder.block.<i>.layer.1.layer_norm.weight
    encoder.<i>.ffn.w1 / w3 / w2         encoder.block.<i>.layer.1.DenseReluDense.wi_0 / wi_1 / wo
                                         (relu: w1 / w2 → wi / wo)
    encoder_norm.weight                  encoder.final_layer_norm.weight
    decoder_bias.table.weight            decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight
    decoder.<i>.mixer*                   decoder.block.<i>.layer.0.*  (SelfAttention)
    decoder.<i>.cross_norm / cross.w*    decoder.block.<i>.layer.1.layer_norm / EncDecAttention.*
    decoder.<i>.ffn_norm / ffn.*         decoder.block.<i>.layer.2.*
    decoder_norm.weight                  decoder.final_layer_norm.weight
    head.weight                          lm_head.weight (the embedding itself when tied)

transformers 5 forces ``tie_word_embeddings=True`` on a ``T5Config`` and reads the keyword only as
"scale the decoder output by d_model^-½"; an untied (v1.1) export therefore sets the attribute
back to False after construction, so the model keeps its own ``lm_head`` and ``config.json``
says ``"tie_word_embeddings": false`` (../shared/REFERENCES.md §12). Configs T5 cannot hold
(RoPE, other FFN kinds, unequal head counts) are refused.
"""

from __future__ import annotations

from models.ffn.gated import GatedGELUConfig, ReLUConfig
from models.hf import HFAdapter, TensorMap, TensorRule, expand_rules

_ATTENTION = [("mixer", "{stack}.block.{i}.layer.0.SelfAttention")]
_PROJ = (("wq", "q"), ("wk", "k"), ("wv", "v"), ("wo", "o"))
_FFN = {"gated_gelu": (("w1", "wi_0"), ("w3", "wi_1"), ("w2", "wo")), "relu": (("w1", "wi"), ("w2", "wo"))}


def _stack_rules(stack: str, ffn_kind: str) -> list[TensorRule]:
    ours, theirs = f"{stack}.{{i}}", f"{stack}.block.{{i}}.layer"
    rules = [TensorRule(f"{ours}.mixer_norm.weight", f"{theirs}.0.layer_norm.weight")]
    rules += [TensorRule(f"{ours}.mixer.{a}.weight", f"{theirs}.0.SelfAttention.{b}.weight") for a, b in _PROJ]
    ffn_layer = 1
    if stack == "decoder":
        rules.append(TensorRule(f"{ours}.cross_norm.weight", f"{theirs}.1.layer_norm.weight"))
        rules += [TensorRule(f"{ours}.cross.{a}.weight", f"{theirs}.1.EncDecAttention.{b}.weight") for a, b in _PROJ]
        ffn_layer = 2
    rules.append(TensorRule(f"{ours}.ffn_norm.weight", f"{theirs}.{ffn_layer}.layer_norm.weight"))
    rules += [
        TensorRule(f"{ours}.ffn.{a}.weight", f"{theirs}.{ffn_layer}.DenseReluDense.{b}.weight")
        for a, b in _FFN[ffn_kind]
    ]
    return rules


class T5Adapter(HFAdapter):
    architecture = "T5ForConditionalGeneration"

    def refusal(self, config) -> str | None:
        if config.family != "encdec":
            return f"family {config.family!r} is not encdec"
        if config.position != "relative":
            return "position 'rope' (T5 has relative position bias only)"
        if not isinstance(config.ffn, (GatedGELUConfig, ReLUConfig)):
            return f"ffn kind {config.ffn.kind!r} (T5's are gated_gelu and relu)"
        return None

    def config_to_hf(self, config):
        from transformers import T5Config

        self._check(config)
        hf = T5Config(
            vocab_size=config.vocab_size,
            d_model=config.d_model,
            d_kv=config.resolved_head_dim,
            d_ff=config.ffn.d_ff,
            num_layers=config.encoder_layers,
            num_decoder_layers=config.decoder_layers,
            num_heads=config.n_heads,
            relative_attention_num_buckets=config.relative_buckets,
            relative_attention_max_distance=config.relative_max_distance,
            dropout_rate=0.0,
            layer_norm_epsilon=config.norm_eps,
            initializer_factor=config.init_factor,
            feed_forward_proj="gated-gelu" if config.ffn.kind == "gated_gelu" else "relu",
            decoder_start_token_id=config.decoder_start_id,
            tie_word_embeddings=config.tie_embeddings,
        )
        hf.tie_word_embeddings = config.tie_embeddings
        return hf

    def config_from_hf(self, hf, backend: str = "sdpa", max_seq_len: int = 512, max_target_len: int = 128):
        """Our config of an HF T5 config. T5 has no length limit (relative positions): our
        ``max_seq_len`` and ``max_target_len`` are given here."""
        from models.encdec.config import EncDecConfig

        if hf.feed_forward_proj not in ("gated-gelu", "relu"):
            raise ValueError(f"cannot convert a T5 with feed_forward_proj={hf.feed_forward_proj!r} (gated-gelu or relu)")
        ffn = GatedGELUConfig(d_ff=hf.d_ff) if hf.is_gated_act else ReLUConfig(d_ff=hf.d_ff)
        tied = bool(getattr(hf, "scale_decoder_outputs", hf.tie_word_embeddings))
        config = EncDecConfig(
            vocab_size=hf.vocab_size,
            d_model=hf.d_model,
            encoder_layers=hf.num_layers,
            decoder_layers=hf.num_decoder_layers,
            n_heads=hf.num_heads,
            max_seq_len=max_seq_len,
            max_target_len=max_target_len,
            head_dim=None if hf.d_kv * hf.num_heads == hf.d_model else hf.d_kv,
            position="relative",
            relative_buckets=hf.relative_attention_num_buckets,
            relative_max_distance=hf.relative_attention_max_distance,
            norm_eps=hf.layer_norm_epsilon,
            tie_embeddings=tied,
            init_factor=hf.initializer_factor,
            decoder_start_id=hf.decoder_start_token_id or 0,
            backend=backend,
            ffn=ffn,
        )
        config.validate()
        return config

    def tensor_map(self, config) -> TensorMap:
        self._check(config)
        kind = config.ffn.kind
        rules = {"embed.weight": ("shared.weight", TensorRule("embed.weight", "shared.weight"))}
        for stack in ("encoder", "decoder"):
            bias = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
            rules[f"{stack}_bias.table.weight"] = (bias, TensorRule(f"{stack}_bias.table.weight", bias))
            rules.update(expand_rules(_stack_rules(stack, kind), getattr(config, f"{stack}_layers")))
            norm = f"{stack}.final_layer_norm.weight"
            rules[f"{stack}_norm.weight"] = (norm, TensorRule(f"{stack}_norm.weight", norm))
        hf_aliases = {"encoder.embed_tokens.weight": "shared.weight", "decoder.embed_tokens.weight": "shared.weight"}
        if config.tie_embeddings:
            return TensorMap(rules, {"head.weight": "embed.weight"}, {**hf_aliases, "lm_head.weight": "shared.weight"})
        rules["head.weight"] = ("lm_head.weight", TensorRule("head.weight", "lm_head.weight"))
        return TensorMap(rules, {}, hf_aliases)


    def to_hf_model(self, model):
        """The transformers model, its stacks' embedding tables made the shared one (as in every
        T5 checkpoint; an untied T5Config otherwise gives each stack its own table in memory)."""
        hf = super().to_hf_model(model)
        hf.set_input_embeddings(hf.shared)
        return hf


T5_ADAPTER = T5Adapter()
