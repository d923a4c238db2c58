"""Exact parameter and FLOP counts of the encoder-decoder (docs/encdec.md, "Counting").

With d = d_model, A = n_heads · head_dim, F = d_ff, V = vocab, L_e / L_d encoder / decoder
blocks, and the FFN's linear weights per block f = 3·d·F (gated_gelu, swiglu) or 2·d·F (relu):

    parameters = V·d (embedding, shared by both stacks) + V·d (head, untied only)
               + 2 · 32·H (relative bias tables; the buckets × heads, with position: relative)
               + L_e · (4·d·A + f + 2·d)            # self-attention q,k,v,o; FFN; two norms
               + L_d · (8·d·A + f + 3·d)            # self- and cross-attention; FFN; three norms
               + 2·d                                # the final norms

Forward FLOPs of one row of S_e encoder and S_d decoder tokens (2 per multiply-add; the
elementwise work — norms, softmax, activations, bias lookups — is not counted, as for the other
families, models/counting.py):

    encoder   S_e · L_e · 2·(4·d·A + f)  +  L_e · 4·A·S_e²                    # projections; q·kᵀ and ·v
    decoder   S_d · L_d · 2·(6·d·A + f)  +  L_d · 4·A·S_d²/2                  # causal: half the keys
    cross     L_d · 2·2·d·A·S_e  +  L_d · 4·A·S_d·S_e                        # K,V of the memory; q·kᵀ, ·v
    head      S_d · 2·d·V

(the cross-attention's q and o projections are in the decoder's 6·d·A). Training = 3 × forward.
"""

from __future__ import annotations


def _ffn_weights(config) -> int:
    ffn = config.ffn
    if ffn.kind == "relu":
        return 2 * config.d_model * ffn.d_ff
    if ffn.kind in ("gated_gelu", "swiglu"):
        return 3 * config.d_model * ffn.d_ff
    raise ValueError(f"exact encdec counts cover dense FFN kinds (gated_gelu, swiglu, relu), not {ffn.kind!r}")


def param_count(config) -> int:
    d, a, vocab = config.d_model, config.n_heads * config.resolved_head_dim, config.vocab_size
    f = _ffn_weights(config)
    total = vocab * d * (1 if config.tie_embeddings else 2)
    if config.position == "relative":
        total += 2 * config.relative_buckets * config.n_heads
    total += config.encoder_layers * (4 * d * a + f + 2 * d)
    total += config.decoder_layers * (8 * d * a + f + 3 * d)
    return total + 2 * d


def forward_flops(config, enc_len: int, dec_len: int, causal_half: bool = True) -> dict[str, int]:
    """Forward FLOPs of one row by part (``encoder``, ``decoder``, ``cross``, ``head``) and
    ``total``. ``causal_half`` False counts every decoder self-attention score (what a dense
    kernel executes) instead of the visible half."""
    d, a, vocab = config.d_model, config.n_heads * config.resolved_head_dim, config.vocab_size
    f = _ffn_weights(config)
    l_e, l_d = config.encoder_layers, config.decoder_layers
    self_keys = dec_len * dec_len / 2 if causal_half else dec_len * dec_len
    parts = {
        "encoder": enc_len * l_e * 2 * (4 * d * a + f) + l_e * 4 * a * enc_len * enc_len,
        "decoder": dec_len * l_d * 2 * (6 * d * a + f) + round(l_d * 4 * a * self_keys),
        "cross": l_d * 2 * 2 * d * a * enc_len + l_d * 4 * a * dec_len * enc_len,
        "head": dec_len * 2 * d * vocab,
    }
    parts["total"] = sum(parts.values())
    return parts
