"""The encoder-decoder's lean biased attention (models/encdec/attention.py) against independent
references: the explicit fp32 attention of models/attention/backends.py (outputs and the
gradients of q, k, v and the bias), and a whole model's loss gradients against transformers'
``T5ForConditionalGeneration`` (eager attention) after conversion (1e-5 of each gradient's
largest entry)."""

from __future__ import annotations

import pytest
import torch

from models.attention.backends import math_attention
from models.attention.spec import AttentionSpec, dense_mask
from models.encdec import EncDecConfig
from models.encdec.attention import BiasedPlan, EncDecSDPA
from models.encdec.hf import T5_ADAPTER
from models.ffn.gated import GatedGELUConfig, ReLUConfig
from models.spec import build_model


def _leaves(*shapes, generator):
    return [torch.randn(*shape, generator=generator, ).requires_grad_() for shape in shapes]


@pytest.mark.parametrize("causal, packed, scale", [(False, False, 1.0), (True, True, 1.0), (False, True, None),
                                                    (True, False, 0.3)])
def test_biased_kernel_equals_explicit_attention(causal, packed, scale):
    g = torch.Generator().manual_seed(0)
    batch, heads, seq, dim = 3, 4, 19, 8
    q, k, v, bias = _leaves((batch, heads, seq, dim), (batch, heads, seq, dim), (batch, heads, seq, dim),
                            (1, heads, seq, seq), generator=g)
    segments = torch.tensor([[1] * 7 + [2] * 10 + [0] * 2, [1] * 19, [1] * 3 + [2] * 3 + [3] * 13]) if packed else None
    spec = AttentionSpec(causal=causal, scale=scale, bias=bias, segments=segments)
    plan = EncDecSDPA().prepare(spec, seq, seq, torch.device("cpu"))
    assert isinstance(plan, BiasedPlan)
    ours = EncDecSDPA().attend(q, k, v, plan)
    reference = math_attention(q, k, v, dense_mask(spec, seq, seq, q.device), bias, scale)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    weights = torch.randn(ours.shape, generator=g)
    grads = torch.autograd.grad((ours * weights).sum(), (q, k, v, bias))
    expected = torch.autograd.grad((reference * weights).sum(), (q, k, v, bias))
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_cross_attention_and_rows_without_keys_keep_torch_sdpa():
    bias = torch.zeros(1, 2, 4, 6)
    segments = torch.tensor([[1, 1, 2, 0]]), torch.tensor([[1, 1, 1, 2, 2, 2]])
    cross = AttentionSpec(causal=False, scale=1.0, q_segments=segments[0], k_segments=segments[1])
    assert not isinstance(EncDecSDPA().prepare(cross, 4, 6, torch.device("cpu")), BiasedPlan)
    plain = AttentionSpec(causal=True, scale=1.0)
    assert not isinstance(EncDecSDPA().prepare(plain, 4, 4, torch.device("cpu")), BiasedPlan)
    biased = AttentionSpec(causal=False, scale=1.0, bias=bias)
    assert isinstance(EncDecSDPA().prepare(biased, 4, 6, torch.device("cpu")), BiasedPlan)


@pytest.mark.parametrize("ffn, tied", [(GatedGELUConfig(d_ff=80), False), (ReLUConfig(d_ff=64), True)])
def test_gradients_match_transformers(ffn, tied):
    torch.manual_seed(0)
    config = EncDecConfig(vocab_size=211, d_model=48, encoder_layers=2, decoder_layers=3, n_heads=4, max_seq_len=300,
                          max_target_len=40, backend="sdpa", ffn=ffn, tie_embeddings=tied)
    model = build_model(config)
    hf = T5_ADAPTER.to_hf_model(model).train()
    inputs, decoder = torch.randint(0, 211, (2, 70)), torch.randint(0, 211, (2, 23))
    weights = torch.randn(2, 23, 211)
    (model(inputs, decoder_input_ids=decoder) * weights).sum().backward()
    (hf(input_ids=inputs, decoder_input_ids=decoder).logits * weights).sum().backward()
    theirs = T5_ADAPTER.state_from_hf({name: p.grad for name, p in hf.named_parameters()}, config)
    ours = {name: p.grad for name, p in model.named_parameters()}
    assert ours.keys() <= theirs.keys()
    for name, grad in ours.items():
        torch.testing.assert_close(grad, theirs[name], rtol=0, atol=1e-5 * theirs[name].abs().max().item(), msg=name)
