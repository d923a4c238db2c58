"""Decoding with a decode state (growing KV caches, evicting window caches) equals full
forwards; cache sizes; greedy and nucleus sampling."""

from __future__ import annotations

import pytest
import torch

from models.attention.cache import KVCache, WindowKVCache
from models.attention.layer import AttentionConfig
from models.config import LayerOverride
from models.decoder.config import DecoderConfig
from models.ffn.swiglu import SwiGLUConfig
from models.generate import generate, nucleus_probs, sample_next
from models.spec import build_model


def _model(backend="sdpa", n_kv_heads=2, window=None, overrides=(), max_seq_len=40):
    config = DecoderConfig(
        vocab_size=53, d_model=32, n_layers=2, max_seq_len=max_seq_len,
        mixer=AttentionConfig(n_heads=4, n_kv_heads=n_kv_heads, backend=backend, window=window),
        ffn=SwiGLUConfig(d_ff=48), layer_overrides=list(overrides),
    )
    torch.manual_seed(0)
    return build_model(config).eval()


def _decode_in_chunks(model, tokens, state):
    """Prefill 5, then one at a time, then several queries after a cache, then one at a time."""
    chunks = [model(tokens[:, :5], state=state)]
    chunks += [model(tokens[:, i : i + 1], state=state) for i in range(5, 9)]
    chunks.append(model(tokens[:, 9:13], state=state))
    chunks += [model(tokens[:, i : i + 1], state=state) for i in range(13, tokens.shape[1])]
    return torch.cat(chunks, dim=1)


@pytest.mark.parametrize("backend,kv_heads", [("sdpa", 2), ("sdpa", 4), ("math", 1)])
def test_cached_decoding_matches_full_forward_at_every_position(backend, kv_heads):
    model = _model(backend, n_kv_heads=kv_heads)
    tokens = torch.randint(0, 53, (2, 16))
    with torch.no_grad():
        full = model(tokens)
        state = model.new_decode_state(2, 16, torch.float32, "cpu")
        decoded = _decode_in_chunks(model, tokens, state)
    assert state.length == 16 and all(isinstance(c, KVCache) for c in state.layers.values())
    torch.testing.assert_close(decoded, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_window_caches_evict_and_still_match_the_full_forward(backend):
    """Sliding-window layers (window 3, and 5 on one layer) keep only window − 1 positions, yet
    decoding equals the full forward at every position."""
    model = _model(backend, window=3, overrides=[LayerOverride("1", {"window": 5})])
    tokens = torch.randint(0, 53, (2, 20))
    with torch.no_grad():
        full = model(tokens)
        state = model.new_decode_state(2, 20, torch.float32, "cpu")
        decoded = _decode_in_chunks(model, tokens, state)
    caches = state.layers
    assert isinstance(caches[0], WindowKVCache) and isinstance(caches[1], WindowKVCache)
    assert caches[0].length == 2 and caches[1].length == 4  # window − 1 positions, whatever the length
    per_position = 2 * 2 * 2 * 8 * 4  # batch · (K and V) · kv heads · head dim · fp32 bytes
    assert state.nbytes() == per_position * (2 + 4)
    torch.testing.assert_close(decoded, full, atol=1e-5, rtol=1e-5)


def test_a_window_as_long_as_the_generation_uses_a_growing_cache():
    model = _model(window=64)
    state = model.new_decode_state(1, 30, torch.float32, "cpu")
    assert all(isinstance(c, KVCache) for c in state.layers.values())
    assert state.nbytes() == 2 * 2 * 1 * 2 * 30 * 8 * 4  # layers · (K, V) · batch · kv heads · max_len · D · 4


def test_cache_overflow_is_refused():
    model = _model()
    state = model.new_decode_state(1, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="KV cache holds 4 positions; 6 requested"):
        model(torch.zeros(1, 6, dtype=torch.long), state=state)
    with pytest.raises(ValueError, match="exceeds model.max_seq_len=40"):
        model.new_decode_state(1, 41, torch.float32, "cpu")


def test_greedy_generation_equals_repeated_full_forward_argmax():
    model = _model()
    prompt = torch.randint(0, 53, (3, 6))
    out = generate(model, prompt, max_new_tokens=10)
    expected = prompt
    with torch.no_grad():
        for _ in range(10):
            expected = torch.cat([expected, model(expected)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, expected)


def test_sampling_is_reproducible_with_a_generator():
    model = _model()
    prompt = torch.randint(0, 53, (2, 4))
    runs = [generate(model, prompt, 12, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    other = generate(model, prompt, 12, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(runs[0], other)


def test_eos_finishes_rows_and_stops_when_all_are_done():
    model = _model()
    prompt = torch.randint(0, 53, (2, 4))
    greedy = generate(model, prompt, 8)
    eos = int(greedy[0, 6])  # row 0's third generated token
    expected, ends = greedy.clone(), []
    for row in expected:
        hits = (row[4:] == eos).nonzero()
        ends.append(int(hits[0]) + 4 if len(hits) else None)
        if ends[-1] is not None:
            row[ends[-1] :] = eos
    length = 12 if None in ends else max(ends) + 1
    assert torch.equal(generate(model, prompt, 8, eos_id=eos), expected[:, :length])
    assert torch.equal(generate(model, prompt[:1], 8, eos_id=eos), greedy[:1, : ends[0] + 1])


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    probs = torch.tensor([[0.1, 0.5, 0.05, 0.3, 0.05]])
    logits = probs.log()
    torch.testing.assert_close(nucleus_probs(logits, 1.0, 1.0), probs)
    torch.testing.assert_close(nucleus_probs(logits, 1.0, 0.75), torch.tensor([[0, 0.625, 0, 0.375, 0]]))
    torch.testing.assert_close(nucleus_probs(logits, 1.0, 0.85), torch.tensor([[1 / 9, 5 / 9, 0, 3 / 9, 0]]))
    torch.testing.assert_close(nucleus_probs(logits, 1.0, 0.01), torch.tensor([[0.0, 1.0, 0, 0, 0]]))
    sharpened = (probs**2) / (probs**2).sum()
    torch.testing.assert_close(nucleus_probs(logits, 0.5, 1.0), sharpened)


def test_sampled_frequencies_follow_the_truncated_distribution():
    logits = torch.tensor([0.1, 0.5, 0.05, 0.3, 0.05]).log().expand(20000, 5)
    draws = sample_next(logits, temperature=1.0, top_p=0.75, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=5).float() / 20000
    torch.testing.assert_close(freq, torch.tensor([0, 0.625, 0, 0.375, 0]), atol=0.015, rtol=0)


def test_sampling_arguments_are_checked():
    with pytest.raises(ValueError, match="top_p"):
        sample_next(torch.zeros(1, 3), temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        sample_next(torch.zeros(1, 3), temperature=-1.0)
