"""The vocab-parallel loss (logits sharded over the vocabulary on 2 ranks) equals
models.loss.language_model_loss on the whole logits — value and gradient, with the z-loss and
masked positions."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from torch.distributed.tensor.parallel import loss_parallel

from models.loss import language_model_loss
from tests.parallel.launch import run_ranks


def compare(rank: int, world: int, z_loss: float) -> dict:
    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 16, 64, generator=g)).requires_grad_()
    labels = torch.randint(0, 64, (2, 16), generator=g)
    mask = (torch.rand(2, 16, generator=g) > 0.3).long()
    expected, _ = language_model_loss(logits, labels, mask, z_loss=z_loss, normalizer=40.0)
    expected.backward()
    sharded = distribute_tensor(logits.detach(), mesh, [Shard(2)]).requires_grad_()
    with loss_parallel():
        loss, metrics = language_model_loss(sharded, labels, mask, z_loss=z_loss, normalizer=40.0)
        loss.backward()
    return {
        "loss": (float(loss), float(expected)),
        "grad": (sharded.grad.full_tensor(), logits.grad),
        "local_vocab": sharded.to_local().shape[-1],
    }


@pytest.mark.parametrize("z_loss", [0.0, 0.1])
def test_vocab_parallel_loss_equals_the_plain_one(z_loss):
    for result in run_ranks(2, compare, z_loss):
        assert result["local_vocab"] == 32
        loss, expected = result["loss"]
        assert loss == pytest.approx(expected, rel=1e-6)
        torch.testing.assert_close(*result["grad"], rtol=1e-5, atol=1e-7)
