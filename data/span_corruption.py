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

``objective`` ``ul2`` (Tay et al. 2022) draws each example's denoiser from a weighted mixture
with the same generator (first draw: the denoiser; then its randomness): R and X denoisers are
span corruption at their own density and mean span, S is prefix-LM (inputs a prefix of the
window, targets the continuation, no sentinels). ``prefix_lm`` is the S denoiser alone. Each
denoiser reads the first ``raw_length`` tokens of the example's window that its longest inputs
fit in; windows are the longest of these. With ``mode_tokens`` the inputs start with the
denoiser's mode token, [R], [S] or [X]: ids ``vocab_size − extra_ids − 1, −2, −3``, just below
the sentinels.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from data.errors import DataError

PAD = 0


DENOISER_KINDS = ("R", "S", "X")
UL2_FIELDS = ("objective", "denoisers", "mode_tokens")


@dataclass
class DenoiserConfig:
    """One denoiser of a UL2 mixture (``data.span_corruption.denoisers[i]``). ``kind`` R or X: span
    corruption at ``noise_density`` and ``mean_span`` (the kind names the mode token); S:
    prefix-LM whose continuation is on average about ``noise_density`` of the window (``mean_span``
    unused). ``weight``: its share of the examples, relative to the other denoisers'."""

    kind: Literal["R", "S", "X"] = "R"
    noise_density: float = 0.15
    mean_span: float = 3.0
    weight: float = 1.0

    def problems(self, key: str) -> list[str]:
        errors = []
        if self.kind not in DENOISER_KINDS:
            errors.append(f"{key}.kind must be one of R, S, X, got {self.kind!r}")
        if not 0 < self.noise_density < 1:
            errors.append(f"{key}.noise_density must be in (0, 1), got {self.noise_density}")
        if self.kind != "S" and not self.mean_span >= 1:
            errors.append(f"{key}.mean_span must be >= 1, got {self.mean_span}")
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight) and self.weight > 0):
            errors.append(f"{key}.weight must be a finite number > 0, got {self.weight}")
        return errors


@dataclass
class SpanCorruptionConfig:
    """``data.span_corruption``: the objective of encoder-decoder runs (``data.seq_len`` is the
    encoder row length). ``objective``: ``span`` (T5), ``ul2`` (the ``denoisers`` mixture) or
    ``prefix_lm`` (the S denoiser alone, its continuation about ``noise_density`` of a window)."""

    noise_density: float = 0.15
    mean_span: float = 3.0
    examples_per_row: int = 1
    extra_ids: int = 100
    objective: Literal["span", "ul2", "prefix_lm"] = "span"
    denoisers: list[DenoiserConfig] = field(default_factory=list)
    mode_tokens: bool = False

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
        if self.objective not in ("span", "ul2", "prefix_lm"):
            errors.append(f"data.span_corruption.objective must be span, ul2 or prefix_lm, got {self.objective!r}")
        if self.objective == "ul2" and not self.denoisers:
            errors.append(
                "data.span_corruption.objective ul2 needs data.span_corruption.denoisers, a list such as "
                "[{kind: R, noise_density: 0.15, mean_span: 3}, {kind: X, noise_density: 0.5, mean_span: 32}, "
                "{kind: S, noise_density: 0.25}]"
            )
        if self.objective != "ul2" and self.denoisers:
            errors.append(
                f"data.span_corruption.denoisers is read only by objective ul2 (objective is {self.objective!r})"
            )
        if self.objective == "span" and self.mode_tokens:
            errors.append("data.span_corruption.mode_tokens needs objective ul2 or prefix_lm (objective is 'span')")
        for i, denoiser in enumerate(self.denoisers):
            errors += denoiser.problems(f"data.span_corruption.denoisers[{i}]")
        return errors

    def mixture(self) -> list[DenoiserConfig]:
        """The denoisers examples are drawn from: one for ``span`` and ``prefix_lm``."""
        if self.objective == "ul2":
            return list(self.denoisers)
        kind = "S" if self.objective == "prefix_lm" else "R"
        return [DenoiserConfig(kind, self.noise_density, self.mean_span)]

    def fingerprint(self) -> dict:
        """The settings a resumed loader must match (``span`` records no UL2 field, as before them)."""
        values = dataclasses.asdict(self)
        if self.objective == "span":
            for key in UL2_FIELDS:
                values.pop(key)
        return values


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


def continuation_bound(length: int, noise_density: float) -> int:
    """The longest continuation the S denoiser cuts from a window of ``length`` tokens: continuations
    are uniform over 1 .. min(L − 1, max(1, round(2 · noise_density · L))) tokens."""
    return min(length - 1, max(1, int(round(2 * length * noise_density))))


def prefix_lm(tokens: np.ndarray, continuation: int, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of prefix-LM: the first ``len − continuation`` tokens, then the rest; both
    end in EOS."""
    cut = tokens.size - continuation
    return np.append(tokens[:cut], eos_id).astype(np.int64), np.append(tokens[cut:], eos_id).astype(np.int64)


@dataclass(frozen=True)
class Denoiser:
    """A denoiser planned for examples of ``inputs_length`` input tokens: it reads the first
    ``raw_length`` tokens of a window and writes at most ``inputs`` and ``targets`` tokens."""

    config: DenoiserConfig
    mode_token: int | None
    raw_length: int
    inputs: int
    targets: int

    def apply(self, tokens: np.ndarray, first_sentinel: int, eos_id: int, rng: np.random.Generator):
        """(tokens read, inputs, targets) of a window."""
        tokens = tokens[: self.raw_length]
        c = self.config
        if c.kind == "S":
            continuation = int(rng.integers(1, continuation_bound(tokens.size, c.noise_density) + 1))
            inputs, targets = prefix_lm(tokens, continuation, eos_id)
        else:
            mask = noise_mask(tokens.size, c.noise_density, c.mean_span, rng)
            inputs, targets = corrupt(tokens, mask, first_sentinel, eos_id)
        if self.mode_token is not None:
            inputs = np.concatenate([[self.mode_token], inputs]).astype(np.int64)
        return tokens, inputs, targets


def mode_token_id(kind: str, vocab_size: int, extra_ids: int) -> int:
    """The id of mode token [R], [S] or [X]: the three ids below the ``extra_ids`` sentinels."""
    return vocab_size - extra_ids - 1 - DENOISER_KINDS.index(kind)


def plan_denoisers(config: SpanCorruptionConfig, inputs_length: int, vocab_size: int) -> list[Denoiser]:
    """The mixture of ``config`` planned for examples of ``inputs_length`` input tokens: each
    denoiser's window is the longest whose inputs (mode token included) fit."""
    planned = []
    for i, d in enumerate(config.mixture()):
        mode = mode_token_id(d.kind, vocab_size, config.extra_ids) if config.mode_tokens else None
        room = inputs_length - (mode is not None)
        if d.kind == "S":
            if room < 2:
                raise DataError(f"no prefix-LM window fits {inputs_length} input tokens; give each example more")
            raw, inputs, targets = room, room, continuation_bound(room, d.noise_density) + 1
        else:
            raw = raw_length(room, d.noise_density, d.mean_span)
            inputs, targets = corrupted_lengths(raw, d.noise_density, d.mean_span)
            spans = noise_counts(raw, d.noise_density, d.mean_span)[1]
            if spans > config.extra_ids:
                which = f" of data.span_corruption.denoisers[{i}]" if config.objective == "ul2" else ""
                raise DataError(
                    f"examples{which} have {spans} noise spans but data.span_corruption.extra_ids is "
                    f"{config.extra_ids}; raise extra_ids to >= {spans} (and model.vocab_size with it)"
                )
        planned.append(Denoiser(d, mode, raw, inputs + (mode is not None), targets))
    return planned


def choose(weights: np.ndarray, rng: np.random.Generator) -> int:
    """Index drawn with probability proportional to ``weights`` (no draw for a single one)."""
    if weights.size == 1:
        return 0
    bounds = np.cumsum(weights) / weights.sum()
    return min(int(np.searchsorted(bounds, rng.random(), side="right")), weights.size - 1)


class SpanCorruptionDataset:
    """Rows of ``examples_per_row`` examples (span-corrupted, or denoised by a UL2 mixture) over
    ``windows`` (a dataset whose samples hold ``input_ids`` and ``labels`` of ``raw_length − 1``
    tokens each: a GPT or blended dataset built with ``seq_len = raw_length − 1``)."""

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
        self.first_special = vocab_size - config.extra_ids - (len(DENOISER_KINDS) if config.mode_tokens else 0)
        if self.first_special <= max(eos_id, decoder_start_id):
            raise DataError(
                f"model.vocab_size {vocab_size} leaves no room for the tokenizer below the "
                f"{vocab_size - self.first_special} sentinel and mode ids"
            )
        k = config.examples_per_row
        self.denoisers = plan_denoisers(config, inputs_length // k, vocab_size)
        self.weights = np.array([d.config.weight for d in self.denoisers], dtype=np.float64)
        self.raw_length = max(d.raw_length for d in self.denoisers)
        self.example_inputs = max(d.inputs for d in self.denoisers)
        self.example_targets = max(d.targets for d in self.denoisers)
        self.targets_length = k * self.example_targets

    def __len__(self) -> int:
        return len(self.windows) // self.config.examples_per_row

    @property
    def datasets(self) -> list:
        """The GPT datasets read (their sources' token dtype sets the loader's transport)."""
        return self.windows.datasets

    def example(self, e: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens read, inputs, targets) of example ``e``."""
        sample = self.windows[e]
        tokens = np.concatenate([sample["input_ids"], sample["labels"][-1:]]).astype(np.int64)
        if tokens.size and tokens.max() >= self.first_special:
            modes = " + 3 mode tokens" if self.config.mode_tokens else ""
            raise DataError(
                f"example {e} holds token {tokens.max()}, a sentinel or mode id: model.vocab_size must be the "
                f"tokenizer's size + data.span_corruption.extra_ids{modes}"
            )
        rng = np.random.default_rng([self.seed, e])
        denoiser = self.denoisers[choose(self.weights, rng)]
        return denoiser.apply(tokens, self.first_sentinel, self.eos_id, rng)

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
    from data.loader import build_dataset, data_fingerprint

    span = config.span_corruption
    errors = span.problems(config.seq_len)
    if errors:
        raise DataError("; ".join(errors))
    k = span.examples_per_row
    raw = max(d.raw_length for d in plan_denoisers(span, config.seq_len // k, vocab_size))
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
    fingerprint = {**data_fingerprint(window_config, windows, split_name), "span_corruption": span.fingerprint(),
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
