"""``model.kernels.attention`` (models/kernels.py): one backend for every attention layer of a
decoder (full and windowed layers), YOCO (self- and cross-decoder) and an encoder-decoder
(encoder, decoder and cross-attention); the switch changes what the forward computes with (math
and sdpa agree through it; flex refuses CPU training through it; cudnn is refused on CPU at the
first forward); the per-layer backends it overrides are named; YOCO's cross-decoder query and
global-key RoPE, and encdec's RoPE, take ``model.kernels.rope``; each GPU backend equals math on the same inputs (GPU
only, skipped on CPU with the reason)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from models.attention.backends import AttentionBackend, get_backend, math_attention
from models.attention.layer import AttentionConfig
from models.attention.spec import AttentionSpec, AttentionSpecError, dense_mask
from models.config import LayerOverride
from models.decoder.config import DecoderConfig
from models.encdec.config import EncDecConfig
from models.ffn.gated import GatedGELUConfig
from models.kernels import KernelsConfig, attention_overrides
from models.spec import build_model
from models.yoco.config import CrossAttentionConfig, YocoConfig

GPU = torch.cuda.is_available()

DECODER = DecoderConfig(
    vocab_size=97, d_model=32, n_layers=3, max_seq_len=32, mixer=AttentionConfig(n_heads=4, n_kv_heads=2),
    layer_overrides=[LayerOverride(layers=1, mixer={"window": 5, "backend": "math"})],
)
YOCO = YocoConfig(
    vocab_size=97, d_model=32, n_layers=4, max_seq_len=32, mixer=AttentionConfig(n_heads=4, n_kv_heads=2, window=6),
    cross=CrossAttentionConfig(n_heads=4, n_kv_heads=2, backend="math"),
)
ENCDEC = EncDecConfig(
    vocab_size=97, d_model=32, encoder_layers=2, decoder_layers=2, n_heads=4, max_seq_len=32, max_target_len=16,
    ffn=GatedGELUConfig(d_ff=48),
)
FAMILIES = {"decoder": DECODER, "yoco": YOCO, "encdec": ENCDEC}
# Attention layers per model: decoder blocks; YOCO's self- and cross-decoder halves; encoder
# self-attention, then decoder self- and cross-attention per decoder block.
LAYERS = {"decoder": 3, "yoco": 4, "encdec": 2 + 2 * 2}


def _switched(config, attention: str | None, **kernels):
    return dataclasses.replace(config, kernels=KernelsConfig(attention=attention, **kernels))


def _backends(model) -> list[str]:
    return [m.backend.name for m in model.modules() if isinstance(getattr(m, "backend", None), AttentionBackend)]


def _loss(family: str, model, seed: int = 0) -> torch.Tensor:
    """A scalar of the model's output on packed inputs (two documents per row)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (2, 16), generator=g)
    docs = (torch.arange(16) >= 7).long().expand(2, 16)
    if family == "encdec":
        decoder_docs = (torch.arange(9) >= 4).long().expand(2, 9)
        decoder_ids = torch.randint(0, 97, (2, 9), generator=g)
        out = model(ids, decoder_input_ids=decoder_ids, doc_ids=docs, decoder_doc_ids=decoder_docs)
    else:
        out = model(ids, doc_ids=docs)
    probe = torch.randn(out.shape, generator=g)
    return (out.float() * probe).sum()


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("choice", ["sdpa", "flex", "flash", "cudnn", "math"])
def test_every_attention_layer_gets_the_chosen_backend(family, choice):
    config = FAMILIES[family]
    unset = _backends(build_model(config))
    assert len(unset) == LAYERS[family]
    assert _backends(build_model(_switched(config, choice))) == [choice] * LAYERS[family]
    assert _backends(build_model(_switched(config, None))) == unset


@pytest.mark.parametrize("family", list(FAMILIES))
def test_math_and_sdpa_through_the_switch_agree(family):
    results = []
    for choice in ("math", "sdpa"):
        torch.manual_seed(0)
        model = build_model(_switched(FAMILIES[family], choice))
        loss = _loss(family, model)
        loss.backward()
        results.append((loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    (loss_math, grads_math), (loss_sdpa, grads_sdpa) = results
    torch.testing.assert_close(loss_sdpa, loss_math, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads_sdpa, grads_math, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_switch_reaches_the_forward(family):
    """Every layer is configured for sdpa or math, which train on CPU; flex and cudnn, chosen by
    the switch, refuse to, so the forward ran with the switch's backend."""
    model = build_model(_switched(FAMILIES[family], "flex"))
    with pytest.raises(AttentionSpecError, match="'flex' cannot train on CPU.*model.kernels.attention=sdpa"):
        _loss(family, model)
    model = build_model(_switched(FAMILIES[family], "cudnn"))
    refusal = r"^attention backend 'cudnn' cannot run: torch's cuDNN attention needs a CUDA GPU, .* cpu; use sdpa$"
    with pytest.raises(AttentionSpecError, match=refusal):
        _loss(family, model)


def test_overridden_layer_backends_are_named_and_unknown_choices_refused():
    assert attention_overrides(DECODER) == []
    assert attention_overrides(_switched(DECODER, "sdpa")) == ["model.layer_overrides[0].mixer.backend=math"]
    assert attention_overrides(_switched(DECODER, "math")) == ["model.mixer.backend=sdpa"]
    assert attention_overrides(_switched(YOCO, "flex")) == ["model.mixer.backend=sdpa", "model.cross.backend=math"]
    assert attention_overrides(_switched(ENCDEC, "cudnn")) == ["model.backend=sdpa"]
    unknown = (
        r"model.kernels.attention 'xformers' is unknown; choose one of "
        r"\['sdpa', 'flex', 'flash', 'cudnn', 'math'\] \(or leave it unset for each layer's own backend\)"
    )
    for family in ("decoder", "yoco", "encdec"):
        with pytest.raises(ValueError, match=unknown):
            type(FAMILIES[family]).from_dict({"family": family, "kernels": {"attention": "xformers"}})
    assert _switched(ENCDEC, None, loss="chunked").problems() == [
        "model.kernels.loss=chunked is not available in the encdec family (its head has no fused loss); "
        "use model.kernels.loss=torch"
    ]


ROPE_LAYERS = {
    "yoco": (YOCO, {"Attention", "CrossAttention", "GlobalKV"}),
    "encdec": (dataclasses.replace(ENCDEC, position="rope"), {"T5Attention"}),
}


@pytest.mark.parametrize("family", list(ROPE_LAYERS))
def test_yoco_and_encdec_rope_takes_the_rope_kernel(family):
    """YOCO's self-attention, cross-decoder queries and global keys, and encdec's self-attention
    rotate with ``model.kernels.rope``: compiled equals torch; liger is refused on CPU."""
    config, layers = ROPE_LAYERS[family]
    model = build_model(_switched(config, None, rope="compile"))
    slots = {(type(m).__name__, m.kernel) for m in model.modules() if getattr(m, "kernel_slot", None) == "rope"}
    assert slots == {(name, "compile") for name in layers}
    results = []
    for rope in ("torch", "compile"):
        torch.manual_seed(0)
        model = build_model(_switched(config, None, rope=rope))
        loss = _loss(family, model)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    assert len(results[1][1]) == len(results[0][1])
    for got, want in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    for name in layers:  # each kind of layer alone on liger: its forward goes through the kernel
        model = build_model(config)
        for module in model.modules():
            if type(module).__name__ == name:
                module.kernel = "liger"
        with pytest.raises(RuntimeError, match="model.kernels.rope=liger cannot run"):
            _loss(family, model)


SPECS = {
    "causal": (AttentionSpec(causal=True), 64),
    "window": (AttentionSpec(causal=True, window=9), 64),
    "documents": (None, 64),
    "full": (AttentionSpec(causal=False), 48),
    "decode_step": (AttentionSpec(causal=True), 1),
}


@pytest.mark.skipif(not GPU, reason="sdpa/flex/flash/cudnn on a GPU: needs a CUDA GPU")
@pytest.mark.parametrize("case", list(SPECS))
@pytest.mark.parametrize("backend", ["sdpa", "flex", "flash", "cudnn"])
def test_each_gpu_backend_equals_math_on_the_same_inputs(backend, case):
    if backend == "flash":
        pytest.importorskip("flash_attn", reason="flash-attn is not installed")
    g = torch.Generator().manual_seed(0)
    spec, q_len = SPECS[case]
    kv_len = 64
    if spec is None:
        segments = (torch.arange(kv_len) >= 23).long() + (torch.arange(kv_len) >= 50).long()
        spec = AttentionSpec(causal=True, segments=torch.stack([segments, segments.roll(5)]).cuda())
    q = torch.randn(2, 8, q_len, 64, generator=g).cuda().bfloat16()
    k, v = (torch.randn(2, 4, kv_len, 64, generator=g).cuda().bfloat16() for _ in range(2))
    mask = dense_mask(spec, q_len, kv_len, q.device)
    want = math_attention(q, k, v, mask).float()
    chosen = get_backend(backend)
    got = chosen.attend(q, k, v, chosen.prepare(spec, q_len, kv_len, q.device)).float()
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
