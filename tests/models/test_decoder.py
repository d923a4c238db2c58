"""The decoder: RoPE against a complex-number formulation, init scheme, meta-device init, tying,
pipeline-stage splitting, positions and a new mixer kind plugged in through the registry."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from models.attention.layer import AttentionConfig
from models.config import LayerOverride, MixerConfig
from models.decoder.config import DecoderConfig
from models.ffn.swiglu import SwiGLUConfig
from models.rope import apply_rope, rope_tables
from models.spec import build_model, registered
from pretrain.parallel.pipeline import split_stage, stage_layer_counts


def _config(n_heads=4, n_kv_heads=2, d_ff=48, **overrides) -> DecoderConfig:
    fields = dict(vocab_size=67, d_model=32, n_layers=3, max_seq_len=64)
    fields.update(overrides)
    return DecoderConfig(
        mixer=AttentionConfig(n_heads=n_heads, n_kv_heads=n_kv_heads), ffn=SwiGLUConfig(d_ff=d_ff), **fields
    )


def test_rope_rotates_pairs_i_and_i_plus_half_by_position_times_frequency():
    head_dim, theta = 8, 100.0
    positions = torch.tensor([[0, 1, 5, 17]])
    x = torch.randn(1, 4, 3, head_dim, dtype=torch.float64)
    cos, sin = rope_tables(positions, head_dim, theta, torch.float64)
    got = apply_rope(x, cos, sin)
    half = head_dim // 2
    freqs = torch.tensor([theta ** (-2 * i / head_dim) for i in range(half)], dtype=torch.float64)
    z = torch.complex(x[..., :half], x[..., half:])
    rotated = z * torch.polar(torch.ones(4, half, dtype=torch.float64), positions[0, :, None] * freqs)[None, :, None]
    torch.testing.assert_close(got, torch.cat([rotated.real, rotated.imag], dim=-1), atol=1e-6, rtol=1e-6)


def test_forward_shapes_and_dtypes():
    model = build_model(_config())
    tokens = torch.randint(0, 67, (2, 9))
    assert model(tokens).shape == (2, 9, 67) and model(tokens).dtype == torch.float32
    assert model.to(torch.bfloat16)(tokens).dtype == torch.bfloat16


def test_logits_depend_only_on_relative_positions():
    torch.manual_seed(0)
    model = build_model(_config())
    tokens = torch.randint(0, 67, (2, 10))
    default = model(tokens)
    torch.testing.assert_close(model(tokens, position_ids=torch.arange(10).expand(2, 10)), default, atol=0, rtol=0)
    torch.testing.assert_close(model(tokens, position_ids=torch.arange(10).expand(2, 10) + 7), default, atol=2e-5, rtol=2e-5)


def test_init_scheme_statistics():
    torch.manual_seed(0)
    config = _config(d_model=256, n_heads=8, n_kv_heads=4, d_ff=512, n_layers=8, vocab_size=2048, init_std=0.05)
    model = build_model(config)
    out_std = 0.05 / math.sqrt(2 * 8)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(param, torch.ones_like(param)), name
            continue
        std = out_std if name.endswith(("wo.weight", "w2.weight")) else 0.05
        assert abs(param.std().item() / std - 1) < 0.02, name
        assert abs(param.mean().item()) < 0.05 * std, name


@pytest.mark.parametrize("tied", [False, True])
def test_meta_device_build_then_materialise_and_init(tied):
    config = _config(tie_embeddings=tied)
    with torch.device("meta"):
        meta_model = build_model(config)
    assert all(p.is_meta for p in meta_model.parameters())
    meta_model.to_empty(device="cpu")
    torch.manual_seed(3)
    meta_model.init_weights()
    assert (meta_model.head.weight is meta_model.embed.weight) == tied

    eager = build_model(config)
    torch.manual_seed(3)
    eager.init_weights()
    for (name, a), (_, b) in zip(meta_model.state_dict().items(), eager.state_dict().items()):
        assert torch.equal(a, b), name
    tokens = torch.randint(0, 67, (1, 5))
    torch.testing.assert_close(meta_model(tokens), eager(tokens), atol=0, rtol=0)


def test_tied_head_shares_one_parameter():
    model = build_model(_config(tie_embeddings=True))
    assert model.head.weight is model.embed.weight
    assert sum(1 for name, _ in model.named_parameters() if "embed" in name or "head" in name) == 1
    tokens = torch.randint(0, 67, (1, 4))
    model(tokens).sum().backward()
    assert model.embed.weight.grad is not None


def test_stable_parameter_names():
    names = set(build_model(_config(n_layers=2)).state_dict())
    block = {"mixer_norm.weight", "mixer.wq.weight", "mixer.wk.weight", "mixer.wv.weight", "mixer.wo.weight",
             "ffn_norm.weight", "ffn.w1.weight", "ffn.w2.weight", "ffn.w3.weight"}
    expected = {"embed.weight", "norm.weight", "head.weight"} | {f"layers.{i}.{b}" for i in range(2) for b in block}
    assert names == expected


@pytest.mark.parametrize("counts", [[2, 2], [1, 3], [1, 1, 2], [1, 1, 1, 1]])
def test_pipeline_stages_compose_to_the_full_model_with_the_same_keys(counts):
    """split_stage keeps each stage's blocks (the embedding with the first, the final norm and
    head with the last); running the stages one after another equals the whole model, and their
    parameter names partition the whole model's."""
    torch.manual_seed(1)
    model = build_model(_config(n_layers=4))
    stages = [split_stage(model, s, counts) for s in range(len(counts))]
    tokens = torch.randint(0, 67, (2, 7))
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0]])
    h = tokens
    for stage in stages:
        h = stage(h, doc_ids=doc_ids)
    torch.testing.assert_close(h, model(tokens, doc_ids=doc_ids), atol=0, rtol=0)
    full = model.state_dict()
    keys = [key for stage in stages for key in stage.state_dict()]
    assert sorted(keys) == sorted(full)
    for stage in stages:
        for key, value in stage.state_dict().items():
            assert torch.equal(value, full[key]), key
    assert [len(stage.layers) for stage in stages] == counts
    assert stages[0].embed is not None and all(s.embed is None for s in stages[1:])
    assert stages[-1].head is not None and all(s.head is None and s.norm is None for s in stages[:-1])


def test_balanced_stage_counts_put_the_remainder_in_the_middle():
    """The documented rule: an even split, the remainder one block each to the stages farthest
    from both ends first (the end stages also hold the embedding and the head)."""
    for blocks, stages in ((8, 4), (9, 4), (10, 4), (11, 3), (13, 5), (7, 2)):
        counts = stage_layer_counts(blocks, stages)
        base, extra = divmod(blocks, stages)
        assert sum(counts) == blocks and sorted(set(counts)) == sorted({base, base + (extra > 0)})
        depth = [min(s, stages - 1 - s) for s in range(stages)]  # distance from the nearer end
        bigger = [s for s in range(stages) if counts[s] > base]
        smaller = [s for s in range(stages) if counts[s] == base]
        assert all(depth[b] >= depth[s] for b in bigger for s in smaller), counts
    assert stage_layer_counts(7, 2, [3, 4]) == [3, 4]


def test_sequence_longer_than_max_seq_len_is_refused():
    model = build_model(_config(max_seq_len=8))
    with pytest.raises(ValueError, match="exceeds model.max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


class ZeroMixer(nn.Module):
    def init_weights(self, init_std, out_std):
        pass

    def forward(self, x, ctx):
        return torch.zeros_like(x)


@dataclass
class ZeroConfig(MixerConfig):
    kind: str = "zero"


def test_a_new_mixer_kind_plugs_in_through_the_registry():
    """Block and the decoder take any mixer the registry builds: here a mixer that returns zeros
    on every other block makes those FFN-only residual blocks, checked against a hand-written
    forward."""
    from models.spec import KindSpec

    zero = KindSpec("zero", ZeroConfig, lambda config, d_model, layer_id: ZeroMixer())
    with registered(mixers=(zero,)):
        config = dataclasses.replace(_config(n_layers=4), layer_overrides=[LayerOverride("1::2", {"kind": "zero"})])
        model = build_model(config)
        tokens = torch.randint(0, 67, (2, 5))
        with torch.no_grad():
            h = model.embed(tokens)
            for i, block in enumerate(model.layers.values()):
                if i % 2 == 0:
                    h = h + block.mixer(block.mixer_norm(h), _context(model, tokens))
                h = h + block.ffn(block.ffn_norm(h))
            torch.testing.assert_close(model(tokens), model.head(model.norm(h)), atol=1e-6, rtol=1e-6)
        assert isinstance(model.layers["1"].mixer, ZeroMixer) and isinstance(model.layers["3"].mixer, ZeroMixer)
    with pytest.raises(Exception, match="'zero' is unknown"):
        DecoderConfig.from_dict({"family": "decoder", "mixer": "zero"})


def _context(model, tokens):
    from models.attention.layer import prepare_self_attention
    from models.context import ForwardContext

    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    return ForwardContext(
        rope={8: rope_tables(positions, 8, model.config.rope_theta, torch.float32)},
        attention=prepare_self_attention(
            [b.mixer for b in model.layers.values()], tokens.shape[1], 0, None, torch.device("cpu")
        ),
    )
