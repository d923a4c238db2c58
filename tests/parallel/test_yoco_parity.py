"""YOCO trains under TP2, TP2+SP, FSDP2, DDP2 and TP2×FSDP2 with the losses of an independent
single-process loop to 1e-5 (the global K/V projections and the cross-decoder's query heads are
sharded by head under TP)."""

from __future__ import annotations

import pytest

from models.attention.layer import AttentionConfig
from models.ffn.swiglu import SwiGLUConfig
from models.yoco import CrossAttentionConfig, YocoConfig
from tests.parallel.launch import run_ranks
from tests.parallel.test_parity import check
from tests.parallel.workloads import reference_run, train_layouts

STEPS = 4
YOCO = YocoConfig(
    vocab_size=256, d_model=64, n_layers=4, max_seq_len=32, mixer=AttentionConfig(n_heads=4, n_kv_heads=2, window=8),
    cross=CrossAttentionConfig(n_heads=4, n_kv_heads=2), ffn=SwiGLUConfig(d_ff=128),
)
LAYOUTS = {
    2: {"tp2": (dict(tp=2, sp=False), 2), "tp2_sp": (dict(tp=2, sp=True), 2), "fsdp2": (dict(), 2),
        "ddp2": (dict(dp_replicate=2, dp_shard=1), 2)},
    4: {"tp2_fsdp2": (dict(tp=2), 2)},
}
CASES = [(world, name) for world, layouts in LAYOUTS.items() for name in layouts]


def train(rank: int, world: int) -> dict:
    return train_layouts(rank, world, LAYOUTS[world], STEPS, model_config=YOCO)


@pytest.fixture(scope="module")
def reference():
    history = reference_run(STEPS, micro=2, model_config=YOCO)
    assert history[-1][0] < history[0][0] - 0.05, history
    return history


@pytest.fixture(scope="module")
def launched():
    cache = {}

    def results(world: int) -> list[dict]:
        if world not in cache:
            cache[world] = run_ranks(world, train)
        return cache[world]

    return results


@pytest.mark.parametrize("world, name", CASES, ids=[name for _, name in CASES])
def test_yoco_layout_matches_one_process(world, name, reference, launched):
    per_rank = [result[name] for result in launched(world)]
    assert all(history == per_rank[0] for history in per_rank), "ranks disagree on the reported loss"
    check(per_rank[0], reference)
