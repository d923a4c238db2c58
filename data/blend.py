"""Weighted blends of GPT datasets with megatron-core's deterministic greedy interleave.

Weights ``w`` are normalised to sum to 1 (float64). Served sample ``i`` comes from source
``argmax_d (w_d * max(i, 1) - count_d)`` (the lowest ``d`` on ties), where ``count_d`` is how
many of the first ``i`` samples came from ``d``; it is source ``d``'s next unused sample
(``count_d``). This is megatron-core's ``build_blending_indices`` rule: the realised counts stay
within a sample or two of ``w_d * n`` at every prefix ``n``, and the order of the first ``n``
samples does not depend on how many are built, so a run can be extended.

A source asked for more samples than one epoch of its split holds is an error unless
``allow_repeat`` is set; then it repeats over as many reshuffled epochs as it needs.
"""

from __future__ import annotations

import numbers
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from data.errors import DataError
from data.gpt_dataset import GPTDataset, TokenSource
from data.sample_index import INDEX_VERSION, cached_arrays, samples_in_epochs, split_document_ranges


def normalize_weights(weights: Sequence[float]) -> list[float]:
    w = np.array([float(x) for x in weights], dtype=np.float64)
    if w.size == 0 or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise DataError(f"blend weights must be finite, non-negative and not all zero, got {list(weights)}")
    return (w / np.sum(w)).tolist()


def _is_number(value) -> bool:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return True
    try:
        float(value)
        return not Path(str(value)).exists()
    except (TypeError, ValueError):
        return False


def parse_blend(paths) -> tuple[list, list[float] | None]:
    """Data paths -> ``(sources, weights or None)``. Accepted: one path; a list of paths (weights
    from token counts); Megatron's flat ``["0.7", "a", "0.3", "b"]``; ``[(0.7, "a"), ...]`` or
    ``[{"weight": 0.7, "path": "a"}, ...]``; ``{"a": 0.7, "b": 0.3}``. A source is a prefix, a
    shard directory, or a list of those read as one dataset."""
    if isinstance(paths, (str, os.PathLike)):
        return [str(paths)], None
    if isinstance(paths, dict):
        return list(paths.keys()), [float(v) for v in paths.values()]
    items = list(paths)
    if not items:
        raise DataError("no data paths given; set DataConfig.paths to .bin/.idx prefixes or shard directories")
    if all(isinstance(x, dict) for x in items):
        try:
            return [x["path"] for x in items], [float(x["weight"]) for x in items]
        except KeyError as e:
            raise DataError(f"weighted data path entries need 'path' and 'weight', missing {e}") from None
    if all(isinstance(x, (tuple, list)) and len(x) == 2 and _is_number(x[0]) for x in items):
        return [x[1] for x in items], [float(x[0]) for x in items]
    if len(items) % 2 == 0 and all(_is_number(x) for x in items[::2]) and not any(_is_number(x) for x in items[1::2]):
        return list(items[1::2]), [float(x) for x in items[::2]]
    if any(_is_number(x) for x in items):
        raise DataError(
            f"data paths {items} mix weights and paths inconsistently; give either only paths, or "
            "alternating weight, path pairs like ['0.7', 'a', '0.3', 'b']"
        )
    return items, None


def build_blend_index(weights: Sequence[float], num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """``(dataset_index int16[n], dataset_sample_index int64[n])`` by the greedy rule above.

    One step per sample in plain Python (about 0.2 us per source and sample); the result is
    cached on disk by :class:`BlendedDataset`, so it is paid once per blend and length.
    """
    w = normalize_weights(weights)
    n, num = int(num_samples), len(w)
    if num > np.iinfo(np.int16).max:
        raise DataError(f"at most {np.iinfo(np.int16).max} blend sources, got {num}")
    if num == 1:
        return np.zeros(n, dtype=np.int16), np.arange(n, dtype=np.int64)
    counts = [0] * num
    choice = bytearray(n) if num < 256 else [0] * n
    sources = range(1, num)
    for i in range(n):
        t = float(i) if i > 1 else 1.0
        best, best_error = 0, w[0] * t - counts[0]
        for d in sources:
            error = w[d] * t - counts[d]
            if error > best_error:
                best, best_error = d, error
        choice[i] = best
        counts[best] += 1
    dataset_index = np.frombuffer(choice, dtype=np.uint8).astype(np.int16) if num < 256 else np.array(choice, np.int16)
    return dataset_index, sample_numbers(dataset_index, num)


def sample_numbers(dataset_index: np.ndarray, num_sources: int) -> np.ndarray:
    """For each position, how many earlier positions chose the same source (vectorised)."""
    out = np.empty(dataset_index.size, dtype=np.int64)
    for d in range(num_sources):
        where = np.flatnonzero(dataset_index == d)
        out[where] = np.arange(where.size)
    return out


class BlendedDataset:
    """Samples from several :class:`GPTDataset` sources in blend order; sample dicts gain
    ``dataset_id``. Build it with :func:`build_blended_dataset`."""

    def __init__(self, datasets: list[GPTDataset], weights: list[float], dataset_index, dataset_sample_index) -> None:
        self.datasets, self.weights = datasets, weights
        self.dataset_index, self.dataset_sample_index = dataset_index, dataset_sample_index

    def __len__(self) -> int:
        return int(self.dataset_index.size)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        d = int(self.dataset_index[i])
        sample = self.datasets[d][int(self.dataset_sample_index[i])]
        sample["dataset_id"] = np.int64(d)
        return sample


def build_blended_dataset(
    sources: list[TokenSource],
    weights: Sequence[float] | None,
    seq_len: int,
    *,
    seed: int = 1234,
    split: str | Sequence[float] = "1",
    split_name: str = "train",
    num_samples: int | None = None,
    allow_repeat: bool = False,
    cache_dir: str | os.PathLike | None = None,
    **sample_options,
) -> BlendedDataset:
    """Blend ``sources`` (weights ``None`` = proportional to each split's tokens) into
    ``num_samples`` samples (``None``: as many as fit without repeating any source).

    Capacity is checked before any index is built; ``sample_options`` go to :class:`GPTDataset`.
    """
    if weights is not None and len(weights) != len(sources):
        raise DataError(f"{len(weights)} blend weights for {len(sources)} data sources; give one weight per source")
    tokens, capacity = [], []
    for source in sources:
        begin, end = split_document_ranges(len(source), split)[split_name]
        tokens.append(int(source.sizes[begin:end].sum(dtype=np.int64)))
        capacity.append(samples_in_epochs(tokens[-1], 1, seq_len))
    w = normalize_weights(tokens if weights is None else weights)
    for d, t in enumerate(tokens):
        if w[d] > 0 and t < seq_len + 1:
            raise DataError(
                f"the {split_name} split of source {d} ({sources[d].paths}) has {t} tokens, fewer than one "
                f"sample of seq_len+1 = {seq_len + 1}; give it a larger split share or drop it from the blend"
            )
    if num_samples is None:
        limit = min(capacity[d] / w[d] for d in range(len(w)) if w[d] > 0)
        dataset_index, _ = build_blend_index(w, int(limit) + 2 * len(w))
        cut = min(_first_excess(dataset_index, d, capacity[d]) for d in range(len(w)))
        dataset_index = dataset_index[:cut]
        num_samples = int(cut)
    elif not allow_repeat:
        for d in range(len(w)):
            if w[d] * num_samples > capacity[d] + 2:
                needed = int(np.ceil(w[d] * num_samples))
                raise _oversample_error(sources, d, needed, capacity[d], split_name, seq_len, tokens[d])
    description = {"kind": "blend", "version": INDEX_VERSION, "weights": w, "num_samples": int(num_samples)}
    arrays, _ = cached_arrays(
        cache_dir,
        "blend",
        description,
        lambda: dict(zip(("dataset_index", "dataset_sample_index"), build_blend_index(w, num_samples))),
    )
    counts = np.bincount(arrays["dataset_index"], minlength=len(w))
    for d, count in enumerate(counts):
        if count > capacity[d] and not allow_repeat:
            raise _oversample_error(sources, d, int(count), capacity[d], split_name, seq_len, tokens[d])
    datasets = [
        GPTDataset(
            source, seq_len, seed=seed, split=split, split_name=split_name,
            num_samples=max(int(counts[d]), 1), cache_dir=cache_dir, **sample_options,
        )
        for d, source in enumerate(sources)
    ]
    return BlendedDataset(datasets, w, arrays["dataset_index"], arrays["dataset_sample_index"])


def _first_excess(dataset_index: np.ndarray, d: int, capacity: int) -> int:
    where = np.flatnonzero(dataset_index == d)
    return int(where[capacity]) if where.size > capacity else int(dataset_index.size)


def _oversample_error(sources, d, needed, available, split_name, seq_len, tokens) -> DataError:
    return DataError(
        f"blend source {d} ({sources[d].paths}) must supply {needed} {split_name} samples but one epoch "
        f"of it holds only {available} ({tokens} tokens at seq_len {seq_len}). Set data.allow_repeat=true "
        "to repeat it over reshuffled epochs, or lower its weight, add data, or train on fewer samples"
    )
