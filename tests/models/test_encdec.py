"""The encdec family against independent references: T5's bucket table (../shared/REFERENCES.md
§5) and transformers' own bucket function, HF ``T5ForConditionalGeneration`` logits and greedy
generation after conversion both ways (also through save_pretrained files), packed examples
against each example alone, and cached decoding against the full forward."""

from __future__ import annotations

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration
from transformers.models.t5.modeling_t5 import T5Attention as HFT5Attention

from models.encdec import EncDecConfig
from models.encdec.generate import generate
from models.encdec.hf import T5_ADAPTER
from models.encdec.position import relative_bucket
from models.ffn.gated import GatedGELUConfig, ReLUConfig
from models.ffn.matformer.config import MatFormerConfig
from models.ffn.moe.config import MoEConfig
from models.ffn.swiglu import SwiGLUConfig
from models.spec import build_model, hf_adapter


def test_buckets_match_the_reference_table():
    offsets = torch.tensor([-200, -64, -16, -8, -7, -1, 0, 1, 7, 8, 16, 64, 127])
    assert relative_bucket(offsets, True).tolist() == [15, 14, 10, 8, 7, 1, 0, 17, 23, 24, 26, 30, 31]
    causal = torch.tensor([-16, -32, -64, -127, -128, -1000, 0, 1, 5, 300])
    assert relative_bucket(causal, False).tolist() == [16, 21, 26, 31, 31, 31, 0, 0, 0, 0]


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("buckets,distance", [(32, 128), (16, 64), (64, 300)])
def test_buckets_match_transformers(bidirectional, buckets, distance):
    offsets = torch.arange(-1000, 1001)
    theirs = HFT5Attention._relative_position_bucket(offsets, bidirectional, buckets, distance)
    assert torch.equal(relative_bucket(offsets, bidirectional, buckets, distance), theirs)


def _config(**overrides) -> EncDecConfig:
    fields = dict(vocab_size=211, d_model=48, encoder_layers=2, decoder_layers=3, n_heads=4, max_seq_len=300,
                  max_target_len=40, backend="math", ffn=GatedGELUConfig(d_ff=80))
    fields.update(overrides)
    return EncDecConfig(**fields)


def _perturb_norms(model):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)


SHAPES = [
    dict(),  # v1.1: gated-GELU, untied head
    dict(ffn=ReLUConfig(d_ff=64), tie_embeddings=True),  # the original T5: ReLU, tied and scaled head
    dict(head_dim=16, n_heads=6, relative_buckets=16, relative_max_distance=40),  # d_kv·heads != d_model
    dict(encoder_layers=1, decoder_layers=1, ffn=GatedGELUConfig(d_ff=32), tie_embeddings=True),
]


@pytest.mark.parametrize("overrides", SHAPES)
@pytest.mark.parametrize("lengths", [(150, 9), (7, 30)])
def test_logits_match_transformers_both_ways(overrides, lengths):
    torch.manual_seed(0)
    model = build_model(_config(**overrides)).eval()
    _perturb_norms(model)
    assert hf_adapter(model.config) is T5_ADAPTER
    hf = T5_ADAPTER.to_hf_model(model)
    inputs = torch.randint(0, 211, (2, lengths[0]))
    decoder = torch.randint(0, 211, (2, lengths[1]))
    with torch.no_grad():
        ours = model(inputs, decoder_input_ids=decoder)
        theirs = hf(input_ids=inputs, decoder_input_ids=decoder).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)

    back = T5_ADAPTER.from_hf_model(hf, backend="sdpa", max_seq_len=300, max_target_len=40).eval()  # other backend
    assert back.config == EncDecConfig(**{**model.config.__dict__, "backend": "sdpa"})
    with torch.no_grad():
        torch.testing.assert_close(back(inputs, decoder_input_ids=decoder), theirs, rtol=0, atol=1e-5)


def test_a_random_transformers_model_converts_and_files_round_trip(tmp_path):
    torch.manual_seed(1)
    hf_config = T5Config(vocab_size=150, d_model=40, d_kv=10, d_ff=72, num_layers=2, num_decoder_layers=2,
                         num_heads=4, feed_forward_proj="gated-gelu", decoder_start_token_id=0, dropout_rate=0.0,
                         tie_word_embeddings=False)
    hf_config.tie_word_embeddings = False
    hf = T5ForConditionalGeneration(hf_config).eval()
    hf.set_input_embeddings(hf.shared)  # untied, a random HF T5 draws separate stack embeddings; checkpoints share one
    model = T5_ADAPTER.from_hf_model(hf).eval()
    assert not model.config.tie_embeddings
    inputs, decoder = torch.randint(0, 150, (3, 20)), torch.randint(0, 150, (3, 6))
    with torch.no_grad():
        expected = hf(input_ids=inputs, decoder_input_ids=decoder).logits
        torch.testing.assert_close(model(inputs, decoder_input_ids=decoder), expected, rtol=0, atol=1e-5)
    T5_ADAPTER.to_hf_model(model).save_pretrained(tmp_path)
    loaded = T5ForConditionalGeneration.from_pretrained(tmp_path, local_files_only=True).eval()
    assert loaded.lm_head.weight.data_ptr() != loaded.shared.weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=inputs, decoder_input_ids=decoder).logits, expected, rtol=0,
                                   atol=1e-5)


@pytest.mark.parametrize("overrides", [SHAPES[0], SHAPES[1]])
def test_greedy_generation_equals_transformers(overrides):
    torch.manual_seed(2)
    model = build_model(_config(**overrides)).eval()
    with torch.no_grad():  # weights far from init, so that greedy decoding does not settle on one token
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    hf = T5_ADAPTER.to_hf_model(model)
    inputs = torch.randint(2, 211, (3, 25))
    ours = generate(model, inputs, max_new_tokens=20)
    theirs = hf.generate(input_ids=inputs, max_new_tokens=20, do_sample=False, num_beams=1, eos_token_id=None,
                         pad_token_id=0, decoder_start_token_id=0, use_cache=False)  # HF's cache needs equal stacks
    assert torch.equal(ours, theirs)
    assert ours.shape == (3, 21) and len(set(ours[:, 1:].flatten().tolist())) > 3  # not a degenerate repeat


@pytest.mark.parametrize("position", ["relative", "rope"])
def test_cached_decoding_equals_the_full_forward(position):
    torch.manual_seed(3)
    model = build_model(_config(position=position, backend="sdpa")).eval()
    inputs, decoder = torch.randint(0, 211, (2, 17)), torch.randint(0, 211, (2, 12))
    with torch.no_grad():
        full = model(inputs, decoder_input_ids=decoder)
        memory = model.encode(inputs)
        state = model.new_decode_state(2, 12, torch.float32, "cpu")
        steps = [model.decode(decoder[:, :5], memory, state=state)]
        steps += [model.decode(decoder[:, i : i + 1], memory, state=state) for i in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)
    cross = [v for k, v in state.layers.items() if isinstance(k, tuple)]
    assert len(cross) == 3 and all(c.keys.shape == (2, 4, 17, 12) for c in cross)


@pytest.mark.parametrize("position", ["relative", "rope"])
@pytest.mark.parametrize("ffn", [GatedGELUConfig(d_ff=80), SwiGLUConfig(d_ff=64), MoEConfig(n_experts=4, top_k=2, d_ff=32),
                                 MatFormerConfig(d_ff=64, granularities=[32, 64])], ids=lambda f: f.kind)
def test_packed_examples_equal_each_example_alone(position, ffn):
    torch.manual_seed(4)
    model = build_model(_config(position=position, backend="sdpa", ffn=ffn)).eval()
    enc_lengths, dec_lengths = [11, 5, 8], [4, 7, 3]
    encs = [torch.randint(0, 211, (1, n)) for n in enc_lengths]
    decs = [torch.randint(0, 211, (1, n)) for n in dec_lengths]

    def packed(lengths, pad):
        ids = torch.cat([torch.full((n,), i + 1) for i, n in enumerate(lengths)] + [torch.zeros(pad, dtype=torch.long)])
        positions = torch.cat([torch.arange(n) for n in lengths] + [torch.arange(pad)])
        return ids[None], positions[None]

    enc_ids, enc_pos = packed(enc_lengths, 3)
    dec_ids, dec_pos = packed(dec_lengths, 2)
    with torch.no_grad():
        logits = model(torch.cat([*encs, torch.zeros(1, 3, dtype=torch.long)], 1),
                       decoder_input_ids=torch.cat([*decs, torch.zeros(1, 2, dtype=torch.long)], 1),
                       position_ids=enc_pos, doc_ids=enc_ids, decoder_position_ids=dec_pos, decoder_doc_ids=dec_ids)
        alone = torch.cat([model(e, decoder_input_ids=d) for e, d in zip(encs, decs)], dim=1)
    torch.testing.assert_close(logits[:, : sum(dec_lengths)], alone, rtol=0, atol=1e-5)


def test_configs_transformers_cannot_hold_are_refused():
    with pytest.raises(ValueError, match="rope"):
        T5_ADAPTER.config_to_hf(_config(position="rope"))
    with pytest.raises(ValueError, match="swiglu"):
        T5_ADAPTER.tensor_map(_config(ffn=SwiGLUConfig(d_ff=64)))
    with pytest.raises(ValueError, match="relative_buckets"):
        _config(relative_buckets=31).validate()


@pytest.mark.parametrize("ffn", [GatedGELUConfig(d_ff=80), SwiGLUConfig(d_ff=64), MoEConfig(n_experts=4, top_k=2, d_ff=32),
                                 MatFormerConfig(d_ff=64, granularities=[32, 64])], ids=lambda f: f.kind)
def test_in_place_residuals_give_the_out_of_place_bits_and_gradients(ffn, monkeypatch):
    """The blocks add each residual into the sublayer's output (models/encdec/layers.py
    ``residual``); with every FFN kind autograd accepts that and the loss and every gradient equal
    those of ``x + branch``."""
    import models.encdec.layers as layers

    def loss_and_grads():
        torch.manual_seed(5)
        model = build_model(_config(backend="sdpa", ffn=ffn))
        inputs, decoder = torch.randint(0, 211, (2, 17)), torch.randint(0, 211, (2, 12))
        loss = model(inputs, decoder_input_ids=decoder).logsumexp(-1).mean()
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = loss_and_grads()
    monkeypatch.setattr(layers, "residual", lambda x, branch: x + branch)
    ref_loss, ref_grads = loss_and_grads()
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        assert torch.equal(grad, ref_grads[name]), name
