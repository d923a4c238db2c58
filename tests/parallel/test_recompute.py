"""Recomputation never changes results: the gradients of every mode (all blocks or every k-th)
equal those without it, and training under TP+SP and PP with recomputation keeps the losses of
one process."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from models.loss import language_model_loss
from models.spec import build_model
from pretrain.parallel.recompute import RECOMPUTE_MODES, RecomputedKernel, apply_ac
from tests.parallel.launch import run_ranks
from tests.parallel.test_parity import STEPS
from tests.parallel.workloads import TINY, global_batch, reference_run, train_layouts, variant


def gradients(mode: str, every: int, backend: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(variant(TINY, mixer={"backend": backend}))
    apply_ac(model, mode, every)
    batch = global_batch(0)
    logits = model(batch["input_ids"], position_ids=batch["position_ids"], doc_ids=batch["doc_ids"])
    loss, _ = language_model_loss(logits, batch["labels"], batch["loss_mask"])
    loss.backward()
    return {name.replace("._checkpoint_wrapped_module", ""): p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize("mode", [m for m in RECOMPUTE_MODES if m != "none"])
def test_gradients_unchanged(mode, every, backend):
    plain = gradients("none", 1, backend)
    recomputed = gradients(mode, every, backend)
    assert plain.keys() == recomputed.keys()
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-6, atol=1e-9, msg=name)


def test_every_kth_block_and_checkpoint_keys():
    model = build_model(TINY)  # 4 blocks
    plain_keys = set(get_model_state_dict(model))
    apply_ac(model, "full", every=2)
    assert [key for key, block in model.layers.items() if isinstance(block, CheckpointWrapper)] == ["0", "2"]
    assert set(get_model_state_dict(model)) == plain_keys  # checkpoints do not see the wrappers
    model = build_model(TINY)
    apply_ac(model, "selective", every=3)
    assert [key for key, b in model.layers.items() if isinstance(b.mixer.backend, RecomputedKernel)] == ["0", "3"]
    with pytest.raises(ValueError, match="unknown recompute mode"):
        apply_ac(model, "some")


LAYOUTS = {
    "tp2_sp_selective": (dict(tp=2), 2, "selective"),
    "tp2_sp_op": (dict(tp=2), 2, "op"),
    "tp2_op": (dict(tp=2, sp=False), 2, "op"),
    "tp2_sp_full_every2": (dict(tp=2), 2, "full", 2),
    "pp2_1f1b_full": (dict(pp=2, pp_schedule="1f1b"), 2, "full"),
    "fsdp2_op": (dict(), 2, "op"),
}


@pytest.fixture(scope="module")
def trained():
    return run_ranks(2, train_layouts, LAYOUTS, STEPS)[0]


@pytest.fixture(scope="module")
def reference():
    return reference_run(STEPS, micro=2)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_training_with_recomputation_matches_one_process(name, trained, reference):
    for step, ((loss, _), (ref_loss, _)) in enumerate(zip(trained[name], reference, strict=True)):
        assert loss == pytest.approx(ref_loss, abs=1e-5), f"step {step + 1}"
