"""An MoE decoder with its balancing losses (the Switch loss over the batch and per sequence, the
router z-loss) trains under context parallelism like one process: the Switch loss's routing
statistics are summed over the cp ranks (each holds chunks of the same sequences), the z-loss is
a mean over positions whose share the trainer divides by cp. CP2 (ring, also with full
recomputation), CP2 all-to-all, CP2×EP2 and CP2×TP2+SP: 5 steps of losses and gradient norms,
and the first step's gradients parameter by parameter (the router's carry the balancing terms),
against the plain single-process loop with each MoE layer's auxiliary-loss weight set by hand
to the micro-batch's share of the global batch."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.distributed.tensor import DTensor

from models.ffn.moe import MoEConfig
from models.spec import build_model
from pretrain.names import clean_key
from pretrain.parallel.config import ParallelConfig
from tests.parallel.launch import launches_by_world
from tests.parallel.test_moe_layouts import moe_loss
from tests.parallel.test_parity import check_ranks
from tests.parallel.workloads import GLOBAL_BATCH, SEED, TINY, ParallelTraining, cut, global_batch, reference_run

STEPS, MICRO = 5, 2
ROUTED = MoEConfig(
    n_experts=4, top_k=2, d_ff=32, n_shared_experts=1, first_dense_layers=1, dense_d_ff=128,
    capacity_factor=None, aux_loss_coef=0.1, z_loss_coef=0.01,
)
CONFIGS = {
    "batch": dataclasses.replace(TINY, ffn=ROUTED),
    "sequence": dataclasses.replace(TINY, ffn=dataclasses.replace(ROUTED, aux_loss_scope="sequence")),
}
LAYOUTS = {
    2: {
        "cp2_batch": (dict(cp=2, dp_shard=1), "batch"),
        "cp2_alltoall_sequence": (dict(cp=2, dp_shard=1, cp_mode="alltoall"), "sequence"),
        "cp2_full_recompute_batch": (dict(cp=2, dp_shard=1), "batch", "full"),
    },
    4: {
        "cp2_ep2_batch": (dict(cp=2, dp_shard=2, ep=2), "batch"),
        "cp2_tp2_sp_sequence": (dict(cp=2, tp=2, sp=True), "sequence"),
    },
}
CASES = [(world, name) for world, layouts in LAYOUTS.items() for name in layouts]


def first_step_gradients(training: ParallelTraining) -> dict[str, torch.Tensor]:
    micro_batches, tokens = training.local_micro_batches(0)
    training.runner.forward_backward(micro_batches, tokens)
    grads = {}
    for part in training.parts.parts:
        for key, param in part.named_parameters():
            grad = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
            grads[clean_key(key)] = grad.clone()
    return grads


def train(rank: int, world: int) -> dict:
    results = {}
    for name, (fields, config, *recompute) in LAYOUTS[world].items():
        def training():
            return ParallelTraining(world, ParallelConfig(**fields), MICRO, *recompute, model_config=CONFIGS[config])

        trained = training()
        results[name] = [trained.step(step) for step in range(STEPS)]
        results[("grads", name)] = first_step_gradients(training())
    return results


def reference_gradients(config) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = build_model(config)
    model.to_empty(device="cpu")
    torch.manual_seed(SEED)
    model.init_weights()
    batch = global_batch(0)
    tokens = float(batch["loss_mask"].sum())
    for start in range(0, GLOBAL_BATCH, MICRO):
        moe_loss(model, cut(batch, start, MICRO), tokens, MICRO / GLOBAL_BATCH)[0].backward()
    return {key: param.grad for key, param in model.named_parameters()}


@pytest.fixture(scope="module")
def launched():
    return launches_by_world(train)


@pytest.mark.parametrize("world, name", CASES, ids=[name for _, name in CASES])
def test_moe_balancing_losses_under_cp_match_one_process(world, name, launched):
    config = CONFIGS[LAYOUTS[world][name][1]]
    per_rank = launched(world)
    check_ranks([result[name] for result in per_rank], reference_run(STEPS, MICRO, config, step_loss=moe_loss))
    expected = reference_gradients(config)
    assert any("router" in key for key in expected)
    for result in per_rank:
        grads = result[("grads", name)]
        assert grads.keys() == expected.keys()
        for key, want in expected.items():
            torch.testing.assert_close(grads[key], want, atol=1e-5, rtol=1e-5, msg=key)
