"""T5 span corruption: the counts and lengths of ../shared/REFERENCES.md §5, exact reconstruction
of every window from its inputs and targets, packed rows holding exactly their examples, and a
loader that slices over data-parallel ranks and resumes exactly."""

from __future__ import annotations

import numpy as np
import pytest

from data.loader import DataConfig, build_loader
from data.span_corruption import (
    SpanCorruptionConfig, corrupt, corrupted_lengths, noise_mask, raw_length, sentinel_text,
)
from models.encdec import EncDecConfig
from models.encdec.objective import task

VOCAB, EOS = 20000, 1


def test_the_t5_defaults():
    assert raw_length(512, 0.15, 3.0) == 568
    assert corrupted_lengths(568, 0.15, 3.0) == (512, 114)


@pytest.mark.parametrize("inputs_length", [16, 57, 128, 512, 1000])
def test_the_raw_length_is_the_largest_that_fits(inputs_length):
    raw = raw_length(inputs_length, 0.15, 3.0)
    assert corrupted_lengths(raw, 0.15, 3.0)[0] <= inputs_length < corrupted_lengths(raw + 1, 0.15, 3.0)[0]


def _reconstruct(inputs, targets, vocab):
    """Independent of the implementation: each sentinel in the inputs → its span from the targets."""
    spans, current = {}, None
    for token in targets[:-1]:
        if token >= vocab - 100:
            current = vocab - 1 - token
            spans[current] = []
        else:
            spans[current].append(token)
    out = []
    for token in inputs[:-1]:
        out += spans[vocab - 1 - token] if token >= vocab - 100 else [token]
    return out


@pytest.mark.parametrize("density,mean_span", [(0.15, 3.0), (0.5, 8.0), (0.05, 1.0)])
def test_noise_counts_spans_and_reconstruction(density, mean_span):
    rng = np.random.default_rng(0)
    for length in [2, 3, 10, 31, 100, 568, 1001]:
        for _ in range(20):
            mask = noise_mask(length, density, mean_span, rng)
            n_noise = min(max(round(length * density), 1), length - 1)
            n_spans = max(1, round(n_noise / mean_span))
            starts = mask & ~np.concatenate([[False], mask[:-1]])
            assert mask.size == length and mask.sum() == n_noise and starts.sum() == n_spans and not mask[0]
            tokens = rng.integers(2, 5000, size=length)
            inputs, targets = corrupt(tokens, mask, VOCAB - 1, EOS)
            assert (inputs.size, targets.size) == (length - n_noise + n_spans + 1, n_noise + n_spans + 1)
            assert inputs[-1] == EOS and targets[-1] == EOS
            assert _reconstruct(inputs.tolist(), targets.tolist(), VOCAB) == tokens.tolist()


def test_sentinel_text():
    assert sentinel_text(VOCAB - 1, VOCAB, 100) == "<extra_id_0>"
    assert sentinel_text(VOCAB - 100, VOCAB, 100) == "<extra_id_99>"
    assert sentinel_text(VOCAB - 101, VOCAB, 100) is None


@pytest.fixture
def shards(token_files):
    lengths = np.random.default_rng(5).integers(5, 200, size=150).tolist()
    prefix, documents = token_files("corpus", lengths, start=10, eod=EOS)
    return prefix


def _data(prefix, **changes):
    values = dict(paths=[prefix], split="1", seq_len=96, seed=7, num_workers=0, eod_id=EOS,
                  span_corruption=SpanCorruptionConfig(examples_per_row=3))
    values.update(changes)
    return DataConfig(**values)


MODEL = EncDecConfig(vocab_size=VOCAB, max_seq_len=96, max_target_len=64)


def test_rows_pack_exactly_their_examples(shards):
    dataset, _ = task(MODEL, _data(shards), "train", None)
    raw = raw_length(32, 0.15, 3.0)
    n_in, n_out = corrupted_lengths(raw, 0.15, 3.0)
    assert dataset.raw_length == raw and dataset.targets_length == 3 * n_out
    for i in range(len(dataset)):
        row = dataset[i]
        assert row["input_ids"].size == 96 and row["labels"].size == 3 * n_out
        for j in range(3):
            window, inputs, targets = dataset.example(3 * i + j)
            assert window.size == raw and _reconstruct(inputs.tolist(), targets.tolist(), VOCAB) == window.tolist()
            enc = row["doc_ids"] == j + 1
            dec = row["decoder_doc_ids"] == j + 1
            assert row["input_ids"][enc].tolist() == inputs.tolist()
            assert row["position_ids"][enc].tolist() == list(range(n_in))
            assert row["labels"][dec].tolist() == targets.tolist()
            assert row["decoder_input_ids"][dec].tolist() == [0, *targets[:-1].tolist()]
            assert row["decoder_position_ids"][dec].tolist() == list(range(n_out))
        assert (row["doc_ids"] == 0).sum() == 96 - 3 * n_in and (row["input_ids"][row["doc_ids"] == 0] == 0).all()
        assert row["loss_mask"].tolist() == (row["decoder_doc_ids"] > 0).astype(int).tolist()


def test_rows_too_long_for_the_model_are_refused(shards):
    with pytest.raises(ValueError, match="max_target_len"):
        task(EncDecConfig(vocab_size=VOCAB, max_seq_len=96, max_target_len=20), _data(shards), "train", None)


def _loader(prefix, dp_rank=0, dp=1, micro=2):
    model = MODEL
    return build_loader(_data(prefix), "train", dp_rank=dp_rank, dp_size=dp, global_batch=4, micro_batch=micro,
                        num_samples=24, task=lambda *a: task(model, *a))


def _rows(batches):
    return [tuple(b[k][r].tolist() for k in ("input_ids", "labels")) for b in batches for r in range(b["labels"].shape[0])]


def test_loader_slices_over_ranks_and_resumes_exactly(shards):
    whole = list(_loader(shards))
    assert len(whole) == 12 and set(whole[0]) >= {"input_ids", "decoder_input_ids", "decoder_doc_ids", "loss_mask"}
    # two data-parallel ranks, micro-batch 1: per global batch rank 0 serves rows 0-1, rank 1 rows 2-3
    ranks = [list(_loader(shards, r, 2, 1)) for r in range(2)]
    interleaved = [b for step in range(6) for rank in ranks for b in rank[2 * step : 2 * step + 2]]
    assert _rows(interleaved) == _rows(whole)
    first = _loader(shards)
    head = [b for _, b in zip(range(5), first)]
    resumed = _loader(shards)
    resumed.load_state_dict(first.state_dict())
    assert _rows(head + list(resumed)) == _rows(whole)
    other = build_loader(_data(shards, span_corruption=SpanCorruptionConfig(examples_per_row=2)), "train",
                         dp_rank=0, dp_size=1, global_batch=4, micro_batch=2, num_samples=24,
                         task=lambda *a: task(MODEL, *a))
    with pytest.raises(Exception, match="span_corruption"):
        other.load_state_dict(first.state_dict())


def test_sentinels_in_text_round_trip_through_the_tokenizer(cache):
    from data.span_corruption import decode_with_sentinels, encode_with_sentinels
    from data.tokenizer import load_tokenizer
    from pretrain.builtin_data import prepare_builtin_corpus

    tokenizer = load_tokenizer(prepare_builtin_corpus(cache, log=lambda m: None).parent / "tokenizer" / "tokenizer.model")
    vocab = tokenizer.vocab_size + 100
    text = "And God said <extra_id_0> light <extra_id_12> was good"
    ids = encode_with_sentinels(tokenizer, text, vocab)
    assert ids.count(vocab - 1) == 1 and ids.count(vocab - 13) == 1 and max(ids) == vocab - 1
    assert decode_with_sentinels(tokenizer, ids, vocab) == text
    with pytest.raises(Exception, match="extra_id_0"):
        encode_with_sentinels(tokenizer, "<extra_id_100>", vocab)
