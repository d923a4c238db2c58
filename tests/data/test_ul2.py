"""UL2's mixture of denoisers and the prefix-LM mode (data/span_corruption.py), recomputed here from
the formulas: each denoiser's window, noise tokens, spans and lengths, the exact reconstruction
of the tokens it read, the mixture's proportions, and a loader that slices over data-parallel
ranks, resumes exactly and trains a T5."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from data.errors import DataError
from data.loader import DataConfig, build_loader
from data.span_corruption import DenoiserConfig, SpanCorruptionConfig, SpanCorruptionDataset
from models.configtree import ConfigError, from_dict
from models.encdec import EncDecConfig
from models.encdec.objective import task

VOCAB, EXTRA, EOS = 20000, 100, 1
R_ID, S_ID, X_ID = VOCAB - EXTRA - 1, VOCAB - EXTRA - 2, VOCAB - EXTRA - 3
MIXTURE = [
    DenoiserConfig("R", 0.15, 3.0, weight=2.0),
    DenoiserConfig("X", 0.5, 32.0),
    DenoiserConfig("S", 0.25),
]


def _span_counts(length, density, mean_span):
    n_noise = min(max(round(length * density), 1), length - 1)
    return n_noise, max(1, round(n_noise / mean_span))


def _longest_span_window(room, density, mean_span):
    """The largest L whose inputs (kept tokens + one sentinel per span + EOS) fit in ``room``."""
    fits = []
    for L in range(2, 4 * room):
        n_noise, n_spans = _span_counts(L, density, mean_span)
        if L - n_noise + n_spans + 1 <= room:
            fits.append(L)
    return max(fits)


def _expected(denoiser, per_example, mode):
    """(window read, longest inputs, longest targets) of a denoiser, independently of the code."""
    room = per_example - mode
    if denoiser.kind == "S":
        return room, room + mode, min(room - 1, max(1, round(2 * denoiser.noise_density * room))) + 1
    L = _longest_span_window(room, denoiser.noise_density, denoiser.mean_span)
    n_noise, n_spans = _span_counts(L, denoiser.noise_density, denoiser.mean_span)
    return L, L - n_noise + n_spans + 1 + mode, n_noise + n_spans + 1


class Windows:
    """``count`` windows of ``length`` random tokens below the sentinels, one generator per window."""

    def __init__(self, count, length):
        self.count, self.length = count, length

    def __len__(self):
        return self.count

    def tokens(self, e):
        return np.random.default_rng([99, e]).integers(2, VOCAB - EXTRA - 3, size=self.length)

    def __getitem__(self, e):
        tokens = self.tokens(e)
        return {"input_ids": tokens[:-1], "labels": tokens[1:]}


def _dataset(config, inputs_length, count=300, seed=7):
    window = max(_expected(d, inputs_length // config.examples_per_row, int(config.mode_tokens))[0]
                 for d in config.mixture())
    windows = Windows(count, window)
    dataset = SpanCorruptionDataset(windows, config, inputs_length=inputs_length, vocab_size=VOCAB, eos_id=EOS,
                                    decoder_start_id=0, seed=seed)
    assert dataset.raw_length == window
    return dataset, windows


def _is_sentinel(token):
    return token >= VOCAB - EXTRA


def _check_span_example(tokens, inputs, targets, denoiser, mode, read):
    """Counts from the formulas and the tokens rebuilt from the sentinels alone."""
    n_noise, n_spans = _span_counts(read, denoiser.noise_density, denoiser.mean_span)
    body = inputs[1:-1] if mode else inputs[:-1]
    assert tokens.size == read and inputs[-1] == EOS and targets[-1] == EOS
    assert sum(map(_is_sentinel, body)) == n_spans and sum(map(_is_sentinel, targets)) == n_spans
    assert len(targets) - 1 - n_spans == n_noise and len(body) == read - n_noise + n_spans
    spans, current = {}, None
    for token in targets[:-1]:
        if _is_sentinel(token):
            current = spans.setdefault(VOCAB - 1 - token, [])
        else:
            current.append(token)
    rebuilt = [t for token in body for t in (spans[VOCAB - 1 - token] if _is_sentinel(token) else [token])]
    assert rebuilt == tokens.tolist()


@pytest.mark.parametrize("inputs_length", [40, 128, 300])
def test_every_denoiser_counts_lengths_and_reconstruction(inputs_length):
    config = SpanCorruptionConfig(objective="ul2", denoisers=MIXTURE + [DenoiserConfig("X", 0.15, 64.0)],
                                  mode_tokens=True)
    dataset, windows = _dataset(config, inputs_length)
    expected = {d.kind + str(d.mean_span): _expected(d, inputs_length, 1) for d in config.denoisers}
    longest_targets = max(e[2] for e in expected.values())
    assert dataset.targets_length == longest_targets
    seen, continuations = set(), []
    for e in range(len(dataset)):
        tokens, inputs, targets = (a.tolist() for a in dataset.example(e))
        tokens = np.asarray(tokens)
        kind = {R_ID: "R", S_ID: "S", X_ID: "X"}[inputs[0]]
        assert all(token < VOCAB - EXTRA - 3 for token in inputs[1:] + targets if not _is_sentinel(token))
        if kind == "S":
            read, longest_in, longest_out = expected["S3.0"]
            assert tokens.tolist() == windows.tokens(e)[:read].tolist()
            assert inputs[1:-1] + targets[:-1] == tokens.tolist() and not any(map(_is_sentinel, inputs + targets))
            assert inputs[-1] == EOS and targets[-1] == EOS and 2 <= len(targets) <= longest_out
            continuations.append(len(targets) - 1)
            seen.add("S3.0")
            continue
        candidates = [d for d in config.denoisers if d.kind == kind
                      and expected[d.kind + str(d.mean_span)][1:] == (len(inputs), len(targets))]
        assert len(candidates) == 1, (kind, len(inputs), len(targets), expected)
        d = candidates[0]
        read, longest_in, longest_out = expected[d.kind + str(d.mean_span)]
        assert longest_in <= inputs_length
        assert tokens.tolist() == windows.tokens(e)[:read].tolist()
        _check_span_example(tokens, inputs, targets, d, True, read)
        seen.add(d.kind + str(d.mean_span))
    assert seen == set(expected)
    assert 1 <= min(continuations) and max(continuations) <= expected["S3.0"][2] - 1


def test_span_and_s_denoisers_fill_their_inputs_exactly():
    """The window each reads is the longest that fits: one more token would overflow the inputs."""
    for inputs_length in range(6, 200, 7):
        for mode in (0, 1):
            for d in MIXTURE:
                read, longest_in, _ = _expected(d, inputs_length, mode)
                assert longest_in <= inputs_length
                if d.kind == "S":
                    assert read + 1 + mode > inputs_length
                else:
                    n_noise, n_spans = _span_counts(read + 1, d.noise_density, d.mean_span)
                    assert read + 1 - n_noise + n_spans + 1 + mode > inputs_length
            config = SpanCorruptionConfig(objective="ul2", denoisers=MIXTURE, mode_tokens=bool(mode))
            dataset, _ = _dataset(config, inputs_length, count=1)
            assert [(p.raw_length, p.inputs, p.targets) for p in dataset.denoisers] == [
                _expected(d, inputs_length, mode) for d in MIXTURE]


def test_mixture_proportions_within_a_binomial_bound():
    seed, n = 20261204, 4000
    print(f"mixture seed {seed}")
    config = SpanCorruptionConfig(objective="ul2", denoisers=MIXTURE, mode_tokens=True)
    dataset, _ = _dataset(config, 64, count=n, seed=seed)
    kinds = [{R_ID: "R", S_ID: "S", X_ID: "X"}[dataset.example(e)[1][0]] for e in range(n)]
    total = sum(d.weight for d in MIXTURE)
    for d in MIXTURE:
        p = d.weight / total
        count = kinds.count(d.kind)
        assert abs(count - n * p) <= 4 * math.sqrt(n * p * (1 - p)), (d.kind, count, n * p, seed)


def test_without_mode_tokens_the_inputs_hold_none():
    config = SpanCorruptionConfig(objective="ul2", denoisers=MIXTURE)
    dataset, _ = _dataset(config, 64, count=200)
    firsts = {int(dataset.example(e)[1][0]) for e in range(200)}
    assert not firsts & {R_ID, S_ID, X_ID} and all(p.mode_token is None for p in dataset.denoisers)


@pytest.mark.parametrize("mode_tokens", [False, True])
def test_prefix_lm_mode_is_the_s_denoiser_alone(mode_tokens):
    config = SpanCorruptionConfig(objective="prefix_lm", noise_density=0.3, mode_tokens=mode_tokens)
    dataset, windows = _dataset(config, 50, count=400)
    read = 50 - mode_tokens
    bound = min(read - 1, round(2 * 0.3 * read))
    assert dataset.targets_length == bound + 1
    lengths = []
    for e in range(len(dataset)):
        tokens, inputs, targets = (a.tolist() for a in dataset.example(e))
        assert tokens == windows.tokens(e).tolist() and len(tokens) == read
        assert (inputs[0] == S_ID) == mode_tokens
        assert inputs[mode_tokens:-1] + targets[:-1] == tokens and inputs[-1] == targets[-1] == EOS
        assert len(inputs) <= 50
        lengths.append(len(targets) - 1)
    assert set(lengths) == set(range(1, bound + 1))


def test_the_default_objective_is_unchanged():
    """Plain span corruption: the generator of (seed, e) draws the T5 mask as before the mixture."""
    from data.span_corruption import corrupt, noise_mask

    config = SpanCorruptionConfig()
    assert config.fingerprint() == {"noise_density": 0.15, "mean_span": 3.0, "examples_per_row": 1, "extra_ids": 100}
    dataset, windows = _dataset(config, 64, count=20)
    for e in range(20):
        tokens = windows.tokens(e)
        mask = noise_mask(tokens.size, 0.15, 3.0, np.random.default_rng([7, e]))
        expected = corrupt(tokens, mask, VOCAB - 1, EOS)
        assert [a.tolist() for a in dataset.example(e)[1:]] == [a.tolist() for a in expected]


@pytest.mark.parametrize("changes,message", [
    (dict(objective="ul2"), "objective ul2 needs data.span_corruption.denoisers"),
    (dict(denoisers=[DenoiserConfig()]), "read only by objective ul2"),
    (dict(mode_tokens=True), "mode_tokens needs objective ul2 or prefix_lm"),
    (dict(objective="mix"), "objective must be span, ul2 or prefix_lm"),
    (dict(objective="ul2", denoisers=[DenoiserConfig("Q")]), r"denoisers\[0\].kind must be one of R, S, X"),
    (dict(objective="ul2", denoisers=[DenoiserConfig("X", 1.0)]), r"denoisers\[0\].noise_density"),
    (dict(objective="ul2", denoisers=[DenoiserConfig("R", 0.1, 0.5)]), r"denoisers\[0\].mean_span"),
    (dict(objective="ul2", denoisers=[DenoiserConfig(), DenoiserConfig(weight=0)]), r"denoisers\[1\].weight"),
    (dict(objective="ul2", denoisers=[DenoiserConfig("X", 0.5, 1.0)], extra_ids=8), r"denoisers\[0\] have 32 noise"),
])
def test_config_errors_are_clear(changes, message):
    with pytest.raises(DataError, match=message):
        SpanCorruptionDataset(Windows(1, 60), SpanCorruptionConfig(**changes), inputs_length=64, vocab_size=VOCAB,
                              eos_id=EOS, decoder_start_id=0, seed=0)


def test_the_yaml_tree_builds_the_mixture():
    tree = {"span_corruption": {"objective": "ul2", "mode_tokens": True, "denoisers": [
        {"kind": "R", "mean_span": 3}, {"kind": "S", "noise_density": 0.25, "weight": 0.5}]}}
    data = from_dict(DataConfig, tree)
    assert data.span_corruption.denoisers == [DenoiserConfig("R", 0.15, 3.0), DenoiserConfig("S", 0.25, weight=0.5)]
    with pytest.raises(ConfigError, match="kind"):
        from_dict(DataConfig, {"span_corruption": {"objective": "ul2", "denoisers": [{"kind": "Z"}]}})


class HighWindows(Windows):
    """Windows whose first token is the highest id below the mode tokens of a ``VOCAB`` model."""

    def tokens(self, e):
        return np.concatenate([[VOCAB - EXTRA - 4], super().tokens(e)[1:]])


def test_tokens_in_the_special_ids_are_refused():
    config = SpanCorruptionConfig(objective="ul2", denoisers=MIXTURE, mode_tokens=True)
    windows = HighWindows(5, 60)
    fits = SpanCorruptionDataset(windows, config, inputs_length=64, vocab_size=VOCAB, eos_id=EOS,
                                 decoder_start_id=0, seed=0)
    assert fits.example(0)[0][0] == VOCAB - EXTRA - 4
    with pytest.raises(DataError, match="vocab_size must be the tokenizer's size"):
        SpanCorruptionDataset(windows, config, inputs_length=64, vocab_size=VOCAB - 1, eos_id=EOS,
                              decoder_start_id=0, seed=0).example(0)


UL2 = SpanCorruptionConfig(objective="ul2", denoisers=MIXTURE, mode_tokens=True, examples_per_row=2)
MODEL = EncDecConfig(vocab_size=VOCAB, max_seq_len=96, max_target_len=96)


@pytest.fixture
def shards(token_files):
    lengths = np.random.default_rng(5).integers(5, 200, size=150).tolist()
    return token_files("corpus", lengths, start=10, eod=EOS)[0]


def _loader(prefix, dp_rank=0, dp=1, micro=2, span=UL2):
    data = DataConfig(paths=[prefix], split="1", seq_len=96, seed=7, num_workers=0, eod_id=EOS, span_corruption=span)
    return build_loader(data, "train", dp_rank=dp_rank, dp_size=dp, global_batch=4, micro_batch=micro,
                        num_samples=24, task=lambda *a: task(MODEL, *a))


def _rows(batches):
    keys = ("input_ids", "labels")
    return [tuple(b[k][r].tolist() for k in keys) for b in batches for r in range(b["labels"].shape[0])]


def test_ul2_rows_pack_their_examples_of_every_length(shards):
    data = DataConfig(paths=[shards], split="1", seq_len=96, seed=7, num_workers=0, eod_id=EOS, span_corruption=UL2)
    dataset, _ = task(MODEL, data, "train", None)
    longest = max(_expected(d, 48, 1)[2] for d in MIXTURE)
    assert dataset.targets_length == 2 * longest
    sizes = set()
    for i in range(len(dataset)):
        row = dataset[i]
        assert row["input_ids"].size == 96 and row["labels"].size == 2 * longest
        for j in range(2):
            _, inputs, targets = dataset.example(2 * i + j)
            sizes.add((inputs.size, targets.size))
            assert row["input_ids"][row["doc_ids"] == j + 1].tolist() == inputs.tolist()
            assert row["labels"][row["decoder_doc_ids"] == j + 1].tolist() == targets.tolist()
            assert row["decoder_input_ids"][row["decoder_doc_ids"] == j + 1].tolist() == [0, *targets[:-1].tolist()]
        assert row["loss_mask"].tolist() == (row["decoder_doc_ids"] > 0).astype(int).tolist()
        assert (row["labels"][row["loss_mask"] == 0] == 0).all()
    assert len(sizes) > 3


def test_ul2_rows_slice_over_ranks_and_resume_exactly(shards):
    whole = list(_loader(shards))
    rows = _rows(whole)
    assert len(rows) == 24 and {ids[0] for ids, _ in rows} <= {R_ID, S_ID, X_ID}
    assert len({ids[0] for ids, _ in rows}) == 3
    ranks = [list(_loader(shards, r, 2, 1)) for r in range(2)]
    interleaved = [b for step in range(6) for rank in ranks for b in rank[2 * step : 2 * step + 2]]
    assert _rows(interleaved) == rows
    first = _loader(shards)
    head = [b for _, b in zip(range(5), first)]
    resumed = _loader(shards)
    resumed.load_state_dict(first.state_dict())
    assert _rows(head + list(resumed)) == rows
    plain = _loader(shards, span=SpanCorruptionConfig(examples_per_row=2))
    with pytest.raises(Exception, match="span_corruption"):
        plain.load_state_dict(first.state_dict())


def test_t5_trains_on_a_ul2_mixture(cache, tmp_path):
    from tests.trainer.test_encdec_cli import SMALL

    env = dict(os.environ, PRETRAIN_CACHE=str(cache), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    mixture = ("[{kind: R, mean_span: 3, noise_density: 0.15, weight: 2}, {kind: X, mean_span: 32, "
               "noise_density: 0.5}, {kind: S, noise_density: 0.25}]")
    skipped = ("train.max_steps", "checkpoint.interval", "train.eval", "model.max_target_len")
    overrides = [o for o in SMALL if not o.startswith(skipped)]
    run = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "pretrain", "train", "--config", "t5-tiny", *overrides,
                    "train.max_steps=6", "train.eval_interval=0", "checkpoint.interval=0", "model.vocab_size=4199",
                    "model.max_target_len=64",
                    "data.span_corruption.objective=ul2", "data.span_corruption.mode_tokens=true",
                    f"data.span_corruption.denoisers={mixture}", f"run.dir={run}"],
                   env=env, check=True, capture_output=True, text=True)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and all(math.isfinite(v) for v in losses.values())
    assert losses[6] < losses[1] - 0.5


def test_an_encdec_config_reports_mixture_errors_at_load():
    from pretrain.config import load_config

    with pytest.raises(ConfigError, match="objective ul2 needs data.span_corruption.denoisers"):
        load_config("t5-tiny", ["data.span_corruption.objective=ul2"])
    config = load_config("t5-tiny", ["data.span_corruption.objective=prefix_lm"])
    assert config.data.span_corruption.mixture() == [DenoiserConfig("S", 0.15, 3.0)]


def test_generate_writes_mode_tokens_as_the_sentinels_beyond_extra_ids(cache):
    from data.span_corruption import decode_with_sentinels, encode_with_sentinels, mode_token_id
    from data.tokenizer import load_tokenizer
    from pretrain.builtin_data import prepare_builtin_corpus

    tokenizer = load_tokenizer(prepare_builtin_corpus(cache, log=lambda m: None).parent / "tokenizer" / "tokenizer.model")
    vocab = tokenizer.vocab_size + EXTRA + 3
    ids = encode_with_sentinels(tokenizer, "<extra_id_101> In the beginning <extra_id_0>", vocab)
    assert ids[0] == mode_token_id("S", vocab, EXTRA) == vocab - EXTRA - 2 and ids[-1] == vocab - 1
    text = decode_with_sentinels(tokenizer, [mode_token_id(k, vocab, EXTRA) for k in "RSX"], vocab)
    assert text == "<extra_id_100> <extra_id_101> <extra_id_102>"
