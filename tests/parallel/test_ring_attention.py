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
from pretrain.parallel.context.ring import RingPlan, block_masks, ring_attention
from pretrain.parallel.context.zigzag import causal_pairs, shard_sequence, zigzag_positions
from tests.parallel.launch import run_ranks

B, H, HKV, S, D = 2, 4, 2, 48, 8
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


def ring_case(rank: int, world: int, case: dict, seed: int):
    q, k, v, weight, docs = inputs(seed)
    index = zigzag_positions(S, world, rank)
    local = [t.index_select(2, index).clone().requires_grad_() for t in (q, k, v)]
    positions = [zigzag_positions(S, world, j) for j in range(world)]
    segments = [docs.index_select(1, p) for p in positions] if case.get("documents") else None
    masks = block_masks(positions, rank, case["causal"], case.get("window"), segments)
    plan = RingPlan(
        dist.group.WORLD, rank, world, (rank - 1) % world, (rank + 1) % world, tuple(masks),
        tuple(bool(m.any()) for m in masks), None,
    )
    out = ring_attention(*local, plan)
    (out * weight.index_select(2, index)).sum().backward()
    return out.detach(), *(t.grad for t in local)


def run(rank: int, world: int) -> dict:
    return {name: ring_case(rank, world, case, seed) for seed, (name, case) in enumerate(CASES.items())}


@pytest.fixture(scope="module")
def launched():
    return {world: run_ranks(world, run) for world in (2, 4)}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", list(CASES))
def test_ring_attention_equals_one_process(world, name, launched):
    expected = reference(CASES[name], list(CASES).index(name))
    for rank, result in enumerate(launched[world]):
        index = zigzag_positions(S, world, rank)
        for got, want, what in zip(result[name], expected, ("out", "dq", "dk", "dv")):
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
