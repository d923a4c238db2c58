"""An MoE decoder (a dense first block, routed experts with a capacity, a shared expert) trained
under tensor parallelism (with and without sequence parallelism), FSDP2, a 2-stage pipeline and
activation recomputation (full, and the selective ``op`` policy) equals one process: losses, gradient norms and the routing metrics. A DeepSeek-style decoder
(sigmoid_bias, group-limited, aux-loss-free bias) trained under FSDP2, saved, and resumed under
TP2+SP equals one process that updates the bias by hand, and its bias comes back bit-exactly.

The reference is the plain single-process loop of tests/parallel/workloads.py with each MoE
layer's auxiliary-loss weight set by hand to the micro-batch's share of the global batch."""

from __future__ import annotations

import dataclasses
import tempfile

import pytest
import torch

from models.ffn.moe import MoEConfig
from models.ffn.moe.layer import RoutedExperts
from pretrain.checkpoint import CheckpointManager
from pretrain.names import clean_key
from pretrain.parallel.config import ParallelConfig
from tests.parallel.launch import run_ranks
from tests.parallel.workloads import GLOBAL_BATCH, SEED, TINY, ParallelTraining, decoder_loss, reference_run

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
    "fsdp2_full_recompute": (dict(), MICRO, "full"),
    "tp2_sp_op_recompute": (dict(tp=2, sp=True), MICRO, "op"),
}


def moe_loss(model, mb, tokens, share):
    for module in model.modules():
        if isinstance(module, RoutedExperts):
            module.aux_loss_scale = share
    return decoder_loss(model, mb, tokens, share)


def train(rank: int, world: int) -> dict:
    results = {}
    for name, (fields, micro, *recompute) in LAYOUTS.items():
        training = ParallelTraining(world, ParallelConfig(**fields), micro, *recompute, model_config=MOE)
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
    the same model on the same global batch (recomputed forwards count twice: ratios unchanged)."""
    reference = trained[0]["fsdp2"][1]
    assert max(reference[f"layers.{i}.ffn.routed/dropped"] for i in (1, 2, 3)) > 0  # the capacity binds
    for name in LAYOUTS:
        assert trained[0][name][1] == pytest.approx(reference, rel=1e-5, abs=1e-7), name


# ----------------------------------------------------------------------------- aux-loss-free bias

BIASED = dataclasses.replace(
    TINY,
    ffn=MoEConfig(
        n_experts=4, top_k=2, d_ff=32, router="sigmoid_bias", n_groups=2, topk_groups=1, bias_update_rate=0.01,
        aux_loss_coef=0.0, z_loss_coef=0.01,
    ),
)


def biased_reference(steps: int, config=BIASED) -> tuple[list, list[dict]]:
    """One process; before each step's first micro-batch, the previous step's post-step hook
    (the loads of all its micro-batches; one rank: no reduction). Returns the history and the
    biases after each step's update."""
    biases: list[dict] = []
    calls = [0]

    def step_loss(model, mb, tokens, share):
        routed = {clean_key(n): m for n, m in model.named_modules() if isinstance(m, RoutedExperts)}
        if calls[0] and calls[0] % (GLOBAL_BATCH // MICRO) == 0:
            for module in routed.values():
                module.post_step(lambda t, op="sum": t)
            biases.append({n: m.router.bias.clone() for n, m in routed.items() if hasattr(m.router, "bias")})
        calls[0] += 1
        return moe_loss(model, mb, tokens, share)

    return reference_run(steps, MICRO, model_config=config, step_loss=step_loss), biases


def _biases(training: ParallelTraining) -> dict:
    return {
        clean_key(name).removesuffix(".router.bias"): buffer.clone()
        for part in training.parts.parts
        for name, buffer in part.named_buffers()
        if name.endswith("router.bias")
    }


def save_then_resume(rank: int, world: int, directory: str) -> dict:
    first = ParallelTraining(world, ParallelConfig(), MICRO, model_config=BIASED)
    history = [first.step(step) for step in range(3)]
    manager = CheckpointManager(directory, seed=SEED)
    path = manager.save(3, first.parts.parts, first.optimizers, {"step": 3})
    second = ParallelTraining(world, ParallelConfig(tp=2, sp=True), MICRO, model_config=BIASED)
    fresh = _biases(second)
    manager.load(path, second.parts.parts, second.optimizers)
    restored = _biases(second)
    history += [second.step(step) for step in range(3, 5)]
    return {"history": history, "fresh": fresh, "restored": restored, "metrics": second.runner.module_metrics()}


def test_aux_loss_free_bias_under_fsdp_then_resumed_under_tp_equals_one_process():
    history, biases = biased_reference(6)  # step 6's first forward applies step 5's update
    with tempfile.TemporaryDirectory() as directory:
        results = run_ranks(2, save_then_resume, directory)
    assert any(float(b.abs().max()) > 0 for b in biases[2].values())
    for result in results:
        for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(result["history"], history[:5])):
            assert loss == pytest.approx(ref_loss, abs=1e-5), f"step {step + 1}"
            assert norm == pytest.approx(ref_norm, rel=1e-4), f"step {step + 1}"
        assert all(float(b.abs().max()) == 0 for b in result["fresh"].values())
        assert result["restored"].keys() == biases[2].keys() and len(biases[2]) == BIASED.n_layers
        for name, bias in result["restored"].items():
            assert torch.equal(bias, biases[2][name]), name  # the bias after 3 updates, bit-exact
        for i in range(4):
            key = f"layers.{i}.ffn.routed/bias_range"
            final = biases[4][f"layers.{i}.ffn.routed"]
            assert result["metrics"][key] == pytest.approx(float(final.max() - final.min()))


# ----------------------------------------------------------------------------- compete and hash under TP

ROUTERS = {
    "compete": dataclasses.replace(
        TINY, ffn=MoEConfig(n_experts=4, top_k=2, d_ff=32, router="compete", compete_every=2, aux_loss_coef=0.05)
    ),
    "hash": dataclasses.replace(
        TINY,
        ffn=MoEConfig(n_experts=4, top_k=1, d_ff=32, router="hash", hash_vocab_size=TINY.vocab_size, aux_loss_coef=0, z_loss_coef=0),
    ),
}


def train_routers(rank: int, world: int) -> dict:
    results = {}
    for name, config in ROUTERS.items():
        training = ParallelTraining(world, ParallelConfig(tp=2, sp=True), MICRO, model_config=config)
        results[name] = [training.step(step) for step in range(3)]
    training = ParallelTraining(world, ParallelConfig(pp=2, pp_schedule="1f1b"), MICRO, model_config=ROUTERS["hash"])
    results["hash_pp2"] = [training.step(step) for step in range(3)]
    return results


def test_compete_and_hash_routers_under_tp2_sp_equal_one_process():
    """compete: steps 1 and 3 run the competition (every expert on every token, replicated
    DTensor experts), step 2 the router; hash: the token ids reach the experts through the
    forward context on every TP rank, and on the second stage of a pipeline (PP2)."""
    results = run_ranks(2, train_routers)
    for name, config in [*ROUTERS.items(), ("hash_pp2", ROUTERS["hash"])]:
        history, _ = biased_reference(3, config)
        for per_rank in results:
            for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(per_rank[name], history)):
                assert loss == pytest.approx(ref_loss, abs=1e-5), f"{name} step {step + 1}"
                assert norm == pytest.approx(ref_norm, rel=1e-4), f"{name} step {step + 1}"
