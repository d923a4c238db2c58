"""The fused linear + cross entropy (models/fused_loss.py) equals the unfused head + loss
(models/loss.py on h·Wᵀ) in fp32 to 1e-6 relative — loss, metrics and gradients — across chunk
sizes, with masked labels and the z-loss; a model with ``kernels.loss: chunked`` trains and
evaluates like the plain one; liger is refused where it cannot run and matches on a GPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from models import causal_lm
from models.decoder.config import DecoderConfig
from models.fused_loss import linear_cross_entropy
from models.kernels import KernelsConfig, head_loss
from models.loss import language_model_loss
from models.spec import LossSettings, build_model
from models.yoco import YocoConfig
from tests.parallel.workloads import TINY, global_batch


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def problem(seed: int = 0, batch: int = 2, seq: int = 37, d: int = 16, vocab: int = 50):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, d, generator=g).requires_grad_()
    weight = torch.randn(vocab, d, generator=g).requires_grad_()
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = (torch.rand(batch, seq, generator=g) > 0.3).long()
    labels[mask == 0] = -100  # masked positions may hold the ignore index
    return hidden, weight, labels, mask


@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
@pytest.mark.parametrize("chunk", [1, 5, 32, 74, 1000])
def test_fused_equals_unfused_loss_and_gradients(chunk, z_loss):
    hidden, weight, labels, mask = problem()
    normalizer = 23.0
    contributions = linear_cross_entropy(hidden, weight, labels, mask, z_loss, chunk)
    loss, metrics = causal_lm.fused_loss(contributions, mask, normalizer)
    grads = torch.autograd.grad(loss, (hidden, weight))
    expected, expected_metrics = language_model_loss(hidden @ weight.t(), labels, mask, z_loss, normalizer)
    expected_grads = torch.autograd.grad(expected, (hidden, weight))
    assert relative(loss.detach(), expected.detach()) < 1e-6
    for name in ("ce_loss", "z_loss", "loss_sum", "num_tokens"):
        torch.testing.assert_close(metrics[name], expected_metrics[name], rtol=1e-6, atol=0)
    for got, want in zip(grads, expected_grads):
        assert relative(got, want) < 1e-6


def test_without_mask_every_token_counts_and_no_grad_computes_no_gradient():
    hidden, weight, labels, _ = problem(seed=1)
    labels = labels.clamp(min=0)
    with torch.no_grad():
        contributions = linear_cross_entropy(hidden, weight, labels, chunk=8)
    assert not contributions.requires_grad
    loss, metrics = causal_lm.fused_loss(contributions, torch.ones_like(labels), None)
    expected, _ = language_model_loss(hidden.detach() @ weight.detach().t(), labels)
    assert relative(loss, expected) < 1e-6 and metrics["num_tokens"] == labels.numel()


def _pair(config, **kernels):
    torch.manual_seed(0)
    plain = build_model(config)
    fused = build_model(dataclasses.replace(config, kernels=KernelsConfig(**kernels)))
    fused.load_state_dict(plain.state_dict())
    return plain, fused


@pytest.mark.parametrize("family", ["decoder", "yoco"])
def test_a_model_with_the_chunked_loss_matches_the_plain_one(family):
    config = TINY if family == "decoder" else YocoConfig(vocab_size=256, d_model=64, n_layers=4, max_seq_len=32)
    plain, fused = _pair(config, loss="chunked")
    fused.loss_settings = LossSettings(z_loss=1e-3, fused_head=True)
    batch = global_batch(0, batch=2)
    spec_inputs = causal_lm.inputs_with_token_ids
    args, kwargs = spec_inputs(batch)
    targets = causal_lm.targets(batch)
    expected, expected_metrics = causal_lm.loss(plain(*args, **kwargs), targets, 50.0, LossSettings(z_loss=1e-3))
    expected.backward()
    out = fused(*args, **kwargs)
    assert out.shape == (*batch["labels"].shape, 3)
    loss, metrics = causal_lm.loss(out, targets, 50.0, fused.loss_settings)
    loss.backward()
    assert relative(loss.detach(), expected.detach()) < 1e-6
    torch.testing.assert_close(metrics["z_loss"], expected_metrics["z_loss"], rtol=1e-6, atol=0)
    for (name, p), q in zip(fused.named_parameters(), plain.parameters()):
        assert relative(p.grad, q.grad) < 1e-5, name
    with torch.no_grad():  # evaluation: the same loss, no gradient computed
        evaluated, _ = causal_lm.loss(fused(*args, **kwargs), targets, 50.0, fused.loss_settings)
    assert not evaluated.requires_grad and relative(evaluated, expected.detach()) < 1e-6
    # Without labels (generation) the model still returns logits.
    torch.testing.assert_close(fused(batch["input_ids"]), plain(batch["input_ids"]))


def test_unknown_loss_kernel_is_a_config_error_naming_the_key():
    with pytest.raises(ValueError, match=r"model.kernels.loss 'fast' is unknown; choose one of"):
        DecoderConfig.from_dict({"family": "decoder", "kernels": {"loss": "fast"}})
    assert DecoderConfig.from_dict({"family": "decoder", "kernels": {"loss": "chunked"}}).kernels.loss == "chunked"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_liger_is_refused_without_a_gpu():
    hidden, weight, labels, mask = problem()
    refusal = "model.kernels.loss=liger cannot run: .*CUDA GPU.*use model.kernels.loss=chunked"
    with pytest.raises(RuntimeError, match=refusal):
        head_loss("liger", hidden, weight, labels, mask, 0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="liger-kernel's Triton kernels need a CUDA GPU")
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_liger_matches_the_pure_torch_fused_loss_on_gpu(z_loss):
    pytest.importorskip("liger_kernel", reason="liger-kernel is not installed")
    hidden, weight, labels, mask = (t.cuda() for t in problem(seq=300, d=64, vocab=1000))
    hidden, weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    results = []
    for kind in ("chunked", "liger"):
        loss, metrics = causal_lm.fused_loss(head_loss(kind, hidden, weight, labels, mask, z_loss), mask, 100.0)
        results.append((loss.detach(), metrics, *torch.autograd.grad(loss, (hidden, weight))))
    (loss, metrics, *grads), (ref_loss, ref_metrics, *ref_grads) = results[1], results[0]
    assert relative(loss, ref_loss) < 1e-5
    torch.testing.assert_close(metrics["z_loss"], ref_metrics["z_loss"], rtol=1e-4, atol=1e-7)
    for got, want in zip(grads, ref_grads):
        assert relative(got, want) < 1e-4
