"""YOCO trains under TP2, TP2+SP, FSDP2, DDP2, TP2×FSDP2 and PP2 (cut where the global K,V is
made, and inside the cross-decoder: the stage boundary carries hidden, K, V), also PP2×TP2+SP,
and with a gated-retention self-decoder (chunks of 8 over 32 positions) under TP2+SP, PP2 and
TP2×FSDP2 — also saved under PP2 after 2 steps and resumed under TP2+SP — with the losses of an independent single-process loop to 1e-5 (the global K/V projections and
the cross-decoder's query heads are sharded by head under TP)."""

from __future__ import annotations

import dataclasses
import tempfile

import pytest

from models.attention.layer import AttentionConfig
from models.ffn.swiglu import SwiGLUConfig
from models.retention import RetentionConfig
from models.yoco import CrossAttentionConfig, YocoConfig
from tests.parallel.launch import launches_by_world
from tests.parallel.test_parity import check_ranks
from pretrain.checkpoint import CheckpointManager
from pretrain.parallel.config import ParallelConfig
from tests.parallel.workloads import SEED, ParallelTraining, reference_run, train_layouts

STEPS = 4
YOCO = YocoConfig(
    vocab_size=256, d_model=64, n_layers=4, max_seq_len=32, mixer=AttentionConfig(n_heads=4, n_kv_heads=2, window=8),
    cross=CrossAttentionConfig(n_heads=4, n_kv_heads=2), ffn=SwiGLUConfig(d_ff=128),
)
# 6 blocks, 2 in the self-decoder: two pipeline stages of 3 cut inside the cross-decoder.
YOCO6 = dataclasses.replace(YOCO, n_layers=6, self_layers=2)
RETENTION = dataclasses.replace(YOCO6, mixer=RetentionConfig(n_heads=4, chunk_size=8))
CONFIGS = {"yoco": YOCO, "yoco6": YOCO6, "retention": RETENTION}
LAYOUTS = {
    2: {"tp2": (dict(tp=2, sp=False), 2), "tp2_sp": (dict(tp=2, sp=True), 2), "fsdp2": (dict(), 2),
        "ddp2": (dict(dp_replicate=2, dp_shard=1), 2), "pp2_at_kv": (dict(pp=2, pp_schedule="1f1b"), 2),
        "pp2_in_cross": (dict(pp=2, pp_schedule="1f1b"), 2, "yoco6"),
        "retention_tp2_sp": (dict(tp=2, sp=True), 2, "retention"),
        "retention_pp2": (dict(pp=2, pp_schedule="1f1b"), 2, "retention")},
    4: {"tp2_fsdp2": (dict(tp=2), 2), "pp2_tp2_sp_in_cross": (dict(pp=2, tp=2, sp=True), 1, "yoco6"),
        "retention_tp2_fsdp2": (dict(tp=2), 2, "retention")},
}
CASES = [(world, name) for world, layouts in LAYOUTS.items() for name in layouts]


RESUMED = "retention_pp2_resumed_tp2_sp"


def save_then_resume(world: int, directory: str) -> list:
    first = ParallelTraining(world, ParallelConfig(pp=2, pp_schedule="1f1b"), 2, model_config=RETENTION)
    history = [first.step(step) for step in range(2)]
    manager = CheckpointManager(directory, seed=SEED)
    path = manager.save(2, first.parts.parts, first.optimizers, {"step": 2})
    second = ParallelTraining(world, ParallelConfig(tp=2, sp=True), 2, model_config=RETENTION)
    manager.load(path, second.parts.parts, second.optimizers)
    return history + [second.step(step) for step in range(2, STEPS)]


def train(rank: int, world: int, directory: str) -> dict:
    results = {}
    for name, (fields, micro, *config) in LAYOUTS[world].items():
        model = CONFIGS[config[0] if config else "yoco"]
        results.update(train_layouts(rank, world, {name: (fields, micro)}, STEPS, model_config=model))
    if world == 2:
        results[RESUMED] = save_then_resume(world, directory)
    return results


@pytest.fixture(scope="module")
def reference():
    histories = {name: reference_run(STEPS, micro=2, model_config=config) for name, config in CONFIGS.items()}
    for history in histories.values():
        assert history[-1][0] < history[0][0] - 0.05, history
    return histories


@pytest.fixture(scope="module")
def launched():
    with tempfile.TemporaryDirectory() as directory:
        yield launches_by_world(train, directory)


@pytest.mark.parametrize("world, name", CASES, ids=[name for _, name in CASES])
def test_yoco_layout_matches_one_process(world, name, reference, launched):
    config = LAYOUTS[world][name][2] if len(LAYOUTS[world][name]) > 2 else "yoco"
    check_ranks([result[name] for result in launched(world)], reference[config])


def test_retention_yoco_saved_under_pp2_resumes_under_tp2_sp(reference, launched):
    check_ranks([result[RESUMED] for result in launched(2)], reference["retention"])
