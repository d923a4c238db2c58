"""T5 span corruption over the GPT sample index (Raffel et al. 2020; ../shared/REFERENCES.md §5).

Each example is one raw window of the blended GPT dataset (data/blend.py): the same shards,
shuffling, epochs and blending as decoder pretraining, with windows of ``raw_length`` tokens
(``seq_len = raw_length − 1`` for the GPT index). Of a window of L tokens,

    n_noise = round(L · noise_density) clipped to [1, L − 1],  n_spans = max(1, round(n_noise / mean_span)),

the noise tokens are cut into ``n_spans`` spans of random positive lengths, the other tokens
into ``n_spans`` runs, interleaved run₀ span₀ run₁ span₁ ... (a window starts with a kept run).
Inputs replace span j by sentinel j; targets are sentinel j then span j, for every j; both end
in EOS. Sentinel j is token ``vocab_size − 1 − j`` (T5's extra ids, the last ``extra_ids`` of
the model's vocabulary; :func:`sentinel_text` writes them ``<extra_id_j>``).

``raw_length`` is the largest L whose inputs fit the per-example input length: 568 raw tokens →
512 inputs and 114 targets at the defaults.

A row packs ``examples_per_row`` consecutive examples: row i holds examples i·k .. i·k + k − 1,
the encoder row is their inputs (padded to ``inputs_length`` with segment 0), the decoder row
their targets, each shifted right behind ``decoder_start_id``. Segment ids number the examples
from 1 and positions restart per example, so no attention crosses examples
(models/encdec/model.py). The random spans of example e come from a generator seeded by
(seed, e): any rank reading any row at any time gets the same example, so DP slicing and resume
are those of the GPT loader (data/loader.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from data.errors import DataError

PAD = 0


@dataclass
class SpanCorruptionConfig:
    """``data.span_corruption``: the objective of encoder-decoder runs (``data.seq_len`` is the
    encoder row length)."""

    noise_density: float = 0.15
    mean_span: float = 3.0
    examples_per_row: int = 1
    extra_ids: int = 100

    def problems(self, seq_len: int) -> list[str]:
        errors = []
        if not 0 < self.noise_density < 1:
            errors.append(f"data.span_corruption.noise_density must be in (0, 1), got {self.noise_density}")
        if not self.mean_span >= 1:
            errors.append(f"data.span_corruption.mean_span must be >= 1, got {self.mean_span}")
        if self.examples_per_row < 1 or seq_len // max(1, self.examples_per_row) < 4:
            errors.append(
                f"data.span_corruption.examples_per_row ({self.examples_per_row}) must be >= 1 and leave each "
                f"example at least 4 of data.seq_len={seq_len} input tokens"
            )
        return errors


def noise_counts(length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a window of ``length`` tokens."""
    n_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    return n_noise, max(1, int(round(n_noise / mean_span)))


def corrupted_lengths(length: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(inputs, targets) lengths, EOS included, of a window of ``length`` tokens."""
    n_noise, n_spans = noise_counts(length, noise_density, mean_span)
    return length - n_noise + n_spans + 1, n_noise + n_spans + 1


def raw_length(inputs_length: int, noise_density: float, mean_span: float) -> int:
    """The largest window whose corrupted inputs fit in ``inputs_length`` tokens."""
    length = 2
    while corrupted_lengths(length + 1, noise_density, mean_span)[0] <= inputs_length:
        length += 1
    if corrupted_lengths(length, noise_density, mean_span)[0] > inputs_length:
        raise DataError(f"no window fits {inputs_length} input tokens; give each example more input tokens")
    return length


def random_segmentation(n_items: int, n_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of ``n_segments`` positive parts of ``n_items``, uniform over the compositions."""
    cuts = np.sort(rng.choice(np.arange(1, n_items), size=n_segments - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [n_items]]))


def noise_mask(length: int, noise_density: float, mean_span: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean [length]: True at noise tokens (``n_spans`` spans, the first token kept)."""
    n_noise, n_spans = noise_counts(length, noise_density, mean_span)
    noise = random_segmentation(n_noise, n_spans, rng)
    kept = random_segmentation(length - n_noise, n_spans, rng)
    runs = np.stack([kept, noise], axis=1).reshape(-1)
    return np.repeat(np.tile([False, True], n_spans), runs)


def corrupt(tokens: np.ndarray, mask: np.ndarray, first_sentinel: int, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of ``tokens`` under noise ``mask``, sentinels counting down from
    ``first_sentinel``: inputs keep the kept tokens with a sentinel per span, targets the noise
    tokens with each span's sentinel before it."""
    starts = mask & ~np.concatenate([[False], mask[:-1]])
    sentinels = first_sentinel - (np.cumsum(starts) - 1)
    inputs = np.where(starts, sentinels, tokens)[~mask | starts]
    targets = np.insert(tokens[mask], np.flatnonzero(starts[mask]), sentinels[starts])
    return np.append(inputs, eos_id).astype(np.int64), np.append(targets, eos_id).astype(np.int64)


def sentinel_text(token_id: int, vocab_size: int, extra_ids: int) -> str | None:
    """``<extra_id_j>`` for sentinel ids (the last ``extra_ids`` of the vocabulary), else None."""
    j = vocab_size - 1 - token_id
    return f"<extra_id_{j}>" if 0 <= j < extra_ids else None


class SpanCorruptionDataset:
    """Rows of ``examples_per_row`` span-corrupted examples over ``windows`` (a dataset whose
    samples hold ``input_ids`` and ``labels`` of ``raw_length − 1`` tokens each: a GPT or
    blended dataset built with ``seq_len = raw_length − 1``)."""

    def __init__(
        self, windows, config: SpanCorruptionConfig, *, inputs_length: int, vocab_size: int, eos_id: int,
        decoder_start_id: int, seed: int,
    ):
        errors = config.problems(inputs_length)
        if errors:
            raise DataError("; ".join(errors))
        self.windows, self.config, self.seed = windows, config, seed
        self.inputs_length, self.eos_id, self.decoder_start_id = inputs_length, eos_id, decoder_start_id
        self.first_sentinel = vocab_size - 1
        k = config.examples_per_row
        self.raw_length = raw_length(inputs_length // k, config.noise_density, config.mean_span)
        self.example_inputs, self.example_targets = corrupted_lengths(
            self.raw_length, config.noise_density, config.mean_span
        )
        self.targets_length = k * self.example_targets
        spans = noise_counts(self.raw_length, config.noise_density, config.mean_span)[1]
        if spans > config.extra_ids:
            raise DataError(
                f"examples have {spans} noise spans but data.span_corruption.extra_ids is {config.extra_ids}; "
                f"raise extra_ids to >= {spans} (and model.vocab_size with it)"
            )

    def __len__(self) -> int:
        return len(self.windows) // self.config.examples_per_row

    @property
    def datasets(self) -> list:
        """The GPT datasets read (their sources' token dtype sets the loader's transport)."""
        return self.windows.datasets

    def example(self, e: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(raw window, inputs, targets) of example ``e``."""
        sample = self.windows[e]
        tokens = np.concatenate([sample["input_ids"], sample["labels"][-1:]]).astype(np.int64)
        rng = np.random.default_rng([self.seed, e])
        mask = noise_mask(tokens.size, self.config.noise_density, self.config.mean_span, rng)
        return (tokens, *corrupt(tokens, mask, self.first_sentinel, self.eos_id))

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        k = self.config.examples_per_row
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} out of range for {len(self)} rows")
        enc, dec = [], []
        for j in range(k):
            _, inputs, targets = self.example(i * k + j)
            enc.append((inputs, j + 1))
            dec.append((targets, j + 1))
        row = {}
        for prefix, parts, length in (("", enc, self.inputs_length), ("decoder_", dec, self.targets_length)):
            ids = np.full(length, PAD, dtype=np.int64)
            positions = np.zeros(length, dtype=np.int64)
            segments = np.zeros(length, dtype=np.int64)
            at = 0
            for tokens, segment in parts:
                ids[at : at + tokens.size] = tokens
                positions[at : at + tokens.size] = np.arange(tokens.size)
                segments[at : at + tokens.size] = segment
                at += tokens.size
            row[f"{prefix}position_ids"], row[f"{prefix}doc_ids"] = positions, segments
            if prefix:
                labels = ids
                shifted = np.concatenate([[self.decoder_start_id], ids[:-1]])
                shifted[np.flatnonzero(np.diff(segments, prepend=-1))] = self.decoder_start_id
                row["decoder_input_ids"], row["labels"] = shifted, labels
                row["loss_mask"] = (segments > 0).astype(np.int64)
            else:
                row["input_ids"] = ids
        return row


def build_span_corruption(
    config, split_name: str, num_samples: int | None, *, vocab_size: int, decoder_start_id: int
) -> tuple[SpanCorruptionDataset, dict]:
    """The span-corruption rows of one split of ``config`` (a ``data.loader.DataConfig``;
    ``num_samples`` rows, None: one epoch of windows) and the fingerprint a resumed loader
    must match."""
    import dataclasses

    from data.loader import build_dataset, data_fingerprint

    span = config.span_corruption
    errors = span.problems(config.seq_len)
    if errors:
        raise DataError("; ".join(errors))
    k = span.examples_per_row
    raw = raw_length(config.seq_len // k, span.noise_density, span.mean_span)
    window_config = dataclasses.replace(config, seq_len=raw - 1)
    windows = build_dataset(window_config, split_name, None if num_samples is None else num_samples * k)
    eos = config.eod_id
    if eos is None:
        recorded = {ds.eod_id for ds in windows.datasets} - {None}
        if len(recorded) != 1:
            raise DataError("span corruption needs the tokenizer's EOS id: set data.eod_id (no manifest records one)")
        eos = recorded.pop()
    dataset = SpanCorruptionDataset(
        windows, span, inputs_length=config.seq_len, vocab_size=vocab_size, eos_id=eos,
        decoder_start_id=decoder_start_id, seed=config.seed,
    )
    fingerprint = {**data_fingerprint(window_config, windows, split_name), "span_corruption": dataclasses.asdict(span),
                   "rows": [config.seq_len, dataset.targets_length], "vocab_size": vocab_size}
    return dataset, fingerprint


_SENTINEL = re.compile(r"<extra_id_(\d+)>")


def encode_with_sentinels(tokenizer, text: str, vocab_size: int) -> list[int]:
    """Token ids of ``text`` with each ``<extra_id_j>`` as sentinel j (id ``vocab_size − 1 − j``)."""
    extra = vocab_size - tokenizer.vocab_size
    ids, at = [], 0
    for match in _SENTINEL.finditer(text):
        j = int(match.group(1))
        if not 0 <= j < extra:
            raise DataError(f"{match.group(0)}: this model has {extra} sentinel extra ids (<extra_id_0> .. <extra_id_{extra - 1}>)")
        if text[at : match.start()].strip():
            ids += tokenizer.encode(text[at : match.start()])
        ids.append(vocab_size - 1 - j)
        at = match.end()
    if text[at:].strip():
        ids += tokenizer.encode(text[at:])
    return ids


def decode_with_sentinels(tokenizer, ids: list[int], vocab_size: int) -> str:
    """Text of ``ids``, sentinels written ``<extra_id_j>``."""
    extra = vocab_size - tokenizer.vocab_size
    pieces, run = [], []
    for token in ids:
        marker = sentinel_text(token, vocab_size, extra)
        if marker is None:
            run.append(token)
            continue
        if run:
            pieces.append(tokenizer.decode(run))
        pieces.append(marker)
        run = []
    if run:
        pieces.append(tokenizer.decode(run))
    return " ".join(piece.strip() for piece in pieces if piece.strip())
