"""Layout validation (every violation named, all at once, before anything is built), degree
resolution, and the pipeline split rules."""

from __future__ import annotations

import dataclasses

import pytest

from pretrain.parallel.config import ParallelConfig
from pretrain.parallel.mesh import LayoutError, ParallelDims, check_layout
from pretrain.parallel.pipeline import local_stage_ids, stage_layer_counts
from tests.parallel.workloads import TINY, variant


def check(world: int, global_batch: int = 8, micro_batch: int = 1, seq_len: int = 32, model=TINY, **fields):
    return check_layout(
        ParallelConfig(**fields), model, world, global_batch=global_batch, micro_batch=micro_batch, seq_len=seq_len
    )


def test_dp_shard_takes_the_rest_of_the_world():
    dims = check(16, global_batch=16, pp=2, tp=2, dp_replicate=2)
    assert (dims.pp, dims.dp_replicate, dims.dp_shard, dims.tp, dims.dp) == (2, 2, 2, 2, 4)
    assert dims.fsdp and not dims.ddp and dims.sp


@pytest.mark.parametrize(
    "fields, fsdp, ddp",
    [
        (dict(dp_replicate=4, dp_shard=1), False, True),
        (dict(dp_shard=4), True, False),
        (dict(dp_replicate=2, dp_shard=2), True, False),
        (dict(dp_replicate=2, dp_shard=1, tp=2), True, False),  # DDP cannot hold DTensors: FSDP2 replicates
        (dict(dp_shard=1, tp=4), False, False),
    ],
)
def test_data_parallel_flavour(fields, fsdp, ddp):
    dims = ParallelDims.resolve(ParallelConfig(**fields), 4)
    assert (dims.fsdp, dims.ddp) == (fsdp, ddp)


@pytest.mark.parametrize(
    "world, fields, kwargs, message",
    [
        (8, dict(tp=3), {}, "8 rank(s) cannot be split into parallel.pp x dp_replicate x tp x cp = 1 x 1 x 3 x 1 = 3 times"),
        (4, dict(dp_shard=3), {}, "parallel.pp x dp_replicate x dp_shard x cp x tp = 1 x 1 x 3 x 1 x 1 = 3; the product must"),
        (2, dict(tp=2), dict(model=dataclasses.replace(TINY, vocab_size=255)), "model.vocab_size (255) must be"),
        (8, dict(tp=8), {}, "model.mixer.n_kv_heads (2) must be divisible by parallel.tp (8)"),
        (2, dict(tp=2), dict(seq_len=33), "data.seq_len (33) must be divisible by parallel.tp (2)"),
        (2, dict(pp=2, virtual_stages=4, pp_schedule="interleaved_1f1b"), {}, "the model's 4 blocks must be at least"),
        (2, dict(pp=2, pp_stage_layers=[1, 2]), {}, "parallel.pp_stage_layers [1, 2] must list 2 stages"),
        (4, dict(), dict(global_batch=6), "train.global_batch (6) must be a multiple of train.micro_batch (1)"),
        (2, dict(pp=2), dict(global_batch=1), "needs at least pp=2 micro-batches per step, got 1"),
        (2, dict(pp=2, pp_schedule="gpipe", virtual_stages=2), {}, "runs one stage per rank"),
        (2, dict(pp=2, pp_schedule="zbv"), {}, "zbv needs parallel.virtual_stages=2"),
        (2, dict(pp=2), dict(model=dataclasses.replace(TINY, tie_embeddings=True)), "tie_embeddings cannot be used"),
        (2, dict(dp_shard=0), {}, "parallel.dp_shard must be >= 1, or -1"),
        (2, dict(pp=2, pp_schedule="zbv", virtual_stages=2, compile=True), {}, "which compiled blocks cannot do"),
        (2, dict(tp=2, sp=False, compile=True), {}, "parallel.compile=true with parallel.tp > 1 needs parallel.sp=true"),
    ],
)
def test_each_violation_is_named(world, fields, kwargs, message):
    with pytest.raises(LayoutError) as error:
        check(world, **fields, **kwargs)
    assert message in str(error.value)


def test_all_violations_are_reported_together():
    with pytest.raises(LayoutError) as error:
        check(8, global_batch=5, seq_len=31, model=variant(TINY, ffn={"d_ff": 130}), tp=4, dp_shard=2)
    text = str(error.value)
    for part in ("model.ffn.d_ff (130)", "data.seq_len (31)", "train.global_batch (5)", "model.mixer.n_kv_heads (2)"):
        assert part in text, text


def test_even_split_gives_the_remainder_to_the_middle():
    """The documented rule, over every split up to 12 stages: sizes differ by at most one; a stage
    nearer the middle never has fewer blocks than one nearer an end; between two stages equally
    near the middle the earlier one gets the extra block."""
    for stages in range(1, 13):
        for layers in range(stages, 4 * stages + 1):
            counts = stage_layer_counts(layers, stages)
            assert sum(counts) == layers and max(counts) - min(counts) <= 1, (layers, counts)
            depth = [min(s, stages - 1 - s) for s in range(stages)]
            for a in range(stages):
                for b in range(a + 1, stages):
                    if depth[a] > depth[b] or depth[a] == depth[b]:
                        assert counts[a] >= counts[b], (layers, counts)
                    else:
                        assert counts[a] <= counts[b], (layers, counts)


def test_explicit_split_wins():
    assert stage_layer_counts(8, 3, [2, 4, 2]) == [2, 4, 2]


def test_stage_placement():
    assert [local_stage_ids(r, 2, 2, "interleaved_1f1b") for r in range(2)] == [[0, 2], [1, 3]]
    assert [local_stage_ids(r, 4, 2, "zbv") for r in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]
    assert [local_stage_ids(r, 2, 1, "1f1b") for r in range(2)] == [[0], [1]]
