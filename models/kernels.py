"""The kernel switch (``model.kernels``): which implementation computes the norms, the gated
FFN product, the rotary embedding and the loss head.

    model:
      kernels: {norm: compile, swiglu: compile, rope: torch, loss: chunked}

- ``norm`` (RMSNorm), ``swiglu`` (silu(gate)·up of the SwiGLU FFN), ``rope`` (rotary embedding
  of q and k): ``torch`` (default; the lean autograd Functions of models/norm.py and
  models/ffn/swiglu.py, plain ops for RoPE), ``compile`` (the plain ops through torch.compile:
  one fused kernel per call, any device), ``liger`` (liger-kernel's Triton kernels: CUDA GPUs).
  Tensor-parallel DTensor activations always take the plain ops.
- ``loss``: ``torch`` (default) — the head writes [tokens, vocab] logits and models/loss.py
  takes the cross entropy; ``chunked`` — the head GEMM and the loss fused in chunks of tokens,
  pure torch, any device (models/fused_loss.py); ``liger`` — liger-kernel's fused linear cross
  entropy (Triton: CUDA GPUs with liger-kernel installed).

A fused loss needs the labels in the model's forward: the family passes ``labels`` and
``loss_mask`` (models/causal_lm.py) and the model returns per-token loss contributions instead of
logits (see models/fused_loss.py for the layout). A forward without labels (generation) still
returns logits.

- ``attention``: one backend for every attention layer of the model, whatever its family
  (decoder self-attention, windowed or not; YOCO's cross-decoder; the encdec encoder, decoder and
  cross-attention): ``sdpa``, ``flex``, ``flash`` (flash-attn), ``cudnn`` (torch SDPA restricted
  to cuDNN) or ``math`` (models/attention/backends.py). Unset (default): each layer keeps its own
  configured backend (``model.mixer.backend`` and layer overrides, ``model.cross.backend``,
  encdec's ``model.backend``). Set, it overrides them all; :func:`attention_overrides` names the
  per-layer settings it overrides (the run's banner prints them).

An implementation that cannot run here (liger without CUDA or without the package) is refused
with an error that says what is missing and which choice runs instead.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch

from models.fused_loss import linear_cross_entropy

LOSS_KERNELS = ("torch", "chunked", "liger")
OP_KERNELS = ("torch", "compile", "liger")
ATTENTION_KERNELS = ("sdpa", "flex", "flash", "cudnn", "math")


@dataclass
class KernelsConfig:
    norm: str = "torch"
    swiglu: str = "torch"
    rope: str = "torch"
    loss: str = "torch"
    attention: str | None = None

    def problems(self, prefix: str = "model.kernels") -> list[str]:
        errors = []
        for name in ("norm", "swiglu", "rope"):
            if getattr(self, name) not in OP_KERNELS:
                errors.append(f"{prefix}.{name} {getattr(self, name)!r} is unknown; choose one of {list(OP_KERNELS)}")
        if self.loss not in LOSS_KERNELS:
            errors.append(f"{prefix}.loss {self.loss!r} is unknown; choose one of {list(LOSS_KERNELS)}")
        if self.attention is not None and self.attention not in ATTENTION_KERNELS:
            errors.append(
                f"{prefix}.attention {self.attention!r} is unknown; choose one of {list(ATTENTION_KERNELS)} "
                "(or leave it unset for each layer's own backend)"
            )
        return errors

    @property
    def fused_loss(self) -> bool:
        return self.loss != "torch"


def apply_kernels(model: torch.nn.Module, kernels: KernelsConfig) -> None:
    """Point every module that declares a ``kernel_slot`` (``"norm"``, ``"swiglu"``, ``"rope"``)
    at the implementation ``kernels`` chooses for it (its ``kernel`` attribute), and, with
    ``kernels.attention`` set, every attention layer (a module with an attention ``backend``) at
    that backend."""
    from models.attention.backends import AttentionBackend, get_backend

    for module in model.modules():
        slot = getattr(module, "kernel_slot", None)
        if slot is not None:
            module.kernel = getattr(kernels, slot)
        if kernels.attention is not None and isinstance(getattr(module, "backend", None), AttentionBackend):
            module.backend = get_backend(kernels.attention)


def attention_overrides(model_config) -> list[str]:
    """The per-layer attention backends (``model...backend=<name>``) that ``model.kernels.attention``
    overrides because they differ from it; empty when it is unset."""
    from models.configtree import to_dict

    tree = to_dict(model_config)
    chosen = tree.get("kernels", {}).get("attention")
    if chosen is None:
        return []
    found = []

    def walk(node, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "backend" and isinstance(value, str) and value != chosen:
                    found.append(f"{path}.backend={value}")
                elif key != "kernels":
                    walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")

    walk(tree, "model")
    return found


@functools.cache
def compiled(fn):
    """``torch.compile(fn, dynamic=True)``, made on first use (importing the compiler is slow)."""
    return torch.compile(fn, dynamic=True)


def liger_function(name: str, device: torch.device, key: str):
    """liger-kernel's functional ``name`` (liger_kernel.transformers.functional), or an error
    saying why it cannot run here and what runs instead (``key``: the config key)."""
    problem = liger_refusal(device)
    if problem is not None:
        raise RuntimeError(f"{key}=liger cannot run: {problem}; use {key}=torch or {key}=compile")
    from liger_kernel.transformers import functional

    return getattr(functional, name)


def liger_refusal(device: torch.device) -> str | None:
    """Why liger-kernel cannot run on ``device`` (None when it can)."""
    if device.type != "cuda":
        return f"liger-kernel's Triton kernels need a CUDA GPU, and this model runs on {device.type}"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install liger-kernel)"
    return None


def head_loss(
    kind: str,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor | None,
    z_loss: float,
) -> torch.Tensor:
    """Per-token loss contributions [B, S, 3] of the fused head ``kind`` (models/fused_loss.py)."""
    if kind == "chunked":
        return linear_cross_entropy(hidden, weight, labels, loss_mask, z_loss)
    if kind == "liger":
        return _liger_head_loss(hidden, weight, labels, loss_mask, z_loss)
    raise ValueError(f"model.kernels.loss={kind!r} is not a fused loss; choose one of {list(LOSS_KERNELS[1:])}")


def _liger_head_loss(hidden, weight, labels, loss_mask, z_loss: float) -> torch.Tensor:
    problem = liger_refusal(hidden.device)
    if problem is not None:
        raise RuntimeError(f"model.kernels.loss=liger cannot run: {problem}; use model.kernels.loss=chunked")
    from torch.distributed.tensor import DTensor

    if isinstance(weight, DTensor):
        raise NotImplementedError(
            "model.kernels.loss=liger does not take a vocabulary-sharded head (parallel.tp > 1); "
            "use model.kernels.loss=chunked"
        )
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    targets = labels if loss_mask is None else labels.masked_fill(loss_mask == 0, -100)
    result = liger_fused_linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), ignore_index=-100,
        lse_square_scale=z_loss, reduction="sum", return_z_loss=True,
    )
    total, z = (result.loss, result.z_loss) if hasattr(result, "loss") else result  # 0.8: an output object
    # The three sums spread evenly over the tokens: the same layout and the same sums (and the
    # first column's gradient is the same for every token, as the loss sums it).
    tokens = labels.numel()
    z = total.new_zeros(()) if z is None else z.detach()
    sums = torch.stack([total, total.detach() - z, z]).float() / tokens
    return sums.expand(*labels.shape, 3)
