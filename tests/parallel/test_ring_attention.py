"""Ring attention over CP2 and CP4 (gloo) equals one process's attention over the whole sequence
(models.attention.backends.math_attention with the dense mask of the same spec) in output and in
the gradients of q, k and v: causal, packed documents, sliding windows, bidirectional, GQA. The
zigzag split gives every rank the same causal work (counted from the dense mask)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from models.attention.backends import math_attention
from models.attention.spec import AttentionSpec, dense_mask
from pretrain.parallel.context.ring import Block, RingPlan, block_masks, ring_attention
from pretrain.parallel.context.zigzag import causal_pairs, shard_sequence, zigzag_positions
from tests.parallel.launch import run_ranks

B, H, HKV, S, D = 2, 4, 2, 48, 8
KERNELS = ("auto", "explicit")  # auto = torch's fused flash kernel per block on CPU
CASES = {
    "causal": dict(causal=True),
    "documents": dict(causal=True, documents=True),
    "window": dict(causal=True, window=7),
    "window_documents": dict(causal=True, window=5, documents=True),
    "bidirectional": dict(causal=False, documents=True),
}


def inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, S, D, generator=g)
    k, v = torch.randn(B, HKV, S, D, generator=g), torch.randn(B, HKV, S, D, generator=g)
    weight = torch.randn(B, H, S, D, generator=g)
    starts = torch.rand(B, S, generator=g) < 0.1
    starts[:, 0] = True
    return q, k, v, weight, starts.long().cumsum(1) - 1


def reference(case: dict, seed: int):
    q, k, v, weight, docs = inputs(seed)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    spec = AttentionSpec(causal=case["causal"], window=case.get("window"), segments=docs if case.get("documents") else None)
    out = math_attention(q, k, v, dense_mask(spec, S, S, q.device))
    (out * weight).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def ring_case(rank: int, world: int, case: dict, seed: int, kernel: str):
    q, k, v, weight, docs = inputs(seed)
    index = zigzag_positions(S, world, rank)
    local = [t.index_select(2, index).clone().requires_grad_() for t in (q, k, v)]
    positions = [zigzag_positions(S, world, j) for j in range(world)]
    segments = [docs.index_select(1, p) for p in positions] if case.get("documents") else None
    masks = block_masks(positions, rank, case["causal"], case.get("window"), segments)
    plan = RingPlan(
        dist.group.WORLD, rank, world, (rank - 1) % world, (rank + 1) % world, tuple(Block.of(m) for m in masks), None, kernel
    )
    out = ring_attention(*local, plan)
    (out * weight.index_select(2, index)).sum().backward()
    return out.detach(), *(t.grad for t in local)


def run(rank: int, world: int) -> dict:
    return {(name, kernel): ring_case(rank, world, case, seed, kernel)
            for seed, (name, case) in enumerate(CASES.items()) for kernel in KERNELS}


@pytest.fixture(scope="module")
def launched():
    return {world: run_ranks(world, run) for world in (2, 4)}


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", list(CASES))
def test_ring_attention_equals_one_process(world, name, kernel, launched):
    expected = reference(CASES[name], list(CASES).index(name))
    for rank, result in enumerate(launched[world]):
        index = zigzag_positions(S, world, rank)
        for got, want, what in zip(result[(name, kernel)], expected, ("out", "dq", "dk", "dv")):
            torch.testing.assert_close(got, want.index_select(2, index), atol=1e-5, rtol=1e-5, msg=what)


@pytest.mark.parametrize("cp", [2, 4, 8])
def test_zigzag_gives_equal_causal_work(cp):
    seq = 64
    visible = dense_mask(AttentionSpec(causal=True), seq, seq, torch.device("cpu"))[0, 0]
    counts = [int(visible[zigzag_positions(seq, cp, r)].sum()) for r in range(cp)]
    assert counts == [causal_pairs(seq, cp, r) for r in range(cp)]
    assert len(set(counts)) == 1 and sum(counts) == seq * (seq + 1) // 2
    contiguous = [int(visible[r * seq // cp : (r + 1) * seq // cp].sum()) for r in range(cp)]
    assert len(set(contiguous)) == cp  # the plain split is unbalanced: what zigzag fixes


def test_shard_sequence_partitions_the_batch():
    batch = {"input_ids": torch.arange(24).view(2, 12), "loss_mask": torch.ones(2, 12), "dataset_id": torch.tensor([4, 5])}
    parts = [shard_sequence(batch, 3, r) for r in range(3)]
    assert all(torch.equal(p["dataset_id"], batch["dataset_id"]) for p in parts)  # per-row: kept whole
    ids = torch.cat([p["input_ids"] for p in parts], dim=1)
    assert sorted(ids[0].tolist()) == list(range(12))
    positions = torch.cat([p["position_ids"] for p in parts], dim=1)
    assert torch.equal(ids - ids[:, :1], positions)
    with pytest.raises(ValueError, match="2 x cp = 6"):
        zigzag_positions(10, 3, 0)


@pytest.mark.parametrize("cp", [2, 4])
def test_causal_zigzag_blocks_are_a_triangle_and_half_blocks(cp):
    """With chunks r and 2cp-1-r on rank r, a causal rank sees its own block as a triangle in
    local order, a lower rank's block only in that block's first chunk (every query), a higher
    rank's only from its own second chunk of queries (every key): each unmasked."""
    seq, half = 16 * cp, 8
    positions = [zigzag_positions(seq, cp, j) for j in range(cp)]
    for rank in range(cp):
        blocks = [Block.of(m) for m in block_masks(positions, rank, True, None, None)]
        for source, block in enumerate(blocks):
            if source == rank:
                assert (block.rows, block.cols, block.kind) == (slice(0, 2 * half), slice(0, 2 * half), "causal")
            elif source < rank:
                assert (block.rows, block.cols, block.kind) == (slice(0, 2 * half), slice(0, half), "full")
            else:
                assert (block.rows, block.cols, block.kind) == (slice(half, 2 * half), slice(0, 2 * half), "full")
            assert block.hidden_rows is None
        # the boxes cover exactly the visible pairs: the rank's causal work
        assert sum(int(b.mask.sum()) for b in blocks) == causal_pairs(seq, cp, rank)


def test_block_of_a_document_mask_keeps_the_mask_and_names_rows_that_see_nothing():
    mask = torch.zeros(1, 1, 4, 6, dtype=torch.bool)
    mask[0, 0, 1, 2:4] = True
    mask[0, 0, 3, 3] = True
    block = Block.of(mask)
    assert (block.rows, block.cols, block.kind) == (slice(1, 4), slice(2, 4), "masked")
    assert torch.equal(block.mask, mask[:, :, 1:4, 2:4])
    assert block.hidden_rows.flatten().tolist() == [False, True, False]
    assert Block.of(torch.zeros(1, 1, 3, 3, dtype=torch.bool)) is None
