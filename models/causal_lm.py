"""The batch and loss functions of causal language models trained on packed GPT samples
(data/gpt_dataset.py): shared by the families that predict the next token (decoder, ...).

A batch holds ``input_ids``, ``labels``, ``position_ids``, ``doc_ids`` and ``loss_mask``, each
[B, S]. The model takes the ids (first pipeline stage) plus positions and document ids (every
stage); the loss takes the labels and the mask. With ``inputs_with_token_ids`` the model also
gets the labels and the mask: a fused loss head (``model.kernels.loss``, models/kernels.py)
computes the loss in the forward without writing the logits, and returns per-token loss
contributions that ``loss`` sums.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from models.loss import language_model_loss
from models.spec import LossSettings


def inputs(batch: Mapping[str, torch.Tensor]) -> tuple[tuple, dict]:
    return (batch["input_ids"],), {"position_ids": batch["position_ids"], "doc_ids": batch["doc_ids"]}


def inputs_with_token_ids(batch: Mapping[str, torch.Tensor]) -> tuple[tuple, dict]:
    """``inputs`` plus the token ids for every pipeline stage (routers that map token ids to
    experts read them; a stage after the first has no ``input_ids``), and the labels and loss
    mask for a fused loss head."""
    args, kwargs = inputs(batch)
    kwargs["token_ids"] = batch["input_ids"]
    if "labels" in batch:
        kwargs.update(labels=batch["labels"], loss_mask=batch["loss_mask"])
    return args, kwargs


def targets(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"labels": batch["labels"], "loss_mask": batch["loss_mask"]}


def loss_tokens(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return batch["loss_mask"].sum()


def loss(
    logits: torch.Tensor, targets: Mapping[str, torch.Tensor], normalizer, settings: LossSettings
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Next-token cross entropy (plus the z-loss when ``settings.z_loss`` > 0), summed over the
    mask and divided by ``normalizer`` (models/loss.py); from per-token loss contributions
    (models/fused_loss.py) when ``settings.fused_head``."""
    if settings.fused_head:
        return fused_loss(logits, targets["loss_mask"], normalizer)
    return language_model_loss(
        logits, targets["labels"], targets["loss_mask"], z_loss=settings.z_loss, normalizer=normalizer
    )


def fused_loss(contributions: torch.Tensor, loss_mask: torch.Tensor, normalizer) -> tuple[torch.Tensor, dict]:
    """The loss from a fused head's per-token (loss, cross-entropy, z-loss) contributions [B, S, 3]
    (already masked): their sums divided by ``normalizer`` (default: the unmasked token count)."""
    local_tokens = loss_mask.sum().float()
    denominator = local_tokens.clamp(min=1) if normalizer is None else normalizer
    sums = contributions.flatten(0, -2).sum(0)
    loss = sums[0] / denominator
    metrics = {
        "ce_loss": (sums[1] / denominator).detach(),
        "z_loss": (sums[2] / denominator).detach(),
        "num_tokens": local_tokens.detach(),
        "loss_sum": sums[1].detach(),
    }
    return loss, metrics
