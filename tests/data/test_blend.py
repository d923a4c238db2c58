"""Blending: the greedy interleave against megatron-core, prefix counts, capacity errors, and
blended samples against per-source datasets and megatron-core's blended builder."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from data.blend import build_blend_index, build_blended_dataset, normalize_weights, parse_blend
from data.gpt_dataset import GPTDataset, TokenSource

S = 16
WEIGHT_SETS = [
    [0.3, 0.7],
    [1, 2, 3, 4],
    [0.5, 0.1, 0.1, 0.3],
    [0.9, 0.05, 0.05],
    [0.5] + [0.5 / 60] * 60,
    np.random.default_rng(0).random(7).tolist(),
    np.random.default_rng(1).dirichlet(np.full(20, 0.3)).tolist(),
]


def lengths(n, seed=0, low=1, high=60):
    return np.random.default_rng(seed).integers(low, high, size=n).tolist()


@pytest.mark.parametrize("weights", WEIGHT_SETS)
def test_greedy_matches_megatron_and_every_prefix_is_within_two(weights):
    from megatron.core.datasets import helpers

    n = 20_000
    normalized = normalize_weights(weights)
    expected_index = np.zeros(n, dtype=np.int16)
    expected_sample = np.zeros(n, dtype=np.int64)
    helpers.build_blending_indices(expected_index, expected_sample, np.array(normalized), len(normalized), n, False)
    dataset_index, dataset_sample = build_blend_index(weights, n)
    assert np.array_equal(dataset_index, expected_index)
    assert np.array_equal(dataset_sample, expected_sample)
    # realised counts of every source at every prefix length 1..n, by a cumulative one-hot sum
    counts = np.cumsum(np.eye(len(normalized), dtype=np.int64)[dataset_index], axis=0)
    targets = np.arange(1, n + 1)[:, None] * np.array(normalized)[None, :]
    assert np.abs(counts - targets).max() <= 2.0
    # the sample number within a source counts that source's earlier picks
    for d in range(len(normalized)):
        where = np.flatnonzero(dataset_index == d)
        assert dataset_sample[where].tolist() == list(range(where.size))
    # building more samples never changes the earlier ones
    shorter, _ = build_blend_index(weights, 777)
    assert np.array_equal(shorter, dataset_index[:777])


def test_parse_blend_formats(tmp_path):
    assert parse_blend("a") == (["a"], None)
    assert parse_blend(["a", "b"]) == (["a", "b"], None)
    assert parse_blend(["0.7", "a", "0.3", "b"]) == (["a", "b"], [0.7, 0.3])
    assert parse_blend([(2, "a"), (1, "b")]) == (["a", "b"], [2.0, 1.0])
    assert parse_blend([{"path": "a", "weight": 1}, {"path": ["b", "c"], "weight": 3}]) == (["a", ["b", "c"]], [1.0, 3.0])
    assert parse_blend({"a": 0.25, "b": 0.75}) == (["a", "b"], [0.25, 0.75])
    numeric_dir = tmp_path / "2024"
    numeric_dir.mkdir()
    assert parse_blend([str(numeric_dir), "b"]) == ([str(numeric_dir), "b"], None)
    with pytest.raises(ValueError, match="inconsistently"):
        parse_blend(["0.7", "a", "b"])
    with pytest.raises(ValueError, match="no data paths"):
        parse_blend([])
    with pytest.raises(ValueError, match="weights"):
        normalize_weights([1, -1])


def test_blended_samples_follow_sources_and_token_weights(token_files):
    a, _ = token_files("a", lengths(80, seed=1))
    b, _ = token_files("b", lengths(40, seed=2), start=100_000)
    sources = [TokenSource(a), TokenSource(b)]
    blend = build_blended_dataset(sources, None, S, seed=7, split="9,1,0", num_samples=None)
    tokens = [int(s.sizes[: round(0.9 * len(s))].sum()) for s in sources]
    assert blend.weights == pytest.approx([t / sum(tokens) for t in tokens])
    counts = np.bincount(blend.dataset_index, minlength=2)
    capacity = [(t - 1) // S for t in tokens]
    assert np.all(counts <= capacity)
    # one sample more would have exceeded a source's single epoch
    longer, _ = build_blend_index(blend.weights, len(blend) + 1)
    assert np.any(np.bincount(longer, minlength=2) > capacity)
    singles = [GPTDataset(s, S, seed=7, split="9,1,0") for s in sources]
    for i in range(len(blend)):
        d, j = int(blend.dataset_index[i]), int(blend.dataset_sample_index[i])
        sample = blend[i]
        assert sample["dataset_id"] == d
        assert np.array_equal(sample["input_ids"], singles[d][j]["input_ids"])
        assert (sample["input_ids"] >= 100_000).all() == (d == 1)
    valid = build_blended_dataset(sources, [1, 1], S, seed=7, split="9,1,0", split_name="valid", num_samples=4)
    assert len(valid) == 4 and all(ds.doc_range[0] > 0 for ds in valid.datasets)


def test_oversampling_needs_allow_repeat(token_files):
    a, _ = token_files("big", lengths(200, seed=3))
    b, _ = token_files("small", lengths(10, seed=4), start=100_000)
    sources = [TokenSource(a), TokenSource(b)]
    small_capacity = (int(sources[1].sizes.sum()) - 1) // S
    n = 4 * small_capacity
    with pytest.raises(ValueError) as error:
        build_blended_dataset(sources, [0.5, 0.5], S, num_samples=n)
    message = str(error.value)
    assert "source 1" in message and "small" in message and f"holds only {small_capacity}" in message
    assert f"supply {n // 2}" in message and "data.allow_repeat=true" in message
    repeated = build_blended_dataset(sources, [0.5, 0.5], S, num_samples=n, allow_repeat=True)
    assert repeated.datasets[1].num_epochs >= 2 and len(repeated) == n
    small_inputs = np.concatenate([repeated[i]["input_ids"] for i in range(n) if repeated.dataset_index[i] == 1])
    # the small source is seen about twice: every token at least once, none more than three times
    seen = np.bincount(small_inputs - 100_000)
    assert seen.min() >= 1 and seen.max() <= 3
    with pytest.raises(ValueError, match="one weight per source"):
        build_blended_dataset(sources, [1.0], S)


def test_identical_to_megatron_blended_builder(token_files, tmp_path):
    warnings.filterwarnings("ignore")
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset as MegatronGPT
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    a, _ = token_files("a", lengths(150, seed=5))
    b, _ = token_files("b", lengths(90, seed=6), start=100_000)

    class Tokenizer:  # megatron-core only reads these attributes
        eod, vocab_size, pad = 0, 500_000, -1
        unique_identifiers = {"class": "Tokenizer"}

    n, weights = 200, [0.3, 0.7]
    config = GPTDatasetConfig(
        random_seed=13, sequence_length=S, blend=([a, b], weights), split="1,0,0", tokenizer=Tokenizer(),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
        path_to_cache=None,  # a blend cache would need torch.distributed; GPT indices go next to the data
    )
    theirs = BlendedMegatronDatasetBuilder(MegatronGPT, [n, 0, 0], lambda: True, config).build()[0]
    ours = build_blended_dataset([TokenSource(a), TokenSource(b)], weights, S, seed=13, split="1,0,0", num_samples=n)
    assert len(theirs) == len(ours) == n
    assert all(ds.num_epochs == 1 for ds in ours.datasets)
    for i in range(n):
        mine, reference = ours[i], theirs[i]
        assert int(reference["dataset_id"]) == int(mine["dataset_id"])
        assert mine["input_ids"].tolist() == reference["tokens"].tolist()
        assert mine["labels"].tolist() == reference["labels"].tolist()
