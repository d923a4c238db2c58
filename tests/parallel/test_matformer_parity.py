"""MatFormer joint training (every width each step, weighted losses) under TP2 (+SP), PP2,
FSDP2, DDP2 and their 4-rank combinations equals an independent single-process loop to 1e-5.

The stored hidden-unit order is interleaved for TP2 (``tp_interleave=2``), so under TP every
width is a prefix of each rank's shard; the reference runs the same stored order unsharded,
narrowing each layer by hand-chosen widths via ``set_granularity``."""

from __future__ import annotations

import dataclasses

import pytest

from models.ffn.matformer import MatFormerConfig, set_granularity
from tests.parallel.launch import launches_by_world
from tests.parallel.test_parity import check_ranks
from tests.parallel.workloads import TINY, decoder_loss, reference_run, train_layouts

STEPS = 4
WIDTHS, WEIGHTS = [32, 64, 128], [1.0, 0.5, 2.0]
MATFORMER = dataclasses.replace(
    TINY, ffn=MatFormerConfig(d_ff=128, granularities=WIDTHS, loss_weights=WEIGHTS, tp_interleave=2)
)
LAYOUTS = {
    2: {
        "tp2": (dict(tp=2, sp=False), 2),
        "tp2_sp": (dict(tp=2, sp=True), 2),
        "pp2_1f1b": (dict(pp=2, pp_schedule="1f1b"), 2),
        "pp2_zbv": (dict(pp=2, pp_schedule="zbv", virtual_stages=2), 1),
        "fsdp2": (dict(), 2),
        "ddp2": (dict(dp_replicate=2, dp_shard=1), 2),
    },
    4: {
        "tp2_fsdp2": (dict(tp=2), 2),
        "pp2_tp2_sp": (dict(pp=2, tp=2, sp=True), 1),
    },
}
CASES = [(world, name) for world, layouts in LAYOUTS.items() for name in layouts]


def joint_loss(model, mb, tokens, share):
    """Σ_m λ_m · loss at width m, each width set by hand."""
    total = 0.0
    for m, weight in zip(WIDTHS, WEIGHTS):
        set_granularity(model, m)
        total = total + weight * decoder_loss(model, mb, tokens, share)[0]
    set_granularity(model, None)
    return total, total


def train(rank: int, world: int) -> dict:
    return train_layouts(rank, world, LAYOUTS[world], STEPS, model_config=MATFORMER)


@pytest.fixture(scope="module")
def reference():
    history = reference_run(STEPS, micro=2, model_config=MATFORMER, step_loss=joint_loss)
    assert history[-1][0] < history[0][0] - 0.05, history
    return history


@pytest.fixture(scope="module")
def launched():
    return launches_by_world(train)


@pytest.mark.parametrize("world, name", CASES, ids=[name for _, name in CASES])
def test_joint_training_matches_one_process(world, name, reference, launched):
    check_ranks([result[name] for result in launched(world)], reference)
