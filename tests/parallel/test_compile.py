"""torch.compile per block composes with TP+SP, recomputation, FSDP2 and pipeline schedules (not
the zero-bubble ones: validation refuses them). On CPU the graphs are traced with the ``aot_eager`` backend (no code
generation: inductor's C++ compile costs about a minute); with a GPU, inductor itself runs."""

from __future__ import annotations

import pytest
import torch

from models.spec import build_model
from pretrain.parallel.compile import apply_compile
from tests.parallel.launch import run_ranks
from tests.parallel.workloads import TINY, global_batch, reference_run, train_layouts

STEPS = 2
TRACED = dict(compile=True, compile_backend="aot_eager")
LAYOUTS = {
    "tp2_sp_op": (dict(tp=2, **TRACED), 2, "op"),
    "tp2_sp_selective": (dict(tp=2, **TRACED), 2, "selective"),
    "fsdp2_full": (dict(**TRACED), 2, "full"),
    "pp2_interleaved_selective": (
        dict(pp=2, pp_schedule="interleaved_1f1b", virtual_stages=2, **TRACED), 2, "selective"
    ),
}


@pytest.fixture(scope="module")
def trained():
    return run_ranks(2, train_layouts, LAYOUTS, STEPS)[0]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_compiled_layouts_match_one_process(name, trained):
    reference = reference_run(STEPS, micro=2)
    for step, ((loss, _), (ref_loss, _)) in enumerate(zip(trained[name], reference, strict=True)):
        assert loss == pytest.approx(ref_loss, abs=1e-5), f"step {step + 1}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor's GPU kernels need a CUDA device")
def test_inductor_on_gpu_matches_eager():
    batch = {k: v.cuda() for k, v in global_batch(0).items()}
    outputs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_model(TINY).cuda()
        if compiled:
            apply_compile(model)
        logits = model(batch["input_ids"], position_ids=batch["position_ids"], doc_ids=batch["doc_ids"])
        logits.float().logsumexp(-1).mean().backward()
        outputs.append((logits.detach(), [p.grad for p in model.parameters()]))
    (eager, eager_grads), (fused, fused_grads) = outputs
    torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-4)
    for a, b in zip(fused_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
