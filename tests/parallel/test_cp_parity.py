"""Context parallelism trains like one process: CP2 and CP4 (ring), the all-to-all option, and CP
combined with TP2(+SP) and with FSDP2, for 5 steps on packed documents (full causal attention
and a sliding window), each with the losses and gradient norms of an independent
single-process loop (tests/parallel/workloads.py)."""

from __future__ import annotations

import pytest

from tests.parallel.launch import launches_by_world
from tests.parallel.test_parity import check_ranks
from tests.parallel.workloads import TINY, reference_run, train_layouts, variant

STEPS = 5
CONFIGS = {
    "causal": TINY,
    "window": variant(TINY, mixer=dict(window=6)),
    "kv4": variant(TINY, mixer=dict(n_heads=4, n_kv_heads=4)),
}
LAYOUTS = {
    2: {
        "cp2": (dict(cp=2, dp_shard=1), 2, "causal"),
        "cp2_window": (dict(cp=2, dp_shard=1), 2, "window"),
        "cp2_alltoall": (dict(cp=2, dp_shard=1, cp_mode="alltoall"), 2, "causal"),
        "cp2_alltoall_window": (dict(cp=2, dp_shard=1, cp_mode="alltoall"), 2, "window"),
    },
    4: {
        "cp4": (dict(cp=4, dp_shard=1), 2, "causal"),
        "cp4_window": (dict(cp=4, dp_shard=1), 2, "window"),
        "cp4_alltoall": (dict(cp=4, dp_shard=1, cp_mode="alltoall"), 2, "kv4"),
        "cp2_tp2": (dict(cp=2, tp=2, sp=False), 2, "causal"),
        "cp2_tp2_sp": (dict(cp=2, tp=2, sp=True), 2, "window"),
        "cp2_fsdp2": (dict(cp=2, dp_shard=2), 2, "causal"),
        "cp2_fsdp2_alltoall": (dict(cp=2, dp_shard=2, cp_mode="alltoall"), 1, "window"),
    },
}
CASES = [(world, name) for world, layouts in LAYOUTS.items() for name in layouts]


def train(rank: int, world: int) -> dict:
    results = {}
    for name, (fields, micro, config) in LAYOUTS[world].items():
        results.update(train_layouts(rank, world, {name: (fields, micro)}, STEPS, model_config=CONFIGS[config]))
    return results


@pytest.fixture(scope="module")
def reference():
    return {name: reference_run(STEPS, micro=2, model_config=config) for name, config in CONFIGS.items()}


@pytest.fixture(scope="module")
def launched():
    return launches_by_world(train)


@pytest.mark.parametrize("world, name", CASES, ids=[name for _, name in CASES])
def test_context_parallel_matches_one_process(world, name, reference, launched):
    check_ranks([result[name] for result in launched(world)], reference[LAYOUTS[world][name][2]])
