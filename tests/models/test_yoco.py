"""The ``yoco`` family against independent references: a hand-written forward from the paper's
formulas (explicit masked softmax), full causal attention when the window covers the sequence,
incremental generation (prefill with early exit, chunked prefill, token-by-token decode) against
the full forward at every position, one K/V projection pair, exact parameter count and cache
bytes."""

from __future__ import annotations

import math

import pytest
import torch

from models.attention.layer import AttentionConfig
from models.counting import param_counts
from models.spec import build_model
from models.yoco import CrossAttentionConfig, YocoConfig

CONFIG = YocoConfig(
    vocab_size=97, d_model=32, n_layers=4, max_seq_len=32, mixer=AttentionConfig(n_heads=4, n_kv_heads=2, window=6),
    cross=CrossAttentionConfig(n_heads=4, n_kv_heads=2),
)


def model_of(config=CONFIG, seed=0):
    torch.manual_seed(seed)
    return build_model(config).eval()


def rms(x, w, eps=1e-5):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope(x, pos, theta=10000.0):  # x [B, S, H, D], rotate-half convention
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos[..., None].double() * inv  # [B, S, D/2]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1)[:, :, None].float(), torch.cat([ang.sin(), ang.sin()], -1)[:, :, None].float()
    half = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x * cos + half * sin


def attend(q, k, v, allowed):  # q [B,S,H,D], k/v [B,S,Hkv,D], allowed [B,S,S]
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    scores = torch.einsum("bshd,bthd->bhst", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return torch.einsum("bhst,bthd->bshd", scores.softmax(-1), v)


def reference_logits(model, ids, pos, docs, window):
    """YOCO from REFERENCES.md §2, written out: no module of the model is called."""
    P = dict(model.named_parameters())
    b, s = ids.shape
    i, j = torch.arange(s)[:, None], torch.arange(s)[None]
    same = docs[:, :, None] == docs[:, None, :]
    causal = (j <= i)[None] & same
    local = causal & ((i - j) < window)[None]
    hd = CONFIG.d_model // 4
    x = P["embed.weight"][ids]

    def ffn(prefix, h):
        return torch.nn.functional.silu(h @ P[f"{prefix}.w1.weight"].T) * (h @ P[f"{prefix}.w3.weight"].T) @ P[f"{prefix}.w2.weight"].T

    for layer in range(2):
        p = f"self_layers.{layer}"
        h = rms(x, P[f"{p}.mixer_norm.weight"])
        q = rope((h @ P[f"{p}.mixer.wq.weight"].T).view(b, s, -1, hd), pos)
        k = rope((h @ P[f"{p}.mixer.wk.weight"].T).view(b, s, -1, hd), pos)
        v = (h @ P[f"{p}.mixer.wv.weight"].T).view(b, s, -1, hd)
        x = x + attend(q, k, v, local).reshape(b, s, -1) @ P[f"{p}.mixer.wo.weight"].T
        x = x + ffn(f"{p}.ffn", rms(x, P[f"{p}.ffn_norm.weight"]))
    h = rms(x, P["kv_norm.weight"])
    k = rope((h @ P["kv.wk.weight"].T).view(b, s, -1, hd), pos)
    v = (h @ P["kv.wv.weight"].T).view(b, s, -1, hd)
    for layer in range(2, 4):
        p = f"cross_layers.{layer}"
        h = rms(x, P[f"{p}.mixer_norm.weight"])
        q = rope((h @ P[f"{p}.mixer.wq.weight"].T).view(b, s, -1, hd), pos)
        x = x + attend(q, k, v, causal).reshape(b, s, -1) @ P[f"{p}.mixer.wo.weight"].T
        x = x + ffn(f"{p}.ffn", rms(x, P[f"{p}.ffn_norm.weight"]))
    return rms(x, P["norm.weight"]) @ P["head.weight"].T


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_forward_equals_the_formulas_on_packed_documents(backend):
    config = YocoConfig(**{**CONFIG.__dict__, "mixer": AttentionConfig(n_heads=4, n_kv_heads=2, window=6, backend=backend),
                           "cross": CrossAttentionConfig(n_heads=4, n_kv_heads=2, backend=backend)})
    model = model_of(config)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (2, 24), generator=g)
    docs = torch.tensor([[0] * 10 + [1] * 14, [0] * 24])
    pos = torch.cat([torch.arange(10), torch.arange(14)])[None].expand(2, -1).clone()
    pos[1] = torch.arange(24)
    with torch.no_grad():
        ours = model(ids, position_ids=pos, doc_ids=docs)
        ref = reference_logits(model, ids, pos, docs, window=6)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_a_window_covering_the_sequence_is_full_causal_attention():
    windowed = model_of()
    full = build_model(YocoConfig(**{**CONFIG.__dict__, "mixer": AttentionConfig(n_heads=4, n_kv_heads=2)})).eval()
    full.load_state_dict(windowed.state_dict())
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(windowed(ids), full(ids), rtol=0, atol=1e-6)


def test_prefill_with_early_exit_chunks_and_decode_equal_the_full_forward():
    model = model_of()
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
        state = model.new_decode_state(2, 20, torch.float32, "cpu")
        state.prefill = True
        for start, end in ((0, 9), (9, 13)):  # prompt chunks: early exit, the last position only
            prefill = model(ids[:, start:end], state=state)
            assert prefill.shape == (2, 1, 97)
            torch.testing.assert_close(prefill[:, 0], full[:, end - 1], rtol=0, atol=1e-5)
        state.prefill = False
        several = model(ids[:, 13:16], state=state)  # not a prompt (speculative verification): every position
        torch.testing.assert_close(several, full[:, 13:16], rtol=0, atol=1e-5)
        for t in range(16, 20):
            torch.testing.assert_close(model(ids[:, t : t + 1], state=state)[:, 0], full[:, t], rtol=0, atol=1e-5)


def test_one_key_value_projection_pair_and_exact_counts():
    model = model_of()
    kv = [n for n, _ in model.named_parameters() if n.endswith(("wk.weight", "wv.weight")) and "self_layers" not in n]
    assert kv == ["kv.wk.weight", "kv.wv.weight"]
    assert not any(n.startswith("cross_layers") and ("wk" in n or "wv" in n) for n, _ in model.named_parameters())
    d, v, f, hd = 32, 97, CONFIG.ffn.d_ff, 8
    self_block = 2 * d + d * 4 * hd * 2 + d * 2 * hd * 2 + 3 * d * f
    cross_block = 2 * d + d * 4 * hd * 2 + 3 * d * f
    expected = 2 * v * d + 2 * d + 2 * d * 2 * hd + 2 * self_block + 2 * cross_block
    assert param_counts(CONFIG).total == expected == sum(p.numel() for p in model.parameters())


def test_cache_bytes_grow_by_one_kv_per_token():
    """Cache bytes = max_len · n_kv · head_dim · 2 · 4 · batch for the global K,V (preallocated)
    plus, per self-decoder layer, a window cache of W − 1 positions once that many were seen."""
    model = model_of()
    ids = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(4))
    state = model.new_decode_state(3, 24, torch.float32, "cpu")
    with torch.no_grad():
        model(ids, state=state)
    global_kv = 24 * 2 * 8 * 2 * 4 * 3
    windows = 2 * (6 - 1) * 2 * 8 * 2 * 4 * 3
    assert state.nbytes() == global_kv + windows


@pytest.mark.parametrize("family", ["yoco", "decoder"])
@pytest.mark.parametrize("length", [4, 16])
def test_decode_cache_bytes_formula_is_the_state_measured(family, length):
    """``decode_cache_bytes`` against the bytes the caches hold after a prefill (fp32), for
    YOCO and for a decoder with a windowed and a full layer."""
    from models.config import LayerOverride
    from models.decoder.config import DecoderConfig

    if family == "yoco":
        config = CONFIG
    else:
        config = DecoderConfig(vocab_size=97, d_model=32, n_layers=2, max_seq_len=32,
                               mixer=AttentionConfig(n_heads=4, n_kv_heads=2, window=6),
                               layer_overrides=[LayerOverride(layers=[1], mixer={"window": None})])
    model = model_of(config)
    state = model.new_decode_state(2, length, torch.float32, "cpu")
    with torch.no_grad():
        model(torch.randint(0, 97, (2, length), generator=torch.Generator().manual_seed(5)), state=state)
    assert state.nbytes() == config.decode_cache_bytes(2, length, element_bytes=4)


def test_yoco_1b_preset_counts():
    """yoco-1b = the 1b decoder without its 8 cross-decoder layers' K/V projections, plus the
    one global K/V pair and its norm (exact parameter count)."""
    from pretrain.config import load_config

    decoder, yoco = load_config("1b").model, load_config("yoco-1b").model
    d, kv = 2048, 8 * 64
    assert param_counts(yoco).total == param_counts(decoder).total - 8 * 2 * d * kv + 2 * d * kv + d


@pytest.mark.parametrize("family", ["yoco", "decoder"])
def test_chunked_prefill_generates_the_same_tokens(family):
    from models.decoder.config import DecoderConfig
    from models.generate import generate

    config = CONFIG if family == "yoco" else DecoderConfig(
        vocab_size=97, d_model=32, n_layers=2, max_seq_len=32, mixer=AttentionConfig(n_heads=4, n_kv_heads=2, window=6))
    model = model_of(config)
    prompt = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(6))
    whole = generate(model, prompt, 10)
    for chunk in (1, 4, 5):
        assert torch.equal(generate(model, prompt, 10, prefill_chunk=chunk), whole), chunk


@pytest.mark.parametrize("ffn", [
    {"kind": "moe", "n_experts": 4, "top_k": 1, "d_ff": 32, "router": "hash", "hash_vocab_size": 97,
     "aux_loss_coef": 0.0, "z_loss_coef": 0.0},
    {"kind": "moe", "n_experts": 4, "top_k": 2, "d_ff": 32},
    {"kind": "matformer", "d_ff": 64, "granularities": [16, 32, 64]},
])
def test_other_ffn_kinds_compose_and_decode_like_the_full_forward(ffn):
    """YOCO with MoE (token-id hash routing included: the early exit keeps the ids in step) and
    MatFormer FFNs: prefill + decode equal the full forward."""
    from models.config import FFNConfig
    from models.configtree import tagged_from_value

    config = YocoConfig(**{**CONFIG.__dict__, "ffn": tagged_from_value(FFNConfig, ffn, "model.ffn")})
    model = model_of(config)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = model(ids)
        state = model.new_decode_state(2, 12, torch.float32, "cpu")
        state.prefill = True
        torch.testing.assert_close(model(ids[:, :8], state=state)[:, 0], full[:, 7], rtol=0, atol=1e-5)
        state.prefill = False
        for t in range(8, 12):
            torch.testing.assert_close(model(ids[:, t : t + 1], state=state)[:, 0], full[:, t], rtol=0, atol=1e-5)
