"""Attention backends against the math backend for every attention-spec combination they accept
(outputs and gradients), math against a per-query loop that spells out the spec's rules, the
refusal message for each combination a backend does not accept, and document masking through
the model (packed documents equal documents run alone)."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch

from models.attention.backends import BACKENDS, get_backend
from models.attention.layer import AttentionConfig
from models.attention.spec import AttentionSpec, AttentionSpecError, dense_mask
from models.decoder.config import DecoderConfig
from models.ffn.swiglu import SwiGLUConfig
from models.spec import build_model

CUDA = torch.cuda.is_available()


def _qkv(batch, heads, kv_heads, q_len, kv_len, dim=8, seed=0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, dim, generator=g).to(device, dtype).requires_grad_()
    k = torch.randn(batch, kv_heads, kv_len, dim, generator=g).to(device, dtype).requires_grad_()
    v = torch.randn(batch, kv_heads, kv_len, dim, generator=g).to(device, dtype).requires_grad_()
    return q, k, v


def _segments(lengths_per_row):
    return torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in lengths_per_row])


def _run(backend_name, q, k, v, spec):
    backend = get_backend(backend_name)
    return backend.attend(q, k, v, backend.prepare(spec, q.shape[2], k.shape[2], q.device))


def _loop_reference(q, k, v, spec):
    """One query at a time, keys chosen by the rules of models/attention/spec.py, in float64;
    a query that sees no key gives 0."""
    batch, heads, q_len, dim = q.shape
    kv_len = k.shape[2]
    group = heads // k.shape[1]
    scale = 1 / math.sqrt(dim) if spec.scale is None else spec.scale
    out = torch.zeros(batch, heads, q_len, dim, dtype=torch.float64)
    for b, h, i in itertools.product(range(batch), range(heads), range(q_len)):
        pos = i + kv_len - q_len
        keys = []
        for j in range(kv_len):
            if spec.causal and j > pos:
                continue
            if spec.window is not None and abs(pos - j) >= spec.window:
                continue
            if spec.segments is not None and spec.segments[b, j] != spec.segments[b, pos]:
                continue
            if spec.q_segments is not None and spec.k_segments[b, j] != spec.q_segments[b, i]:
                continue
            keys.append(j)
        if not keys:
            continue
        scores = k[b, h // group, keys].double() @ q[b, h, i].double() * scale
        if spec.bias is not None:
            scores = scores + spec.bias[min(b, spec.bias.shape[0] - 1), min(h, spec.bias.shape[1] - 1), i, keys].double()
        out[b, h, i] = torch.softmax(scores, dim=0) @ v[b, h // group, keys].double()
    return out


def _spec(causal, window, segments, bias, scale, q_len, kv_len, heads, batch=2, seed=0):
    """An AttentionSpec of the named combination for [batch, heads, q_len → kv_len] attention."""
    g = torch.Generator().manual_seed(100 + seed)
    kw = dict(causal=causal, window=window, scale=scale)
    if segments == "self":
        kw["segments"] = torch.sort(torch.randint(0, 3, (batch, kv_len), generator=g), dim=1).values
    elif segments == "cross":
        kw["q_segments"] = torch.sort(torch.randint(0, 3, (batch, q_len), generator=g), dim=1).values
        kw["k_segments"] = torch.sort(torch.randint(0, 3, (batch, kv_len), generator=g), dim=1).values
        kw["q_segments"][0, -1] = 7  # a query whose segment has no key: its output must be 0
    if bias == "per_head":
        kw["bias"] = torch.randn(1, heads, q_len, kv_len, generator=g).requires_grad_()
    elif bias == "per_row":
        kw["bias"] = torch.randn(batch, 1, q_len, kv_len, generator=g).requires_grad_()
    return AttentionSpec(**kw)


# (causal, window, segments, bias, scale, q_len, kv_len): self-attention shapes (q_len == kv_len,
# or the last queries after a cache) and cross-attention (bidirectional, unrelated lengths).
COMBOS = [
    (causal, window, segments, bias, scale, q_len, kv_len)
    for causal in (True, False)
    for window in (None, 4)
    for segments in (None, "self", "cross")
    for bias in (None, "per_head", "per_row")
    for scale in (None, 1.0)
    for q_len, kv_len in ((11, 11), (3, 11), (7, 13))
    if not (segments == "cross" and causal)  # cross-attention is not causal
    if not (q_len != kv_len and causal is False and segments != "cross")
    if not (bias == "per_row" and scale is None)  # keep the matrix small: bias kinds × one scale
]
IDS = ["-".join(str(x) for x in combo) for combo in COMBOS]


@pytest.mark.parametrize("combo", COMBOS[::5], ids=IDS[::5])
def test_math_matches_the_per_query_loop(combo):
    causal, window, segments, bias, scale, q_len, kv_len = combo
    q, k, v = _qkv(2, 4, 2, q_len, kv_len)
    spec = _spec(causal, window, segments, bias, scale, q_len, kv_len, heads=4)
    got = _run("math", q, k, v, spec)
    torch.testing.assert_close(got.double(), _loop_reference(q, k, v, spec), atol=1e-5, rtol=1e-5)


def _outputs_and_grads(name, combo, device="cpu", dtype=torch.float32, dim=8, heads=4, kv_heads=2, seed=1):
    causal, window, segments, bias, scale, q_len, kv_len = combo
    q, k, v = _qkv(2, heads, kv_heads, q_len, kv_len, dim=dim, seed=seed, device=device, dtype=dtype)
    spec = _spec(causal, window, segments, bias, scale, q_len, kv_len, heads=heads)
    if device != "cpu":
        spec = AttentionSpec(**{f: _to(getattr(spec, f), device) for f in spec.__dataclass_fields__})
    out = _run(name, q, k, v, spec)
    weights = torch.linspace(-1, 1, out.numel(), device=device).view_as(out)
    (out.float() * weights).sum().backward()
    bias_grad = spec.bias.grad if spec.bias is not None else None
    return out, q.grad, k.grad, v.grad, bias_grad


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.detach().to(device).requires_grad_(value.requires_grad)
    return value


@pytest.mark.parametrize("combo", COMBOS, ids=IDS)
def test_sdpa_matches_math_outputs_and_gradients(combo):
    got, want = _outputs_and_grads("sdpa", combo), _outputs_and_grads("math", combo)
    for a, b in zip(got, want):
        if b is None:
            assert a is None
        else:
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("combo", COMBOS[::3], ids=IDS[::3])
def test_flex_forward_on_cpu_matches_math(combo):
    """Without gradients FlexAttention runs eagerly on CPU: this checks its mask_mod and
    score_mod there (its backward is checked on GPUs below)."""
    causal, window, segments, bias, scale, q_len, kv_len = combo
    q, k, v = (t.detach() for t in _qkv(2, 4, 2, q_len, kv_len, seed=5))
    spec = _spec(causal, window, segments, bias, scale, q_len, kv_len, heads=4)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        torch.testing.assert_close(_run("flex", q, k, v, spec), _run("math", q, k, v, spec), atol=1e-5, rtol=1e-5)


def test_window_covering_the_sequence_equals_full_causal():
    q, k, v = _qkv(2, 4, 2, 12, 12, seed=2)
    segments = _segments([[4, 8], [12]])
    for name in ("math", "sdpa"):
        full = _run(name, q, k, v, AttentionSpec(segments=segments))
        for window in (12, 100):
            torch.testing.assert_close(_run(name, q, k, v, AttentionSpec(window=window, segments=segments)), full, atol=0, rtol=0)
        assert not torch.allclose(_run(name, q, k, v, AttentionSpec(window=3, segments=segments)), full)


def test_window_one_sees_only_itself():
    q, k, v = _qkv(1, 2, 2, 6, 6, seed=3)
    torch.testing.assert_close(_run("sdpa", q, k, v, AttentionSpec(window=1)), v, atol=1e-6, rtol=1e-6)


def test_dense_mask_cells():
    cpu = torch.device("cpu")
    mask = dense_mask(AttentionSpec(window=2, segments=torch.tensor([[0, 0, 1, 1, 1]])), 5, 5, cpu)[0, 0]
    expected = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]], dtype=torch.bool
    )
    assert torch.equal(mask, expected)
    bottom_right = dense_mask(AttentionSpec(), 2, 5, cpu)[0, 0]
    assert torch.equal(bottom_right, torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool))
    band = dense_mask(AttentionSpec(causal=False, window=2), 4, 4, cpu)[0, 0]
    assert torch.equal(band, torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]], dtype=torch.bool))
    cross = dense_mask(AttentionSpec(causal=False, q_segments=torch.tensor([[0, 1]]), k_segments=torch.tensor([[0, 0, 1]])), 2, 3, cpu)
    assert torch.equal(cross[0, 0], torch.tensor([[1, 1, 0], [0, 0, 1]], dtype=torch.bool))


def test_fully_masked_rows_give_zero_not_nan():
    q, k, v = _qkv(1, 2, 2, 4, 4, seed=4)
    spec = AttentionSpec(causal=False, q_segments=torch.tensor([[0, 1, 9, 1]]), k_segments=torch.tensor([[0, 1, 1, 1]]))
    for name in ("math", "sdpa"):
        out = _run(name, q, k, v, spec)
        out.sum().backward()
        assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2])), name
        assert all(torch.isfinite(t.grad).all() for t in (q, k, v)), name
        for t in (q, k, v):
            t.grad = None


def test_spec_rejects_inconsistent_segments():
    with pytest.raises(AttentionSpecError, match="q_segments and k_segments go together"):
        AttentionSpec(causal=False, q_segments=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(AttentionSpecError, match="not both"):
        z = torch.zeros(1, 3, dtype=torch.long)
        AttentionSpec(segments=z, q_segments=z, k_segments=z)
    with pytest.raises(AttentionSpecError, match="window must be >= 1"):
        AttentionSpec(window=0)


def test_backend_registry_and_errors():
    assert set(BACKENDS) == {"math", "sdpa", "flex", "flash", "cudnn"}
    with pytest.raises(ValueError, match="unknown attention backend 'xformers'"):
        get_backend("xformers")


def test_flex_refuses_to_train_on_cpu():
    q, k, v = _qkv(1, 2, 2, 8, 8)
    with pytest.raises(AttentionSpecError, match="cannot train on CPU.*sdpa"):
        _run("flex", q, k, v, AttentionSpec())


def _flash_installed() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(_flash_installed(), reason="flash_attn is installed: the missing-package message cannot be shown")
def test_flash_without_package_says_how_to_install():
    with pytest.raises(AttentionSpecError, match="pip install flash-attn"):
        get_backend("flash").prepare(AttentionSpec(), 4, 4, torch.device("cpu"))


@pytest.mark.parametrize(
    "spec,q_len,message",
    [
        (AttentionSpec(), 4, "on a CPU"),
        (AttentionSpec(bias=torch.zeros(1, 1, 4, 4)), 4, "additive bias"),
        (AttentionSpec(causal=False, q_segments=torch.zeros(1, 4), k_segments=torch.zeros(1, 4)), 4, "query/key segments"),
        (AttentionSpec(segments=torch.zeros(1, 4)), 2, "segments with a KV cache"),
    ],
)
def test_flash_refusals_name_the_combination(spec, q_len, message):
    """Each combination flash_attn cannot compute is refused by name (checked without the package:
    the refusal comes before any kernel call)."""
    device = torch.device("cuda") if message != "on a CPU" else torch.device("cpu")
    from models.attention.backends import FlashBackend

    refusal = FlashBackend._refusal(spec, q_len, 4, device)
    assert refusal is not None and message in refusal


def _tiny_model(backend="sdpa", window=None):
    config = DecoderConfig(
        vocab_size=61, d_model=32, n_layers=2, max_seq_len=64,
        mixer=AttentionConfig(n_heads=4, n_kv_heads=2, backend=backend, window=window), ffn=SwiGLUConfig(d_ff=48),
    )
    return build_model(config)


@pytest.mark.parametrize("backend,window", [("sdpa", None), ("math", None), ("sdpa", 3)])
def test_packed_documents_equal_documents_run_alone(backend, window):
    """Outputs and parameter gradients of a packed row equal the sum over its documents run as
    separate sequences; the gradient of each document's loss is zero on every other document."""
    torch.manual_seed(0)
    model = _tiny_model(backend, window)
    lengths = [5, 1, 7, 3]
    tokens = torch.randint(0, 61, (1, sum(lengths)))
    doc_ids = _segments([lengths])
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    weights = torch.randn(1, sum(lengths), 61)

    model.zero_grad()
    packed = model(tokens, position_ids=positions, doc_ids=doc_ids)
    (packed * weights).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    start = 0
    for n in lengths:
        alone = model(tokens[:, start : start + n])
        torch.testing.assert_close(packed[:, start : start + n], alone, atol=1e-5, rtol=1e-5)
        (alone * weights[:, start : start + n]).sum().backward()
        start += n
    for name, param in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], param.grad, atol=1e-5, rtol=1e-5)


def test_no_gradient_crosses_a_document_boundary():
    torch.manual_seed(1)
    model = _tiny_model()
    lengths = [6, 4, 5]
    seq = sum(lengths)
    hidden = torch.randn(1, seq, 32, requires_grad=True)
    doc_ids = _segments([lengths])
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    model.embed = None
    out = model(hidden, position_ids=positions, doc_ids=doc_ids)
    out[0, 6:10].sum().backward()
    grad = hidden.grad[0].abs().sum(-1)
    assert torch.all(grad[:6] == 0) and torch.all(grad[10:] == 0)
    assert torch.all(grad[6:10] > 0)


GPU_COMBOS = [
    (True, None, None, None, None, 256, 256),
    (True, None, "self", None, None, 256, 256),
    (True, 32, "self", None, None, 256, 256),
    (False, None, "cross", "per_head", 1.0, 128, 256),
    (True, None, None, "per_head", None, 64, 256),
]


@pytest.mark.skipif(not CUDA, reason="FlexAttention backward needs a CUDA device; none is available")
@pytest.mark.parametrize("combo", GPU_COMBOS)
def test_flex_matches_math_on_gpu(combo):
    got = _outputs_and_grads("flex", combo, device="cuda", dim=64, heads=8, seed=6)
    want = _outputs_and_grads("math", combo, device="cuda", dim=64, heads=8, seed=6)
    for a, b in zip(got, want):
        if b is not None:
            torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)


@pytest.mark.skipif(not (CUDA and _flash_installed()), reason="needs a CUDA device and the flash_attn package")
@pytest.mark.parametrize("combo", [c for c in GPU_COMBOS if c[3] is None and c[2] != "cross"])
def test_flash_matches_math_on_gpu(combo):
    got = _outputs_and_grads("flash", combo, device="cuda", dtype=torch.bfloat16, dim=64, heads=8, seed=7)
    want = _outputs_and_grads("math", combo, device="cuda", dtype=torch.bfloat16, dim=64, heads=8, seed=7)
    for a, b in zip(got, want):
        if b is not None:
            torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=3e-2)
