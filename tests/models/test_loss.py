from __future__ import annotations

import math

import pytest
import torch

from models.loss import language_model_loss, token_cross_entropy


def _reference(logits, labels, mask, z_coef=0.0):
    """Per-token −log softmax[label] and log Z² in plain Python floats, masked mean."""
    total_ce, total_z, count = 0.0, 0.0, 0.0
    for row_logits, row_labels, row_mask in zip(logits.tolist(), labels.tolist(), mask.tolist()):
        for values, label, keep in zip(row_logits, row_labels, row_mask):
            top = max(values)
            log_z = top + math.log(sum(math.exp(x - top) for x in values))
            total_ce += keep * (log_z - values[label])
            total_z += keep * log_z**2
            count += keep
    return total_ce / count, z_coef * total_z / count


def test_masked_mean_and_z_loss_match_a_plain_python_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g) * 3
    labels = torch.randint(0, 11, (2, 5), generator=g)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]])
    loss, metrics = language_model_loss(logits, labels, mask, z_loss=1e-2)
    ce, z = _reference(logits, labels, mask, 1e-2)
    assert math.isclose(metrics["ce_loss"].item(), ce, rel_tol=1e-5)
    assert math.isclose(metrics["z_loss"].item(), z, rel_tol=1e-5)
    assert math.isclose(loss.item(), ce + z, rel_tol=1e-5)
    assert metrics["num_tokens"].item() == 7
    assert math.isclose(metrics["loss_sum"].item(), ce * 7, rel_tol=1e-5)


def test_without_mask_every_position_counts_and_bf16_logits_are_upcast():
    logits = torch.randn(3, 4, 7)
    labels = torch.randint(0, 7, (3, 4))
    loss, metrics = language_model_loss(logits.bfloat16(), labels)
    ce, _ = _reference(logits.bfloat16().float(), labels, torch.ones(3, 4))
    assert loss.dtype == torch.float32 and math.isclose(loss.item(), ce, rel_tol=1e-5)
    assert metrics["num_tokens"].item() == 12 and metrics["z_loss"].item() == 0.0


def test_global_token_count_makes_micro_batch_losses_sum_to_the_global_mean():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 6, 9, generator=g)
    labels = torch.randint(0, 9, (4, 6), generator=g)
    mask = torch.ones(4, 6)
    mask[:2, 1:] = 0  # the first micro-batch keeps 2 tokens, the second 12
    whole, _ = language_model_loss(logits, labels, mask)
    total = mask.sum()
    parts = [language_model_loss(logits[s], labels[s], mask[s], normalizer=total)[0] for s in (slice(0, 2), slice(2, 4))]
    torch.testing.assert_close(parts[0] + parts[1], whole)
    means = [language_model_loss(logits[s], labels[s], mask[s])[0] for s in (slice(0, 2), slice(2, 4))]
    assert not torch.allclose((means[0] + means[1]) / 2, whole)


def test_masked_positions_get_no_gradient():
    logits = torch.randn(1, 4, 5, requires_grad=True)
    labels = torch.tensor([[1, 2, -100, 4]])
    mask = torch.tensor([[1, 0, 0, 1]])
    loss, _ = language_model_loss(logits, labels, mask, z_loss=1e-3)
    loss.backward()
    assert torch.all(logits.grad[0, 1:3] == 0)
    assert torch.all(logits.grad[0, [0, 3]].abs().sum(-1) > 0)


def test_token_cross_entropy_gradients_pass_gradcheck_across_row_blocks(monkeypatch):
    import models.loss

    monkeypatch.setattr(models.loss, "CPU_BLOCK", 40)  # 40 // 13 = 3 rows per block: 3 blocks
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(7, 13, generator=g, dtype=torch.float64) * 3).requires_grad_()
    labels = torch.randint(0, 13, (7,), generator=g)
    assert torch.autograd.gradcheck(lambda x: token_cross_entropy(x, labels), (logits,))
    ce, lse = token_cross_entropy(logits, labels)
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1))
    torch.testing.assert_close(ce, torch.nn.functional.cross_entropy(logits, labels, reduction="none"))


def test_token_cross_entropy_in_fp32_is_within_a_bound_of_fp64_beyond_one_block():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(9, 150_000, generator=g) * 4  # 6 rows per block: 2 blocks
    labels = torch.randint(0, 150_000, (9,), generator=g)
    weights = torch.rand(9, generator=g)

    def loss_and_grad(fn, x):
        x = x.clone().requires_grad_()
        per_row = fn(x)
        (per_row * weights.to(x.dtype)).sum().backward()
        return per_row.detach().double(), x.grad.double()

    exact = loss_and_grad(lambda x: torch.nn.functional.cross_entropy(x, labels, reduction="none"), logits.double())
    ours = loss_and_grad(lambda x: token_cross_entropy(x, labels)[0], logits)
    for mine, reference in zip(ours, exact):
        torch.testing.assert_close(mine, reference, rtol=2e-6, atol=2e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_token_cross_entropy_on_cuda_matches_fp64_torch_across_device_blocks(monkeypatch):
    import models.loss

    monkeypatch.setattr(models.loss, "DEVICE_BLOCK", 3 * 50_000)  # 3 rows per block on the GPU
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(10, 50_000, generator=g) * 4
    labels = torch.randint(0, 50_000, (10,), generator=g)
    weights = torch.rand(10, generator=g)
    exact = logits.double().requires_grad_()
    exact_ce = torch.nn.functional.cross_entropy(exact, labels, reduction="none")
    exact_lse = torch.logsumexp(exact, -1)
    ((exact_ce + 0.1 * exact_lse.pow(2)) * weights.double()).sum().backward()
    x = logits.cuda().requires_grad_()
    ce, lse = token_cross_entropy(x, labels.cuda())
    ((ce + 0.1 * lse.pow(2)) * weights.cuda()).sum().backward()
    for on_gpu, reference in zip((ce, lse, x.grad), (exact_ce, exact_lse, exact.grad)):
        torch.testing.assert_close(on_gpu.detach().cpu().double(), reference.detach(), rtol=2e-5, atol=2e-5)
