"""Gradient-norm clipping on plain CPU gradients against an exact (math.fsum) reference."""

from __future__ import annotations

import math

import torch

from pretrain.parallel import clip
from pretrain.parallel.clip import clip_grad_norm_, global_grad_norm


def _params(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.empty(shape))
        p.grad = torch.randn(shape, generator=g) * 10
        params.append(p)
    return params


def _exact_norm(params) -> float:
    return math.sqrt(math.fsum(v * v for p in params for v in p.grad.double().flatten().tolist()))


def test_norm_over_chunked_gradients_is_the_exact_norm_and_independent_of_the_split(monkeypatch):
    monkeypatch.setattr(clip, "CPU_CHUNK", 1000)  # gradients of 3000, 2001, 7 entries: 4+3+1 chunks
    params = _params([(3, 1000), (2001,), (7,)])
    norm = global_grad_norm(params)
    assert norm.dtype == torch.float32
    assert math.isclose(norm.item(), _exact_norm(params), rel_tol=1e-7)
    whole = torch.cat([p.grad.flatten() for p in params])
    resplit = [torch.nn.Parameter(torch.empty(n)) for n in (1, 4999, 8)]
    for p, piece in zip(resplit, whole.split([1, 4999, 8])):
        p.grad = piece.clone()
    assert torch.equal(global_grad_norm(resplit), norm)
    monkeypatch.setattr(clip, "CPU_CHUNK", 1 << 16)
    assert torch.equal(global_grad_norm(params), norm)


def test_clip_scales_like_torch_and_skips_params_without_gradients():
    params = _params([(50, 40), (40,)], seed=1)
    params.append(torch.nn.Parameter(torch.empty(3)))  # no .grad
    reference = [p.grad.clone() for p in params[:2]]
    torch_params = _params([(50, 40), (40,)], seed=1)
    expected_norm = torch.nn.utils.clip_grad_norm_(torch_params, 1.0)
    exact = _exact_norm(params[:2])
    norm = clip_grad_norm_(params, 1.0)
    assert math.isclose(norm, exact, rel_tol=1e-6)
    assert math.isclose(norm, expected_norm.item(), rel_tol=1e-5)
    scale = 1.0 / (norm + 1e-6)
    for p, before in zip(params[:2], reference):
        torch.testing.assert_close(p.grad, before * scale)
    for ours, theirs in zip(params, torch_params):
        torch.testing.assert_close(ours.grad, theirs.grad)
    assert params[2].grad is None
    clipped = [p.grad.clone() for p in params[:2]]
    assert math.isclose(clip_grad_norm_(params, 0.0), _exact_norm(params[:2]), rel_tol=1e-6)  # 0: no clipping
    assert all(torch.equal(p.grad, before) for p, before in zip(params[:2], clipped))


def test_gradients_off_the_cpu_keep_the_norm_on_their_device():
    """A group of non-CPU gradients (here on the meta device, standing in for CUDA) is summed on
    its device alone: the CPU path adds nothing for it (a CPU zero would not stack with it)."""
    p = torch.nn.Parameter(torch.empty(4, 3, device="meta"))
    p.grad = torch.empty(4, 3, device="meta")
    assert global_grad_norm([p]).device.type == "meta"
