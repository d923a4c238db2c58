"""What context parallelism refuses, with errors that name the fix: layouts (sequence not cut
into 2·cp chunks, SP chunks, heads for the all-to-all) and models whose config declares what cp
cannot compute (a recurrent mixer, an encoder-decoder, an MoE capacity), both at the layout
check; at the first forward, should a model get there: mixers that are not attention, attention
with an additive bias, cross-attention segments or a KV cache."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch import nn

from models.attention.spec import AttentionSpec, AttentionSpecError
from models.config import LayerOverride, MixerConfig
from models.ffn.moe import MoEConfig
from models.retention import RetentionConfig
from models.linear import Linear
from models.spec import KindSpec, build_model, registered
from pretrain.parallel.config import ParallelConfig
from pretrain.parallel.context.apply import ContextParallelAttention, apply_cp
from pretrain.parallel.mesh import LayoutError, build_mesh, check_layout, layout_errors
from tests.parallel.launch import run_ranks
from tests.parallel.test_encdec_parity import ENCDEC
from tests.parallel.test_yoco_parity import YOCO
from tests.parallel.workloads import TINY, variant


WIDE = variant(TINY, mixer=dict(n_heads=8, n_kv_heads=8))


def errors(seq_len: int, model=TINY, world: int = 8, **fields) -> list[str]:
    return layout_errors(ParallelConfig(**fields), model, world, global_batch=8, micro_batch=1, seq_len=seq_len)[1]


def test_layout_errors_name_the_problem():
    assert errors(32, cp=4, dp_shard=-1) == []
    assert any("divisible by 2 x parallel.cp = 8" in e for e in errors(36, cp=4))
    assert errors(32, WIDE, cp=2, tp=4, dp_shard=1) == []  # chunks of 16 positions, 4 per SP rank
    sp = "data.seq_len / parallel.cp (12) must be divisible by parallel.tp (8)"
    assert errors(24, WIDE, 16, cp=2, tp=8, dp_shard=1) == [sp + " with sequence parallelism; change data.seq_len or set parallel.sp=false"]
    alltoall = errors(32, cp=4, cp_mode="alltoall", dp_shard=2)
    assert any("model.mixer.n_kv_heads (2) must be divisible by parallel.tp x parallel.cp = 4" in e for e in alltoall)
    assert not any("n_heads (4)" in e for e in alltoall)  # 4 query heads split over cp=4
    assert any("x cp = 1 x 1 x 1 x 3" in e for e in errors(32, cp=3, dp_shard=-1))
    assert any("parallel.cp must be >= 1" in e for e in errors(32, cp=0))


def refusal(model, **fields) -> list[str]:
    """The lines of the LayoutError that the layout check raises for ``model`` under CP2."""
    with pytest.raises(LayoutError) as raised:
        check_layout(ParallelConfig(cp=2, **fields), model, 2, global_batch=8, micro_batch=1, seq_len=32)
    return str(raised.value).splitlines()[1:]


def test_layout_check_refuses_what_the_model_cannot_split():
    """Each model context parallelism cannot compute is refused by the layout check (before any
    process group or model exists), in one line that names the fix; the same model and layout
    without cp passes."""
    retention = RetentionConfig(n_heads=4, chunk_size=8)
    capacity = MoEConfig(n_experts=4, top_k=2, d_ff=32, capacity_factor=1.25)
    override = LayerOverride(layers="1:", mixer=dataclasses.asdict(retention))
    cases = {
        "yoco retention": (
            dataclasses.replace(YOCO, mixer=retention), "model.mixer (kind retention) carries a recurrent state"
        ),
        "decoder override": (
            dataclasses.replace(TINY, layer_overrides=[override]),
            "model.layer_overrides[0].mixer (kind retention) carries a recurrent state",
        ),
        "encdec relative": (ENCDEC, "model.family encdec: T5's relative position bias"),
        "encdec rope": (
            dataclasses.replace(ENCDEC, position="rope"), "model.family encdec: the decoder's cross-attention"
        ),
        "moe capacity": (dataclasses.replace(TINY, ffn=capacity), "model.ffn.capacity_factor (1.25) would drop tokens"),
        "unknown mixer": (dataclasses.replace(TINY, mixer=CumsumConfig()), "model.mixer (kind cumsum) does not declare"),
    }
    for name, (model, start) in cases.items():
        lines = refusal(model, dp_shard=1)
        assert len(lines) == 1 and lines[0].startswith("  - " + start), (name, lines)
        assert lines[0].endswith("parallel.cp=1"), (name, lines)
        assert layout_errors(ParallelConfig(dp_shard=2), model, 2, global_batch=8, micro_batch=1, seq_len=32)[1] == []
    assert errors(32, dataclasses.replace(TINY, ffn=dataclasses.replace(capacity, capacity_factor=None)), cp=2) == []
    assert errors(32, YOCO, cp=2) == []


@dataclasses.dataclass
class CumsumConfig(MixerConfig):
    kind: str = "cumsum"


class CumulativeMean(nn.Module):
    """A mixer carrying state along the sequence without attention: the running mean of a
    projection (what a recurrent mixer like gated retention shares with it)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.proj = Linear(d_model, d_model)

    def init_weights(self, init_std, out_std):
        nn.init.normal_(self.proj.weight, std=init_std)

    def forward(self, x, ctx):
        steps = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)[None, :, None]
        return self.proj(x).cumsum(1) / steps


def refusals(rank: int, world: int) -> dict:
    dims = check_layout(ParallelConfig(cp=2, dp_shard=1), TINY, world, global_batch=8, micro_batch=1, seq_len=32)
    mesh = build_mesh(dims, "cpu")
    found = {}
    with registered(mixers=(KindSpec("cumsum", CumsumConfig, lambda c, d, i: CumulativeMean(d)),)):
        model = build_model(dataclasses.replace(TINY, mixer=CumsumConfig()))
    try:
        apply_cp(model, mesh["cp"], "ring")
    except AttentionSpecError as error:
        found["mixer"] = str(error)
    model = build_model(TINY)
    apply_cp(model, mesh["cp"], "ring")
    backend = model.layers["0"].mixer.backend
    assert isinstance(backend, ContextParallelAttention)
    segments = torch.zeros(1, 16, dtype=torch.long)
    specs = {
        "bias": (AttentionSpec(causal=False, bias=torch.zeros(1, 1, 16, 16)), 16, 16),
        "cross": (AttentionSpec(causal=False, q_segments=segments, k_segments=segments), 16, 16),
        "cache": (AttentionSpec(), 1, 16),
    }
    for name, (spec, q_len, kv_len) in specs.items():
        try:
            backend.prepare(spec, q_len, kv_len, torch.device("cpu"))
        except AttentionSpecError as error:
            found[name] = str(error)
    dist.barrier()
    return found


def test_refusals_name_the_fix():
    found = run_ranks(2, refusals)[0]
    assert "layers.0: its mixer (CumulativeMean) is not attention" in found["mixer"]
    assert "parallel.cp=1" in found["mixer"]
    assert "additive bias" in found["bias"] and "set parallel.cp=1" in found["bias"]
    assert "query/key segments" in found["cross"]
    assert "KV cache" in found["cache"]


def test_1b_long_preset_is_the_1b_model_with_a_longer_context():
    """configs/1b-long.yaml: the 1b model (same parameters) with 64k positions by RoPE position
    interpolation (16 x the 1b preset's 4096), its sequence cut over cp=8; its layout fits 2 and
    8 nodes of 8 ranks (the zigzag chunks and the global batch divide)."""
    from pretrain.config import load_config, validate

    long, base = load_config("1b-long"), load_config("1b")
    assert long.data.seq_len == long.model.max_seq_len == base.model.max_seq_len * long.model.rope_interpolation
    assert 32768 <= long.data.seq_len <= 131072
    same = dataclasses.replace(long.model, max_seq_len=base.model.max_seq_len, rope_interpolation=1.0)
    assert same == base.model
    for world in (16, 64):
        validate(long, world)
    dims = check_layout(long.parallel, long.model, 16, global_batch=long.train.global_batch,
                        micro_batch=long.train.micro_batch, seq_len=long.data.seq_len)
    assert (dims.cp, dims.dp_shard, dims.fsdp) == (8, 2, True)
