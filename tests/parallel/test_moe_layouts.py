"""An MoE decoder (a dense first block, routed experts with a capacity, a shared expert) trained
under tensor parallelism (with and without sequence parallelism), FSDP2 and a 2-stage pipeline
equals one process: losses, gradient norms and the routing metrics.

The reference is the plain single-process loop of tests/parallel/workloads.py with each MoE
layer's auxiliary-loss weight set by hand to the micro-batch's share of the global batch."""

from __future__ import annotations

import dataclasses

import pytest

from models.ffn.moe import MoEConfig
from models.ffn.moe.layer import RoutedExperts
from tests.parallel.launch import run_ranks
from tests.parallel.workloads import TINY, ParallelTraining, decoder_loss, reference_run
from pretrain.parallel.config import ParallelConfig

MOE = dataclasses.replace(
    TINY,
    ffn=MoEConfig(
        n_experts=4, top_k=2, d_ff=32, n_shared_experts=1, first_dense_layers=1, dense_d_ff=128,
        capacity_factor=1.0, aux_loss_coef=0.05, z_loss_coef=0.01,
    ),
)
STEPS, MICRO = 3, 2
LAYOUTS = {
    "tp2": (dict(tp=2, sp=False), MICRO),
    "tp2_sp": (dict(tp=2, sp=True), MICRO),
    "fsdp2": (dict(), MICRO),
    "pp2_1f1b": (dict(pp=2, pp_schedule="1f1b"), MICRO),
}


def moe_loss(model, mb, tokens, share):
    for module in model.modules():
        if isinstance(module, RoutedExperts):
            module.aux_loss_scale = share
    return decoder_loss(model, mb, tokens, share)


def train(rank: int, world: int) -> dict:
    results = {}
    for name, (fields, micro) in LAYOUTS.items():
        training = ParallelTraining(world, ParallelConfig(**fields), micro, model_config=MOE)
        history = [training.step(step) for step in range(STEPS)]
        results[name] = (history, training.runner.module_metrics())
    return results


@pytest.fixture(scope="module")
def trained():
    return run_ranks(2, train)


@pytest.fixture(scope="module")
def expected():
    return reference_run(STEPS, MICRO, model_config=MOE, step_loss=moe_loss)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_moe_layout_matches_one_process(name, trained, expected):
    for per_rank in trained:
        history, metrics = per_rank[name]
        for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(history, expected)):
            assert loss == pytest.approx(ref_loss, abs=1e-5), f"step {step + 1}"
            assert norm == pytest.approx(ref_norm, rel=1e-4), f"step {step + 1}"
        # the blocks after the dense first one report their routing (every stage's, on every rank)
        assert sorted({key.split("/")[0] for key in metrics}) == [f"layers.{i}.ffn.routed" for i in (1, 2, 3)]
        assert all(metrics[f"layers.{i}.ffn.routed/max_load"] >= 1.0 for i in (1, 2, 3))
    first, second = (per_rank[name][1] for per_rank in trained)
    assert first == pytest.approx(second)  # the statistics were summed over the same ranks


def test_layouts_report_the_same_routing(trained):
    """The last step's routing statistics (loads, drops, loss terms) of every layout are those of
    the same model on the same global batch."""
    reference = trained[0]["fsdp2"][1]
    assert max(reference[f"layers.{i}.ffn.routed/dropped"] for i in (1, 2, 3)) > 0  # the capacity binds
    for name in LAYOUTS:
        assert trained[0][name][1] == pytest.approx(reference, rel=1e-5, abs=1e-7), name
