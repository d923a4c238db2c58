"""The batch and loss functions of causal language models trained on packed GPT samples
(data/gpt_dataset.py): shared by the families that predict the next token (decoder, ...).

A batch holds ``input_ids``, ``labels``, ``position_ids``, ``doc_ids`` and ``loss_mask``, each
[B, S]. The model takes the ids (first pipeline stage) plus positions and document ids (every
stage); the loss takes the labels and the mask.
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
    experts read them; a stage after the first has no ``input_ids``)."""
    args, kwargs = inputs(batch)
    return args, {**kwargs, "token_ids": batch["input_ids"]}


def targets(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"labels": batch["labels"], "loss_mask": batch["loss_mask"]}


def loss_tokens(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return batch["loss_mask"].sum()


def loss(
    logits: torch.Tensor, targets: Mapping[str, torch.Tensor], normalizer, settings: LossSettings
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Next-token cross entropy (plus the z-loss when ``settings.z_loss`` > 0), summed over the
    mask and divided by ``normalizer`` (models/loss.py)."""
    return language_model_loss(
        logits, targets["labels"], targets["loss_mask"], z_loss=settings.z_loss, normalizer=normalizer
    )
