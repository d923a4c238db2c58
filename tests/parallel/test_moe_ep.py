"""Expert parallelism (``parallel.ep``, all-to-all dispatch) equals one process: an MoE decoder
(a dense first block, 4 experts top-2 under a binding capacity, a shared expert) trained 5
steps with gradient accumulation under EP2 (also with full activation recomputation), EP4, EP2
with FSDP2 over the other two data ranks, EP2 with HSDP (2 replicas × 2 shards), EP2 × TP2
(+SP) and EP2 × PP2; a run saved under EP2
and resumed under FSDP2 without EP; and a DeepSeek-style router (sigmoid_bias, aux-loss-free
bias) under EP2.

The reference is the plain single-process loop of tests/parallel/workloads.py (each MoE layer's
auxiliary-loss weight set by hand to the micro-batch's share of the global batch)."""

from __future__ import annotations

import dataclasses
import tempfile

import pytest
from torch.distributed.tensor import DTensor, Shard

from models.ffn.moe import MoEConfig
from models.ffn.moe.experts import GroupedExperts
from pretrain.checkpoint import CheckpointManager
from pretrain.parallel.config import ParallelConfig
from pretrain.parallel.mesh import LayoutError, check_layout
from tests.parallel.launch import launches_by_world, run_ranks
from tests.parallel.test_moe_layouts import BIASED, biased_reference, moe_loss
from tests.parallel.test_parity import check_ranks
from tests.parallel.workloads import GLOBAL_BATCH, SEED, SEQ, TINY, ParallelTraining, reference_run

N_EXPERTS = 4
MOE = dataclasses.replace(
    TINY,
    ffn=MoEConfig(
        n_experts=N_EXPERTS, top_k=2, d_ff=32, n_shared_experts=1, first_dense_layers=1, dense_d_ff=128,
        capacity_factor=1.0, aux_loss_coef=0.05, z_loss_coef=0.01,
    ),
)
STEPS = 5
# world -> name -> (ParallelConfig fields, micro-batch); every layout accumulates >= 2 micro-batches
# per rank except where the world leaves one row pair per rank.
LAYOUTS = {
    2: {"ep2": (dict(ep=2), 2), "ep2_micro1": (dict(ep=2), 1), "ep2_full_recompute": (dict(ep=2), 2, "full")},
    4: {
        "ep4": (dict(ep=4), 1),
        "ep2_fsdp4": (dict(ep=2), 1),
        "ep2_tp2_sp": (dict(ep=2, tp=2, sp=True), 2),
        "ep2_pp2": (dict(ep=2, pp=2, pp_schedule="1f1b"), 2),
        "ep2_hsdp": (dict(ep=2, dp_replicate=2, dp_shard=2), 1),
    },
}


def expert_layout(training: ParallelTraining) -> dict:
    """For each expert weight: its global shape, this rank's local shape and placements."""
    return {
        name: (tuple(p.shape), tuple(p.to_local().shape), tuple(p.placements))
        for part in training.parts.parts
        for name, p in part.named_parameters()
        if ".experts." in name and isinstance(p, DTensor)
    }


def train(rank: int, world: int) -> dict:
    results = {}
    for name, (fields, micro, *recompute) in LAYOUTS[world].items():
        training = ParallelTraining(world, ParallelConfig(**fields), micro, *recompute, model_config=MOE)
        history = [training.step(step) for step in range(STEPS)]
        results[name] = (history, expert_layout(training), training.runner.module_metrics())
    return results


launched = launches_by_world(train)


@pytest.fixture(scope="module")
def references():
    return {micro: reference_run(STEPS, micro, model_config=MOE, step_loss=moe_loss) for micro in (1, 2)}


@pytest.mark.parametrize("world,name", [(w, n) for w, layouts in LAYOUTS.items() for n in layouts])
def test_expert_parallel_layout_equals_one_process(world, name, references):
    fields, micro, *_ = LAYOUTS[world][name]
    per_rank = launched(world)
    check_ranks([result[name][0] for result in per_rank], references[micro])
    ep = fields["ep"]
    for result in per_rank:
        layout = result[name][1]
        assert layout, "expert weights are DTensors"
        for key, (shape, local, placements) in layout.items():
            assert shape[0] == N_EXPERTS
            assert Shard(0) in placements, key  # the expert dimension is split over ep
            others = fields.get("tp", 1) * fields.get("pp", 1) * fields.get("dp_replicate", 1)
            fsdp = fields.get("dp_shard", world // others) // ep  # HSDP replicates over dp_replicate
            assert local[0] == N_EXPERTS // ep and local[1] == -(-shape[1] // fsdp), key
        metrics = result[name][2]
        assert sorted({k.split("/")[0] for k in metrics}) == [f"layers.{i}.ffn.routed" for i in (1, 2, 3)]


def train_biased(rank: int, world: int) -> list:
    training = ParallelTraining(world, ParallelConfig(ep=2), 2, model_config=BIASED)
    return [training.step(step) for step in range(STEPS)]


def test_aux_loss_free_bias_under_ep2_equals_one_process():
    """sigmoid_bias with group-limited routing and the bias updated from loads summed over both
    ranks (whose experts live on different ranks) equals one process updating it by hand."""
    history, biases = biased_reference(STEPS + 1)
    assert any(float(b.abs().max()) > 0 for b in biases[2].values())
    check_ranks(run_ranks(2, train_biased), history[:STEPS])


def save_then_resume(rank: int, world: int, directory: str) -> dict:
    first = ParallelTraining(world, ParallelConfig(ep=2), 2, model_config=MOE)
    history = [first.step(step) for step in range(3)]
    manager = CheckpointManager(directory, seed=SEED)
    path = manager.save(3, first.parts.parts, first.optimizers, {"step": 3})
    second = ParallelTraining(world, ParallelConfig(), 2, model_config=MOE)  # FSDP2, no EP
    manager.load(path, second.parts.parts, second.optimizers)
    history += [second.step(step) for step in range(3, STEPS)]
    return history


def test_resume_ep2_to_ep1_equals_one_process(references):
    with tempfile.TemporaryDirectory() as directory:
        per_rank = run_ranks(2, save_then_resume, directory)
    check_ranks(per_rank, references[2])


def test_layout_errors_name_the_problem():
    with pytest.raises(LayoutError, match=r"parallel.ep \(4\) must divide parallel.dp_shard \(2\)"):
        check_layout(ParallelConfig(ep=4), MOE, 2, global_batch=GLOBAL_BATCH, micro_batch=1, seq_len=SEQ)
    with pytest.raises(LayoutError, match=r"parallel.ep \(2\) must divide parallel.dp_shard \(1\)"):
        check_layout(
            ParallelConfig(ep=2, dp_replicate=2, dp_shard=1), MOE, 2, global_batch=GLOBAL_BATCH, micro_batch=1,
            seq_len=SEQ,
        )
    with pytest.raises(LayoutError, match=r"parallel.ep \(4\) must divide parallel.dp_shard x parallel.cp \(1 x 2\)"):
        check_layout(ParallelConfig(ep=4, cp=2, dp_shard=1), MOE, 2, global_batch=GLOBAL_BATCH, micro_batch=1, seq_len=SEQ)


def test_expert_modules_name_what_expert_parallelism_needs():
    assert GroupedExperts(4, 8, 16, True).ep_errors(2, "layers.1.ffn.routed.experts") == []
    (uneven,) = GroupedExperts(6, 8, 16, True).ep_errors(4, "layers.1.ffn.routed.experts")
    assert "6 experts cannot be split over parallel.ep=4" in uneven and "layers.1" in uneven
    (compete,) = GroupedExperts(4, 8, 16, True, exchangeable=False).ep_errors(2, "x")
    assert "compete" in compete
