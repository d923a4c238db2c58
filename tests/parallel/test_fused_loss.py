"""The fused linear cross entropy under tensor parallelism (head weight sharded over the
vocabulary on 2 ranks; hidden states replicated, or sequence-sharded as under SP) equals the
single-process unfused loss in fp32 to 1e-6 relative, loss and gradients, with the z-loss and
masked labels; and a decoder with ``kernels.loss: chunked`` trains under TP2, TP2+SP, FSDP2, PP2
(2 ranks) and TP2×FSDP2 (4 ranks) like the independent single-process loop with the unfused loss."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from models import causal_lm
from models.fused_loss import linear_cross_entropy
from models.kernels import KernelsConfig
from models.loss import language_model_loss
from tests.parallel.launch import launches_by_world
from tests.parallel.test_parity import check_ranks
from tests.parallel.workloads import TINY, reference_run, train_layouts

STEPS = 3
FUSED = dataclasses.replace(TINY, kernels=KernelsConfig(loss="chunked"))
LAYOUTS = {  # per world size
    2: {
        "tp2": (dict(tp=2, sp=False), 2),
        "tp2_sp": (dict(tp=2, sp=True), 2),
        "fsdp2": (dict(), 2),
        "pp2": (dict(pp=2, pp_schedule="1f1b"), 2),
    },
    4: {"tp2_fsdp2": (dict(tp=2, dp_shard=2), 2)},
}
WORLD = {name: world for world, layouts in LAYOUTS.items() for name in layouts}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def vocab_parallel(rank: int, world: int) -> dict:
    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 16, 12, generator=g)
    weight = torch.randn(64, 12, generator=g)
    labels = torch.randint(0, 64, (2, 16), generator=g)
    mask = (torch.rand(2, 16, generator=g) > 0.3).long()
    labels[mask == 0] = -100
    results = {}
    for z_loss in (0.0, 0.1):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        expected, _ = language_model_loss(h @ w.t(), labels, mask, z_loss=z_loss, normalizer=20.0)
        expected.backward()
        for sp in (False, True):
            for chunk in (3, 32):
                w_tp = distribute_tensor(weight, mesh, [Shard(0)]).requires_grad_()
                if sp:
                    h_tp = distribute_tensor(hidden, mesh, [Shard(1)]).requires_grad_()
                else:
                    h_tp = hidden.clone().requires_grad_()
                out = linear_cross_entropy(h_tp, w_tp, labels, mask, z_loss, chunk)
                loss, _ = causal_lm.fused_loss(out, mask, 20.0)
                loss.backward()
                grad_h = h_tp.grad.redistribute(mesh, [Replicate()]).to_local() if sp else h_tp.grad
                results[(z_loss, sp, chunk)] = {
                    "loss": relative(loss.detach(), expected.detach()),
                    "grad_h": relative(grad_h, h.grad),
                    "grad_w": relative(w_tp.grad.full_tensor(), w.grad),
                    "local_vocab": w_tp.to_local().shape[0],
                }
    return results


def train(rank: int, world: int) -> dict:
    results = train_layouts(rank, world, LAYOUTS[world], STEPS, model_config=FUSED)
    if world == 2:
        results["vocab_parallel"] = vocab_parallel(rank, world)
    return results


@pytest.fixture(scope="module")
def launched():
    return launches_by_world(train)


@pytest.fixture(scope="module")
def reference():
    return reference_run(STEPS, micro=2)


def test_vocab_parallel_fused_loss_equals_the_unfused_one(launched):
    for result in launched(2):
        for case, errors in result["vocab_parallel"].items():
            assert errors["local_vocab"] == 32
            assert errors["loss"] < 1e-6 and errors["grad_h"] < 1e-6 and errors["grad_w"] < 1e-6, (case, errors)


@pytest.mark.parametrize("name", list(WORLD))
def test_fused_loss_layout_matches_the_unfused_single_process(name, launched, reference):
    check_ranks([result[name] for result in launched(WORLD[name])], reference)
