"""The batch and loss of the encoder-decoder, trained on span-corruption examples
(data/span_corruption.py).

A batch holds, each [B, Se], the encoder's ``input_ids``, ``position_ids`` and ``doc_ids``, and,
each [B, Sd], the decoder's ``decoder_input_ids`` (the targets shifted right behind the decoder
start token, per packed example), ``decoder_position_ids``, ``decoder_doc_ids``, ``labels`` and
``loss_mask`` (0 on padding). The loss is the cross entropy of ``labels`` under the mask, summed
and divided by the step's normaliser: the family declares causal models' ``targets``,
``loss_tokens`` and ``loss`` (models/causal_lm.py; it has no fused loss head).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

ENCODER_KEYS = ("input_ids", "position_ids", "doc_ids")
DECODER_KEYS = ("decoder_input_ids", "decoder_position_ids", "decoder_doc_ids", "labels", "loss_mask")


def inputs(batch: Mapping[str, torch.Tensor]) -> tuple[tuple, dict]:
    keys = ("decoder_input_ids", "position_ids", "doc_ids", "decoder_position_ids", "decoder_doc_ids")
    return (batch["input_ids"],), {key: batch[key] for key in keys}


def task(model_config, data_config, split_name: str, num_samples: int | None):
    """Span-corruption rows over the run's shards (data/span_corruption.py), sentinels at the end
    of the model's vocabulary; the model must hold the rows' lengths."""
    from data.span_corruption import build_span_corruption

    dataset, fingerprint = build_span_corruption(
        data_config, split_name, num_samples, vocab_size=model_config.vocab_size,
        decoder_start_id=model_config.decoder_start_id,
    )
    if data_config.seq_len > model_config.max_seq_len or dataset.targets_length > model_config.max_target_len:
        raise ValueError(
            f"span-corruption rows are {data_config.seq_len} encoder and {dataset.targets_length} decoder tokens; "
            f"set model.max_seq_len >= {data_config.seq_len} and model.max_target_len >= {dataset.targets_length}"
        )
    return dataset, fingerprint
