"""GPT sampling: index rules, sample contents against brute force and megatron-core, masks,
splits, source resolution and the on-disk index cache."""

from __future__ import annotations

import json
import multiprocessing
import time
import warnings

import numpy as np
import pytest
import torch

from data import sample_index as si
from data.gpt_dataset import GPTDataset, TokenSource, cu_seqlens, make_sample, resolve_prefixes

S = 16


def lengths(n, seed=0, low=1, high=60):
    return np.random.default_rng(seed).integers(low, high, size=n).tolist()


def reference_windows(documents, document_index, seq_len):
    """Plain Python: the stream in ``document_index`` order cut into overlapping windows, with
    the position in ``document_index`` of every token."""
    tokens, owner = [], []
    for position, doc in enumerate(document_index):
        tokens += documents[int(doc)]
        owner += [position] * len(documents[int(doc)])
    count = (len(tokens) - 1) // seq_len
    return [(tokens[k * seq_len : k * seq_len + seq_len + 1], owner[k * seq_len : k * seq_len + seq_len + 1]) for k in range(count)]


def segments_of(owner):
    out, current = [], 0
    for i, o in enumerate(owner):
        if i and o != owner[i - 1]:
            current += 1
        out.append(current)
    return out


def test_epoch_rule_matches_megatron_loop():
    for tokens in (17, 100, 1000, 4097):
        for n in (None, 1, 5, 63, 64, 65, 300, 1000):
            epochs, total = 1, tokens
            while n is not None and total < n * S + 1:
                epochs, total = epochs + 1, total + tokens
            assert si.epochs_needed(tokens, n, S) == epochs
            assert si.samples_in_epochs(tokens, epochs, S) == (epochs * tokens - 1) // S
            assert n is None or si.samples_in_epochs(tokens, epochs, S) >= n


def test_split_ranges_match_megatron():
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    for split in ("969,30,1", "98,2,0", "1", "1,1,1", "0.7, 0.2, 0.1", "3,0,1"):
        matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
        for docs in (1, 7, 1000, 123457):
            ours = si.split_document_ranges(docs, split)
            for name, bounds in zip(si.SPLIT_NAMES, matrix):
                if bounds is None:
                    assert ours[name][0] == ours[name][1]
                else:
                    assert ours[name] == (int(round(bounds[0] * docs)), int(round(bounds[1] * docs)))
    assert si.split_document_ranges(10, [8, 1, 1]) == {"train": (0, 8), "valid": (8, 9), "test": (9, 10)}
    for bad in ("", "a,b", "1,-1", "0,0,0", "1,1,1,1"):
        with pytest.raises(ValueError, match="split"):
            si.parse_split(bad)


def test_samples_equal_brute_force_over_epochs(token_files):
    a, docs_a = token_files("a", lengths(40, seed=1))
    b, docs_b = token_files("b", lengths(30, seed=2), start=10_000)
    documents = docs_a + docs_b
    source = TokenSource([a, b])
    assert len(source) == 70 and source.num_tokens == sum(map(len, documents))
    ds = GPTDataset(source, S, seed=5, split="8,2,0", split_name="train", num_samples=300)
    begin, end = ds.doc_range
    assert (begin, end) == (0, 56)
    tokens = sum(len(documents[d]) for d in range(begin, end))
    assert ds.num_epochs >= 3 and len(ds) == (ds.num_epochs * tokens - 1) // S >= 300

    # every epoch is a permutation of the split's documents; epoch 0 is RandomState(seed)'s shuffle
    perms = np.asarray(ds.document_index).reshape(ds.num_epochs, end - begin)
    expected0 = np.arange(begin, end, dtype=np.int32)
    np.random.RandomState(5).shuffle(expected0)
    assert np.array_equal(perms[0], expected0)
    for perm in perms:
        assert sorted(perm.tolist()) == list(range(begin, end))
    assert len({tuple(p) for p in perms}) == ds.num_epochs

    windows = reference_windows(documents, ds.document_index, S)
    assert len(windows) == len(ds)
    order = np.asarray(ds.shuffle_index)
    # the serving order finishes the samples whose last token is in epoch e before epoch e + 1
    epoch_of = [(k * S + S) // tokens for k in range(len(ds))]
    assert [epoch_of[k] for k in order] == sorted(epoch_of)
    assert sorted(order.tolist()) == list(range(len(ds)))
    for i in range(len(ds)):
        window, owner = windows[order[i]]
        got, segments = ds.window(i)
        assert got.tolist() == window
        assert segments.tolist() == segments_of(owner)
        sample = ds[i]
        assert sample["input_ids"].tolist() == window[:-1] and sample["labels"].tolist() == window[1:]
        assert sample["doc_ids"].tolist() == segments_of(owner)[:-1]
        starts = [j == 0 or owner[j] != owner[j - 1] for j in range(S)]
        expected_pos, p = [], 0
        for j in range(S):
            p = 0 if starts[j] else p + 1
            expected_pos.append(p)
        assert sample["position_ids"].tolist() == expected_pos
        assert sample["loss_mask"].tolist() == [int(owner[j] == owner[j + 1]) for j in range(S)]
        assert all(v.dtype == np.int64 and v.shape == (S,) for v in sample.values())


def test_epoch_prefix_stable_and_seed_dependent(token_files):
    prefix, _ = token_files("a", lengths(50, seed=3))
    source = TokenSource(prefix)
    short = GPTDataset(source, S, seed=1, num_samples=10)
    long = GPTDataset(source, S, seed=1, num_samples=5 * short.samples_per_epoch)
    assert long.num_epochs > short.num_epochs == 1
    assert np.array_equal(long.shuffle_index[: len(short)], short.shuffle_index)
    assert all(np.array_equal(long.window(i)[0], short.window(i)[0]) for i in range(len(short)))
    other = GPTDataset(source, S, seed=2)
    assert not np.array_equal(other.document_index, short.document_index)
    assert not np.array_equal(other.shuffle_index, short.shuffle_index)
    bounds = long.epoch_bounds
    blocks = [np.asarray(long.shuffle_index[bounds[e] : bounds[e + 1]]) - bounds[e] for e in range(2)]
    assert not np.array_equal(blocks[0][: len(blocks[1])], blocks[1][: len(blocks[0])])


def test_identical_to_megatron_gpt_dataset_in_one_epoch(token_files, tmp_path):
    warnings.filterwarnings("ignore")
    from megatron.core.datasets.gpt_dataset import GPTDataset as MegatronGPT
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.datasets.utils import Split

    eod = 0
    prefix, _ = token_files("m", lengths(120, seed=4), start=1, eod=eod)

    class Tokenizer:  # megatron-core only reads these attributes
        eod, vocab_size, pad = 0, 50_000, -1
        unique_identifiers = {"class": "Tokenizer"}

    for seed, num_samples in ((3, None), (11, 100)):
        config = GPTDatasetConfig(
            random_seed=seed, sequence_length=S, blend=([prefix], None), split="1,0,0", tokenizer=Tokenizer(),
            reset_position_ids=True, reset_attention_mask=False, eod_mask_loss=True,
            create_attention_mask=False, path_to_cache=str(tmp_path / "megatron-cache"),
        )
        indexed = IndexedDataset(prefix)
        theirs = MegatronGPT(indexed, prefix, np.arange(len(indexed), dtype=np.int32), num_samples, Split.train, config)
        ours = GPTDataset(TokenSource(prefix), S, seed=seed, num_samples=num_samples, eod_id=eod)
        assert ours.num_epochs == 1 and len(ours) == len(theirs)
        for i in range(len(ours)):
            a, b = ours[i], theirs[i]
            assert a["input_ids"].tolist() == b["tokens"].tolist()
            assert a["labels"].tolist() == b["labels"].tolist()
            # documents end in EOD, so a new document starts after each EOD: megatron's resets agree
            assert a["position_ids"].tolist() == b["position_ids"].tolist()
            assert a["loss_mask"].tolist() == b["loss_mask"].long().tolist()
    # more epochs: megatron shuffles all epochs' documents together, we shuffle per epoch; both
    # obey N = (E*T - 1) // S
    many = MegatronGPT(indexed, prefix, np.arange(len(indexed), dtype=np.int32), 3 * len(ours), Split.train, config)
    assert len(GPTDataset(TokenSource(prefix), S, seed=11, num_samples=3 * len(ours))) == len(many)


def test_eod_and_document_boundary_masks(token_files):
    eod = 0
    prefix, _ = token_files("e", lengths(80, seed=6, high=30), start=1, eod=eod)
    source = TokenSource(prefix)
    plain = GPTDataset(source, S, seed=0, eod_id=eod)
    no_mask = GPTDataset(source, S, seed=0, eod_id=eod, mask_document_boundary=False)
    eod_masked = GPTDataset(source, S, seed=0, eod_id=eod, eod_mask_loss=True)
    kept_eod_labels = 0
    for i in range(len(plain)):
        a, b, c = plain[i], no_mask[i], eod_masked[i]
        inputs, labels, mask = a["input_ids"], a["labels"], a["loss_mask"]
        # the only document transitions are after an EOD: that label is masked, nothing else is
        assert np.array_equal(mask == 0, inputs == eod)
        crosses = a["doc_ids"][1:] != a["doc_ids"][:-1]
        assert np.all(inputs[:-1][crosses] == eod)
        kept_eod_labels += int(np.sum(mask[labels == eod]))
        assert np.all(b["loss_mask"] == 1)
        assert np.array_equal(c["loss_mask"], mask * (labels != eod))
        starts = np.flatnonzero(np.diff(a["doc_ids"], prepend=-1))
        assert np.all(a["position_ids"][starts] == 0)
        assert np.all(np.diff(a["position_ids"])[np.diff(a["doc_ids"]) == 0] == 1)
    assert kept_eod_labels > 0
    with pytest.raises(ValueError, match="eod_id"):
        GPTDataset(source, S, eod_mask_loss=True)


def test_cu_seqlens_brute_force():
    doc_ids = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    expected = [0]
    for row in range(3):
        for j in range(1, 6):
            if doc_ids[row, j] != doc_ids[row, j - 1]:
                expected.append(row * 6 + j)
        expected.append((row + 1) * 6)
    assert cu_seqlens(doc_ids).tolist() == expected
    assert cu_seqlens(doc_ids).dtype == torch.int32
    sample = make_sample(np.arange(7), np.array([0, 0, 1, 1, 1, 2, 2]), True, False, None)
    assert sample["position_ids"].tolist() == [0, 1, 0, 1, 2, 0]


def test_source_resolution_manifest_and_errors(token_files, tmp_path):
    shard_dir = tmp_path / "shards"
    first, d0 = token_files("shard_00000", [5, 6], directory=shard_dir)
    second, d1 = token_files("shard_00001", [7], start=100, directory=shard_dir)
    assert resolve_prefixes(shard_dir) == [first, second]
    assert resolve_prefixes(first + ".idx") == [first]
    manifest = {"tokenizer": {"fingerprint": "sentencepiece:abc"}, "shards": [{"prefix": "shard_00001"}, {"prefix": "shard_00000"}]}
    (shard_dir / "manifest.json").write_text(json.dumps(manifest))
    source = TokenSource(shard_dir)
    assert source.prefixes == [second, first] and source.tokenizer_fingerprint == "sentencepiece:abc"
    assert [source.read(d, 0, int(source.sizes[d])).tolist() for d in range(3)] == d1 + d0
    assert source.read(2, 2, 3).tolist() == d0[1][2:5]
    assert TokenSource(first).fingerprint != TokenSource(second).fingerprint
    with pytest.raises(FileNotFoundError, match="expected .*missing.bin"):
        TokenSource(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="without manifest.json"):
        TokenSource(tmp_path / "empty")
    with pytest.raises(ValueError, match="smaller than one sample"):
        GPTDataset(TokenSource(first), 64)
    with pytest.raises(ValueError, match="seed"):
        GPTDataset(TokenSource(first), 4, seed=-1)


def test_index_build_covers_hundreds_of_millions_of_tokens():
    """The scale check (its speed is measured by bench/loading.py): the requested samples exist."""
    sizes = np.random.default_rng(0).integers(1, 1000, size=400_000).astype(np.int32)
    arrays = si.build_gpt_indices(sizes, (0, sizes.size), 2048, 1, 3 * 97_000)
    assert arrays["sample_index"].shape[0] == arrays["shuffle_index"].size + 1
    assert arrays["shuffle_index"].size >= 3 * 97_000


def _build_in_child(cache_dir, sizes, queue):
    calls = []

    def build():
        calls.append(1)
        time.sleep(0.3)
        return si.build_gpt_indices(sizes, (0, sizes.size), S, 9, None)

    arrays, built = si.cached_arrays(cache_dir, "gpt", {"test": "concurrent"}, build)
    queue.put((built, len(calls), np.asarray(arrays["shuffle_index"]).tolist()))


def test_cache_reuse_concurrency_and_atomicity(token_files, tmp_path, monkeypatch):
    prefix, _ = token_files("c", lengths(60, seed=7))
    cache = tmp_path / "cache"
    first = GPTDataset(TokenSource(prefix), S, seed=3, cache_dir=cache)
    second = GPTDataset(TokenSource(prefix), S, seed=3, cache_dir=cache)
    assert first.built_here and not second.built_here
    assert isinstance(second.shuffle_index.base, np.memmap)
    for name in ("document_index", "sample_index", "shuffle_index"):
        assert np.array_equal(getattr(first, name), getattr(second, name))
    assert all(np.array_equal(first.window(i)[0], second.window(i)[0]) for i in range(len(first)))
    assert GPTDataset(TokenSource(prefix), S, seed=4, cache_dir=cache).built_here
    entries = sorted(p.name for p in cache.iterdir() if p.is_dir())
    assert len(entries) == 2

    # a build that dies half-way leaves no entry that a later build would use
    real_save = np.save
    calls = []

    def failing_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        GPTDataset(TokenSource(prefix), S, seed=5, cache_dir=cache)
    monkeypatch.setattr(np, "save", real_save)
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == entries
    # a leftover temporary directory (a killed builder) and a damaged entry are rebuilt
    expected = np.array(first.shuffle_index)
    entry = next(cache / e for e in entries if (cache / e / "meta.json").read_text().count('"seed": 3'))
    (cache / f"{entry.name}.tmp-dead").mkdir()
    with open(entry / "shuffle_index.npy", "r+b") as f:
        f.truncate(100)
    rebuilt = GPTDataset(TokenSource(prefix), S, seed=3, cache_dir=cache)
    assert rebuilt.built_here and np.array_equal(rebuilt.shuffle_index, expected)
    assert not (cache / f"{entry.name}.tmp-dead").exists()

    # processes racing for one entry: exactly one builds, all read the same arrays
    sizes = np.array(lengths(200, seed=8), dtype=np.int32)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(tmp_path / "race", sizes, queue)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join()
    assert sorted(r[0] for r in results) == [False, False, True]
    assert sum(r[1] for r in results) == 1
    assert results[0][2] == results[1][2] == results[2][2]
