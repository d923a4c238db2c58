"""Parameter and FLOP counts, read off the modules of a model (built on the meta device, so
nothing is allocated), and model FLOPs utilisation (MFU).

Parameters: ``total`` counts each parameter once (a tied head is the embedding); ``embedding``
is the input tables (``nn.Embedding``); ``non_embedding`` = total − embedding (so it includes an
untied head); ``active`` is what one token uses: the total minus what modules that route tokens
(mixture of experts) report as skipped per token (``inactive_params_per_token()``).

Training FLOPs per token (the convention used for MFU), forward × 3 (backward = 2 × forward):

    forward = Σ over linear layers 2·in·out            # every projection and the head, tied or not
            + Σ over modules core_flops_per_token(S)   # e.g. attention's q·kᵀ and ·v

A module reports in ``core_flops_per_token`` the forward FLOPs it does outside its linear
layers (models/attention/layer.py: causal attention counted over S/2 keys per query, a window W
over W − W²/(2S)); a module whose linear work is not done by every token (experts) reports its
``linear_flops_per_token`` instead of having its linear layers counted. Not counted: the
embedding lookup, norms, RoPE, softmax, activations, residual adds and the loss (elementwise,
O(d) per token rather than O(d²)). MFU uses these active FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode


@dataclass(frozen=True)
class ParamCounts:
    total: int
    embedding: int
    non_embedding: int
    active: int


class _SkipInPlaceFill(TorchFunctionMode):
    """Makes in-place fills (``normal_``, ``uniform_``, ...) no-ops while a model is built on the
    meta device: they have no values to write there, yet torch's meta implementations of the
    random fills cost milliseconds each, which dominated counting a large model."""

    FILLS = {"normal_", "uniform_", "fill_", "zero_", "copy_", "exponential_", "bernoulli_"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")
        if getattr(func, "__name__", "") in self.FILLS and isinstance(target, torch.Tensor) and target.is_meta:
            return target
        return func(*args, **kwargs)


def build_meta(config) -> nn.Module:
    from models.spec import build_model

    with torch.device("meta"), _SkipInPlaceFill():
        return build_model(config)


def count_params(model: nn.Module) -> ParamCounts:
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(p.numel() for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters())
    inactive = sum(m.inactive_params_per_token() for m in model.modules() if hasattr(m, "inactive_params_per_token"))
    return ParamCounts(total=total, embedding=embedding, non_embedding=total - embedding, active=total - inactive)


def forward_flops_per_token(model: nn.Module, seq_len: int) -> int:
    """Forward FLOPs per token of ``model`` at sequence length ``seq_len`` (see the module doc)."""
    skipped: set[int] = set()
    total = 0
    for module in model.modules():
        if id(module) in skipped:
            continue
        if hasattr(module, "linear_flops_per_token"):
            total += module.linear_flops_per_token()
            skipped.update(id(m) for m in module.modules() if isinstance(m, nn.Linear))
        if isinstance(module, nn.Linear):
            total += 2 * module.in_features * module.out_features
        if hasattr(module, "core_flops_per_token"):
            total += module.core_flops_per_token(seq_len)
    return total


_CACHE: dict[str, tuple[ParamCounts, dict[tuple, int]]] = {}


def _cached(config) -> tuple[ParamCounts, dict[tuple, int]]:
    key = repr(config)
    if key not in _CACHE:
        _CACHE[key] = (count_params(build_meta(config)), {})
    return _CACHE[key]


def param_counts(config) -> ParamCounts:
    return _cached(config)[0]


def training_flops_per_token(config, seq_len: int, setting=None) -> int:
    """Training (forward + backward) FLOPs per token at sequence length ``seq_len``; with a
    training pass's ``setting`` (models/passes.py), of the model run in that pass (a MatFormer
    at one of its widths)."""
    by_len = _cached(config)[1]
    key = (seq_len, repr(setting))
    if key not in by_len:
        model = build_meta(config)
        if setting is not None:
            from models.passes import select_pass

            select_pass([model], setting)
        by_len[key] = 3 * forward_flops_per_token(model, seq_len)
    return by_len[key]


# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, matched by substring of the device name,
# most specific first ("NVIDIA H100 PCIe" before "H100", which is the SXM part).
PEAK_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
}


def peak_tflops(device_name: str) -> float | None:
    for key, tflops in PEAK_TFLOPS.items():
        if key.lower() in device_name.lower():
            return tflops
    return None


def mfu(tokens_per_s: float, flops_per_token: float, device_name: str | None = None) -> float | None:
    """Fraction of one device's bf16 peak achieved by ``tokens_per_s`` (tokens per second per
    device). ``device_name`` defaults to the current CUDA device; None on CPU or for a device
    missing from PEAK_TFLOPS."""
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    peak = peak_tflops(device_name)
    if peak is None:
        return None
    return tokens_per_s * flops_per_token / (peak * 1e12)
