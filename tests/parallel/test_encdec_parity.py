"""The encoder-decoder trains under TP2, TP2+SP (encoder, decoder and cross-attention sharded
by head, the relative bias tables by head), FSDP2, TP2×FSDP2, PP2 cut at the encoder/decoder
seam, inside the encoder and inside the decoder (the boundary carries encoder states or memory,
decoder states and the bias tables), PP2×FSDP2, PP2×TP2 and PP2×TP2+SP (the tables cross as
each rank's heads; also with RoPE), FSDP2 with full recomputation and TP2+SP with compiled
blocks (aot_eager: the traced graphs, without inductor's C++ build; also with selective
recomputation), with the losses and gradient norms of an independent single-process loop
(1e-5), on packed span-corruption-shaped rows."""

from __future__ import annotations

import dataclasses

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
ROPE = dataclasses.replace(ENCDEC, position="rope")
CONFIGS = {"relative": ENCDEC, "rope": ROPE}
# (ParallelConfig fields, micro-batch[, config]); 2 + 2 blocks: PP2 cuts at the encoder/decoder seam by
# default, inside the encoder with stages of 1 and 3 blocks, inside the decoder with 3 and 1.
LAYOUTS = {
    2: {"tp2": (dict(tp=2, sp=False), 2), "tp2_sp": (dict(tp=2, sp=True), 2), "fsdp2": (dict(), 2),
        "pp2_seam": (dict(pp=2, pp_schedule="1f1b"), 2),
        "pp2_in_encoder": (dict(pp=2, pp_schedule="1f1b", pp_stage_layers=[1, 3]), 2),
        "pp2_in_decoder": (dict(pp=2, pp_schedule="gpipe", pp_stage_layers=[3, 1]), 2),
        "tp2_sp_rope": (dict(tp=2, sp=True), 2, "rope"),
        "fsdp2_full_recompute": (dict(), 2, "relative", "full"),
        "tp2_sp_compiled": (dict(tp=2, sp=True, compile=True, compile_backend="aot_eager"), 2),
        "tp2_sp_compiled_selective": (dict(tp=2, sp=True, compile=True, compile_backend="aot_eager"), 2, "relative",
                                      "selective")},
    4: {"tp2_fsdp2": (dict(tp=2, sp=True), 2), "pp2_fsdp2": (dict(pp=2, pp_schedule="1f1b"), 2),
        "pp2_tp2_sp_rope": (dict(pp=2, tp=2, sp=True, pp_schedule="1f1b"), 1, "rope"),
        "pp2_tp2_sp": (dict(pp=2, tp=2, sp=True, pp_schedule="1f1b", pp_stage_layers=[1, 3]), 1),
        "pp2_tp2": (dict(pp=2, tp=2, sp=False, pp_schedule="1f1b"), 1)},
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
    logits = model(mb["input_ids"], decoder_input_ids=mb["decoder_input_ids"], position_ids=mb["position_ids"], doc_ids=mb["doc_ids"],
                   decoder_position_ids=mb["decoder_position_ids"], decoder_doc_ids=mb["decoder_doc_ids"])
    loss = language_model_loss(logits, mb["labels"], mb["loss_mask"], normalizer=tokens)[0]
    return loss, loss


def train(rank: int, world: int) -> dict:
    results = {}
    for name, (fields, micro, *rest) in LAYOUTS[world].items():
        model = CONFIGS[rest[0] if rest else "relative"]
        results.update(train_layouts(rank, world, {name: (fields, micro, *rest[1:])}, STEPS, model_config=model,
                                     batches=encdec_batch))
    return results


@pytest.fixture(scope="module")
def reference():
    histories = {
        name: reference_run(STEPS, micro=2, model_config=config, step_loss=encdec_loss, batches=encdec_batch)
        for name, config in CONFIGS.items()
    }
    for history in histories.values():
        assert history[-1][0] < history[0][0] - 0.05, history
    return histories


@pytest.fixture(scope="module")
def launched():
    return launches_by_world(train)


@pytest.mark.parametrize("world, name", CASES, ids=[name for _, name in CASES])
def test_encdec_layout_matches_one_process(world, name, reference, launched):
    config = LAYOUTS[world][name][2] if len(LAYOUTS[world][name]) > 2 else "relative"
    check_ranks([result[name] for result in launched(world)], reference[config])

