"""The batch and loss of the encoder-decoder, trained on span-corruption examples
(data/span_corruption.py).

A batch holds, each [B, Se], the encoder's ``input_ids``, ``position_ids`` and ``doc_ids``, and,
each [B, Sd], the decoder's ``decoder_input_ids`` (the targets shifted right behind the decoder
start token, per packed example), ``decoder_position_ids``, ``decoder_doc_ids``, ``labels`` and
``loss_mask`` (0 on padding). The loss is the cross entropy of ``labels`` under the mask, summed
and divided by the step's normaliser, as for causal models (models/loss.py).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from models.loss import language_model_loss
from models.spec import LossSettings

ENCODER_KEYS = ("input_ids", "position_ids", "doc_ids")
DECODER_KEYS = ("decoder_input_ids", "decoder_position_ids", "decoder_doc_ids", "labels", "loss_mask")


def inputs(batch: Mapping[str, torch.Tensor]) -> tuple[tuple, dict]:
    kwargs = {key: batch[key] for key in ("position_ids", "doc_ids", "decoder_position_ids", "decoder_doc_ids")}
    return (batch["input_ids"], batch["decoder_input_ids"]), kwargs


def targets(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"labels": batch["labels"], "loss_mask": batch["loss_mask"]}


def loss_tokens(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return batch["loss_mask"].sum()


def loss(
    logits: torch.Tensor, targets: Mapping[str, torch.Tensor], normalizer, settings: LossSettings
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return language_model_loss(
        logits, targets["labels"], targets["loss_mask"], z_loss=settings.z_loss, normalizer=normalizer
    )
