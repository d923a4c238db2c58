"""AdamW with decoupled weight decay groups, and the learning-rate schedules.

Weight decay applies to matrices of linear layers only; norms, biases and embeddings are not
decayed unless ``decay_embeddings`` is set (the default of GPT-NeoX, OLMo and torchtitan-style
recipes). Schedules are pure functions of the step, so a resumed run's rate is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass
class OptimConfig:
    lr: float = 3e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    decay_embeddings: bool = False

    def validate(self) -> list[str]:
        errors = []
        if self.lr <= 0:
            errors.append(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.beta1 < 1 or not 0 <= self.beta2 < 1:
            errors.append(f"optim.beta1/beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.weight_decay < 0:
            errors.append(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if self.grad_clip < 0:
            errors.append(f"optim.grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}")
        return errors


@dataclass
class ScheduleConfig:
    """``cosine``: linear warmup, cosine decay to ``min_lr_ratio``·lr at the last step.
    ``wsd``: warmup, constant, then a linear decay over the last ``decay_fraction`` of steps.
    ``constant``: warmup then constant."""

    kind: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2

    def validate(self) -> list[str]:
        errors = []
        if self.warmup_steps < 0:
            errors.append(f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            errors.append(f"schedule.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 < self.decay_fraction <= 1:
            errors.append(f"schedule.decay_fraction must be in (0, 1], got {self.decay_fraction}")
        return errors


def lr_multiplier(step: int, max_steps: int, schedule: ScheduleConfig) -> float:
    """Multiplier of the peak rate for optimizer step ``step`` (0-based)."""
    warmup = schedule.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    floor = schedule.min_lr_ratio
    if schedule.kind == "constant":
        return 1.0
    if schedule.kind == "cosine":
        span = max(1, max_steps - warmup - 1)
        progress = min(1.0, (step - warmup) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = max(1, round(schedule.decay_fraction * max_steps))
    decay_start = max_steps - decay_steps
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start + 1) / decay_steps)
    return 1.0 - (1.0 - floor) * progress


def param_groups(model: nn.Module, config: OptimConfig) -> list[dict]:
    """Two groups: decayed (2-D+ weights of non-embedding layers) and not decayed."""
    embedding_params = {
        id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)
    }
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_embedding = id(param) in embedding_params
        if param.ndim >= 2 and (config.decay_embeddings or not is_embedding):
            decay.append(param)
        else:
            no_decay.append(param)
    return [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    """AdamW, by torch's fused kernel (one pass over each tensor's parameter, gradient and both
    moments) on CPU and CUDA parameters, by the foreach kernels on any other device."""
    fused = all(p.device.type in ("cpu", "cuda") for p in model.parameters())
    return torch.optim.AdamW(
        param_groups(model, config),
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        eps=config.eps,
        fused=True if fused else None,
        foreach=None if fused else True,
    )


def build_scheduler(optimizer, max_steps: int, schedule: ScheduleConfig):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, max_steps, schedule)
    )
