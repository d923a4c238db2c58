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


def _linear(module) -> int:
    return 2 * module.in_features * module.out_features


def walked_forward_flops(model, enc_len: int, dec_len: int) -> int:
    """Forward FLOPs of one row of ``enc_len`` encoder and ``dec_len`` decoder tokens, read off
    the built ``model``'s modules (models/counting.py's conventions), so any FFN kind counts as
    it declares (an MoE its active experts, a MatFormer its selected width): encoder blocks at
    ``enc_len`` tokens and keys; decoder self-attention and FFN at ``dec_len``; the
    cross-attention's K and V projections over the ``enc_len`` memory tokens, its q, o and scores
    over ``dec_len`` queries of ``enc_len`` keys; the head over ``dec_len`` tokens."""
    from models.counting import forward_flops_per_token

    total = sum(enc_len * forward_flops_per_token(block, enc_len) for block in model.encoder.values())
    for block in model.decoder.values():
        cross = block.cross
        total += dec_len * (forward_flops_per_token(block.mixer, dec_len) + forward_flops_per_token(block.ffn, dec_len))
        total += dec_len * (_linear(cross.wq) + _linear(cross.wo) + cross.core_flops_per_token(dec_len, enc_len))
        total += enc_len * (_linear(cross.wk) + _linear(cross.wv))
    return total + dec_len * _linear(model.head)


_ROW_FLOPS: dict[tuple, int] = {}


def row_training_flops(config, batch, setting=None) -> int:
    """Training (forward + backward = 3 × forward) FLOPs of one row of ``batch``, at its encoder
    (``input_ids``) and decoder (``decoder_input_ids``) lengths, padding included (the rows are
    computed whole); with a training pass's ``setting`` (models/passes.py), of the model run in
    that pass. The family's ``row_flops`` (models/spec.py): what the trainer's MFU counts."""
    enc_len, dec_len = batch["input_ids"].shape[-1], batch["decoder_input_ids"].shape[-1]
    key = (repr(config), enc_len, dec_len, repr(setting))
    if key not in _ROW_FLOPS:
        from models.counting import build_meta

        model = build_meta(config)
        if setting is not None:
            from models.passes import select_pass

            select_pass([model], setting)
        _ROW_FLOPS[key] = 3 * walked_forward_flops(model, enc_len, dec_len)
    return _ROW_FLOPS[key]
