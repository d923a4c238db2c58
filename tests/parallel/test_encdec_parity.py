"""The encoder-decoder trains under TP2, TP2+SP (encoder, decoder and cross-attention sharded
by head, the relative bias tables by head), FSDP2 and TP2×FSDP2 with the losses and gradient
norms of an independent single-process loop (1e-5), on packed span-corruption-shaped rows."""

from __future__ import annotations

import pytest
import torch

from models.encdec import EncDecConfig
from models.ffn.gated import GatedGELUConfig
from models.loss import language_model_loss
from tests.parallel.launch import launches_by_world
from tests.parallel.test_parity import check_ranks
from tests.parallel.workloads import GLOBAL_BATCH, SEQ, reference_run, train_layouts

STEPS, TARGETS, VOCAB = 4, 16, 256
ENCDEC = EncDecConfig(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2, n_heads=4, max_seq_len=SEQ,
                      max_target_len=TARGETS, ffn=GatedGELUConfig(d_ff=128))
LAYOUTS = {
    2: {"tp2": (dict(tp=2, sp=False), 2), "tp2_sp": (dict(tp=2, sp=True), 2), "fsdp2": (dict(), 2)},
    4: {"tp2_fsdp2": (dict(tp=2, sp=True), 2)},
}
CASES = [(world, name) for world, layouts in LAYOUTS.items() for name in layouts]


def encdec_batch(step: int) -> dict:
    """Rows of two examples each: the targets are the example's first input tokens reversed
    (learnable only through cross-attention), encoder and decoder padding in segment 0."""
    g = torch.Generator().manual_seed(2000 + step)
    rows = {k: torch.zeros(GLOBAL_BATCH, SEQ if k in ("input_ids", "position_ids", "doc_ids") else TARGETS,
                           dtype=torch.long)
            for k in ("input_ids", "position_ids", "doc_ids", "decoder_input_ids", "decoder_position_ids",
                      "decoder_doc_ids", "labels", "loss_mask")}
    for r in range(GLOBAL_BATCH):
        enc_at = dec_at = 0
        for segment in (1, 2):
            n_in = int(torch.randint(6, SEQ // 2, (1,), generator=g))
            n_out = min(n_in // 2 + 1, TARGETS // 2)
            tokens = torch.randint(2, VOCAB, (n_in,), generator=g)
            targets = tokens[: n_out].flip(0)
            enc, dec = slice(enc_at, enc_at + n_in), slice(dec_at, dec_at + n_out)
            rows["input_ids"][r, enc], rows["position_ids"][r, enc] = tokens, torch.arange(n_in)
            rows["doc_ids"][r, enc] = segment
            rows["labels"][r, dec] = targets
            rows["decoder_input_ids"][r, dec] = torch.cat([torch.zeros(1, dtype=torch.long), targets[:-1]])
            rows["decoder_position_ids"][r, dec], rows["decoder_doc_ids"][r, dec] = torch.arange(n_out), segment
            rows["loss_mask"][r, dec] = 1
            enc_at, dec_at = enc_at + n_in, dec_at + n_out
    return rows


def encdec_loss(model, mb: dict, tokens: float, share: float):
    logits = model(mb["input_ids"], mb["decoder_input_ids"], position_ids=mb["position_ids"], doc_ids=mb["doc_ids"],
                   decoder_position_ids=mb["decoder_position_ids"], decoder_doc_ids=mb["decoder_doc_ids"])
    loss = language_model_loss(logits, mb["labels"], mb["loss_mask"], normalizer=tokens)[0]
    return loss, loss


def train(rank: int, world: int) -> dict:
    return train_layouts(rank, world, LAYOUTS[world], STEPS, model_config=ENCDEC, batches=encdec_batch)


@pytest.fixture(scope="module")
def reference():
    history = reference_run(STEPS, micro=2, model_config=ENCDEC, step_loss=encdec_loss, batches=encdec_batch)
    assert history[-1][0] < history[0][0] - 0.05, history
    return history


@pytest.fixture(scope="module")
def launched():
    return launches_by_world(train)


@pytest.mark.parametrize("world, name", CASES, ids=[name for _, name in CASES])
def test_encdec_layout_matches_one_process(world, name, reference, launched):
    check_ranks([result[name] for result in launched(world)], reference)
