"""MatFormer joint training (every width each step, weighted losses) under TP2 (+SP), PP2,
FSDP2, DDP2 and their 4-rank combinations equals an independent single-process loop to 1e-5.

The stored hidden-unit order is interleaved for TP2 (``tp_interleave=2``), so under TP every
width is a prefix of each rank's shard; the reference runs the same stored order unsharded,
narrowing each layer by hand-chosen widths via ``set_granularity``."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from models.ffn.matformer import MatFormerConfig, set_granularity
from models.passes import train_passes
from models.spec import build_model
from pretrain.parallel.config import ParallelConfig
from pretrain.parallel.mesh import ParallelDims
from pretrain.parallel.parallelize import build_parts
from pretrain.parallel.runtime import ParallelRunner
from tests.parallel.launch import launches_by_world
from tests.parallel.test_parity import check_ranks
from tests.parallel.workloads import SEED, TINY, cut, decoder_loss, global_batch, reference_run, train_layouts

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


def test_joint_gradients_are_the_weighted_sum_of_each_widths_gradients():
    """The trainer's joint step (the runner's passes: one backward per width into the same
    gradients) against each width's gradient computed alone by autograd on a copy of the model,
    summed with the weights λ; the unweighted sum differs (the weights are applied)."""
    cpu = torch.device("cpu")
    dims = ParallelDims.resolve(ParallelConfig(), 1)
    parts = build_parts(MATFORMER, ParallelConfig(), dims, None, cpu, seed=SEED)
    runner = ParallelRunner(parts, dims, None, cpu, n_microbatches=2)
    batch = global_batch(0)
    tokens = float(batch["loss_mask"].sum())
    micro_batches = [cut(batch, 0, 4), cut(batch, 4, 4)]
    runner.forward_backward(micro_batches, tokens, train_passes(MATFORMER, 0, SEED))
    joint = {name: p.grad for name, p in parts.parts[0].named_parameters()}

    copy = build_model(MATFORMER)
    copy.load_state_dict(parts.parts[0].state_dict())
    names, params = zip(*copy.named_parameters())
    weighted = [torch.zeros_like(p) for p in params]
    unweighted = [torch.zeros_like(p) for p in params]
    for m, weight in zip(WIDTHS, WEIGHTS):
        set_granularity(copy, m)
        loss = sum(decoder_loss(copy, mb, tokens, 0.5)[0] for mb in micro_batches)
        for w, u, g in zip(weighted, unweighted, torch.autograd.grad(loss, params)):
            w.add_(g, alpha=weight)
            u.add_(g)
    for name, w, u in zip(names, weighted, unweighted):
        torch.testing.assert_close(joint[name], w, rtol=1e-5, atol=1e-8, msg=name)
    assert any((joint[name] - u).abs().max() > 1e-4 for name, u in zip(names, unweighted))
