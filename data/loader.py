"""Distributed, stateful loading of GPT samples: what the trainer calls.

Global batch ``b`` is served samples ``[b*G, (b+1)*G)`` of the blended dataset. Data-parallel
rank ``r`` of ``dp`` gets the contiguous slice ``[b*G + r*G/dp, b*G + (r+1)*G/dp)``, cut into
micro-batches of ``m``. The loader's state is ``{fingerprint, consumed_samples}``: samples of the
global stream consumed by all ranks together (``m * dp`` per micro-batch yielded). Resuming from
it continues exactly; at a global-batch boundary the data-parallel degree and micro-batch size
may change (same ``G``) and the global sequence of samples is unchanged. The sampler lives in the
main process; DataLoader workers only read and collate the samples they are handed.
"""

from __future__ import annotations

import functools
import signal
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from data.blend import BlendedDataset, build_blended_dataset, parse_blend
from data.errors import DataError
from data.gpt_dataset import TokenSource
from data.span_corruption import SpanCorruptionConfig

STATE_VERSION = 1


@dataclass
class DataConfig:
    """Data settings embedded in the trainer's config tree.

    ``paths``: see :func:`data.blend.parse_blend` (prefixes or shard directories, optionally
    weighted). ``split``: train/valid/test document ratios such as ``"969,30,1"``. ``eod_id``: the
    tokenizer's EOS id, needed by ``eod_mask_loss`` (default: the one the shard manifests
    record). ``tokenizer_fingerprint``: when set, every
    source's manifest must carry this fingerprint. ``cache_dir``: where index arrays are cached
    (``None``: built in memory by every process).
    """

    paths: list = field(default_factory=list)
    split: str = "969,30,1"
    seq_len: int = 2048
    seed: int = 1234
    eod_id: int | None = None
    eod_mask_loss: bool = False
    mask_document_boundary: bool = True
    allow_repeat: bool = False
    cache_dir: str | None = None
    num_workers: int = 2
    prefetch_factor: int = 4
    pin_memory: bool = False
    tokenizer_fingerprint: str | None = None
    span_corruption: SpanCorruptionConfig = field(default_factory=SpanCorruptionConfig)


def open_sources(config: DataConfig) -> tuple[list[TokenSource], list[float] | None]:
    """Open (and check) the data sources of ``config`` without building any index."""
    paths, weights = parse_blend(config.paths)
    sources = [TokenSource(p) for p in paths]
    if config.tokenizer_fingerprint is not None:
        for source in sources:
            if source.tokenizer_fingerprint not in (None, config.tokenizer_fingerprint):
                raise DataError(
                    f"data {source.paths} was tokenized with {source.tokenizer_fingerprint} but the run uses "
                    f"{config.tokenizer_fingerprint}; re-run preprocessing with the run's tokenizer or fix "
                    "DataConfig.tokenizer_fingerprint"
                )
    return sources, weights


def build_dataset(config: DataConfig, split_name: str = "train", num_samples: int | None = None) -> BlendedDataset:
    """The blended dataset of one split (``num_samples=None``: all samples that fit in one epoch)."""
    sources, weights = open_sources(config)
    eod_id = config.eod_id
    if eod_id is None:
        recorded = {s.eod_id for s in sources} - {None}
        eod_id = recorded.pop() if len(recorded) == 1 else None
    return build_blended_dataset(
        sources,
        weights,
        config.seq_len,
        seed=config.seed,
        split=config.split,
        split_name=split_name,
        num_samples=num_samples,
        allow_repeat=config.allow_repeat,
        cache_dir=config.cache_dir,
        eod_id=eod_id,
        mask_document_boundary=config.mask_document_boundary,
        eod_mask_loss=config.eod_mask_loss,
    )


def data_fingerprint(config: DataConfig, dataset: BlendedDataset, split_name: str) -> dict:
    """What must match for a saved loader state to be resumable."""
    return {
        "data": [ds.source.fingerprint for ds in dataset.datasets],
        "tokenizer": [ds.source.tokenizer_fingerprint or config.tokenizer_fingerprint for ds in dataset.datasets],
        "seq_len": config.seq_len,
        "seed": config.seed,
        "split": f"{split_name}:{config.split}",
        "weights": [round(w, 12) for w in dataset.weights],
    }


SAMPLE_KEYS = ("input_ids", "labels", "position_ids", "doc_ids", "loss_mask")


def collate(samples: list[dict], dtype=np.int64) -> tuple[np.ndarray, np.ndarray]:
    """Pack sample dicts into one array ``[5, micro_batch, S]`` plus the ``dataset_id`` vector.

    Workers pack as int32 (every field fits): one array of half the bytes crosses the process
    boundary, which measured cheaper per batch than torch's shared-memory tensors (see
    docs/data-loading.md); :func:`unpack` widens to int64 in the main process.
    """
    ids = np.array([sample.get("dataset_id", 0) for sample in samples], dtype=np.int64)
    if set(samples[0]) - {"dataset_id"} != set(SAMPLE_KEYS):  # other tasks' samples: one array per key
        keys = [key for key in samples[0] if key != "dataset_id"]
        return {key: np.stack([sample[key] for sample in samples]).astype(dtype, copy=False) for key in keys}, ids
    packed = np.empty((len(SAMPLE_KEYS), len(samples), samples[0]["labels"].size), dtype=dtype)
    for j, sample in enumerate(samples):
        for k, key in enumerate(SAMPLE_KEYS):
            packed[k, j] = sample[key]
    return packed, ids


def unpack(batch: tuple[np.ndarray, np.ndarray]) -> dict[str, torch.Tensor]:
    """:func:`collate`'s output as a dict of int64 tensors ``[micro_batch, S]`` (``dataset_id``:
    ``[micro_batch]``)."""
    packed, ids = batch
    if isinstance(packed, dict):
        return {**{k: torch.as_tensor(v).to(torch.int64) for k, v in packed.items()}, "dataset_id": torch.as_tensor(ids)}
    tensor = torch.as_tensor(packed).to(torch.int64)
    return {**dict(zip(SAMPLE_KEYS, tensor.unbind(0))), "dataset_id": torch.as_tensor(ids)}


def collate_tensors(samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`collate` as int64 tensors, for DataLoader's memory-pinning thread."""
    packed, ids = collate(samples)
    if isinstance(packed, dict):
        return {k: torch.from_numpy(v) for k, v in packed.items()}, torch.from_numpy(ids)
    return torch.from_numpy(packed), torch.from_numpy(ids)


class RankBatchSampler:
    """This rank's micro-batches (lists of global sample indices) from ``start`` to ``end``."""

    def __init__(self, start: int, end: int, global_batch: int, dp_rank: int, dp_size: int, micro_batch: int) -> None:
        self.start, self.end = start, end
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.slice = global_batch // dp_size
        self.rank_offset = dp_rank * self.slice
        self.step = micro_batch * dp_size

    def __len__(self) -> int:
        return max(0, (self.end - self.start) // self.step)

    def __iter__(self) -> Iterator[list[int]]:
        for consumed in range(self.start, self.end, self.step):
            batch, rest = divmod(consumed, self.global_batch)
            first = batch * self.global_batch + self.rank_offset + (rest // self.step) * self.micro_batch
            yield list(range(first, first + self.micro_batch))


class StatefulLoader:
    """Iterates this rank's micro-batches (dicts of int64 tensors) and tracks consumed samples.

    ``state_dict()`` / ``load_state_dict()`` save and restore the position; call
    ``load_state_dict`` before iterating. Iteration stops after the last full global batch.
    """

    def __init__(
        self,
        dataset,
        fingerprint: dict,
        *,
        dp_rank: int,
        dp_size: int,
        global_batch: int,
        micro_batch: int,
        num_samples: int | None = None,
        num_workers: int = 0,
        prefetch_factor: int = 4,
        pin_memory: bool = False,
    ) -> None:
        check_layout(dp_rank, dp_size, global_batch, micro_batch)
        self.dataset, self.fingerprint = dataset, fingerprint
        self.dp_rank, self.dp_size, self.global_batch, self.micro_batch = dp_rank, dp_size, global_batch, micro_batch
        available = len(dataset) if num_samples is None else min(num_samples, len(dataset))
        self.total_samples = available // global_batch * global_batch
        self.num_workers, self.prefetch_factor, self.pin_memory = num_workers, prefetch_factor, pin_memory
        self.consumed_samples = 0
        sources = [ds.source for ds in getattr(dataset, "datasets", [])]
        narrow = sources and all(np.dtype(s.dtype).itemsize <= 4 for s in sources)
        self.transport_dtype = np.int32 if narrow else np.int64

    def __len__(self) -> int:
        """Micro-batches left for this rank."""
        return len(self._sampler())

    def _sampler(self) -> RankBatchSampler:
        return RankBatchSampler(
            self.consumed_samples, self.total_samples, self.global_batch, self.dp_rank, self.dp_size, self.micro_batch
        )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        sampler = self._sampler()
        if self.num_workers == 0:
            batches = (collate([self.dataset[i] for i in indices]) for indices in sampler)
        else:
            batches = DataLoader(
                self.dataset,
                batch_sampler=sampler,
                num_workers=self.num_workers,
                collate_fn=(
                    collate_tensors if self.pin_memory else functools.partial(collate, dtype=self.transport_dtype)
                ),
                prefetch_factor=self.prefetch_factor,
                pin_memory=self.pin_memory,
                worker_init_fn=ignore_stop_signals,
            )
        for batch in batches:
            self.consumed_samples += self.micro_batch * self.dp_size
            yield unpack(batch)

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint,
            "consumed_samples": self.consumed_samples,
            "layout": {"global_batch": self.global_batch, "dp_size": self.dp_size, "micro_batch": self.micro_batch},
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError(
                f"loader state version {state.get('version')} is not {STATE_VERSION}; it is from another release"
            )
        saved = state["fingerprint"]
        differ = [k for k in sorted(set(saved) | set(self.fingerprint)) if saved.get(k) != self.fingerprint.get(k)]
        if differ:
            detail = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {self.fingerprint.get(k)!r}" for k in differ)
            raise DataError(
                f"refusing to resume the data stream: {', '.join(differ)} differ ({detail}). Resume with the "
                "checkpoint's data config, or load the checkpoint without its data state to start a new stream"
            )
        consumed = int(state["consumed_samples"])
        if consumed % (self.micro_batch * self.dp_size):
            raise DataError(
                f"consumed_samples {consumed} is not a multiple of micro_batch*dp_size = "
                f"{self.micro_batch * self.dp_size}; resume with the layout it was saved with ({state['layout']})"
            )
        layout = state["layout"]
        same = layout == {"global_batch": self.global_batch, "dp_size": self.dp_size, "micro_batch": self.micro_batch}
        if consumed % self.global_batch and not same:
            raise DataError(
                f"the state was saved inside a global batch ({consumed} samples consumed) with layout {layout}; "
                "a different data-parallel layout can only resume at a global-batch boundary"
            )
        self.consumed_samples = consumed


def ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGTERM/SIGUSR1 to the training process: schedulers signal the whole
    process group, and a worker dying first would crash the trainer before it can checkpoint.
    Workers still end with their parent (torch kills them when it exits)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def check_layout(dp_rank: int, dp_size: int, global_batch: int, micro_batch: int) -> None:
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise DataError(f"dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
    if micro_batch < 1 or global_batch < 1 or global_batch % (dp_size * micro_batch):
        raise DataError(
            f"global_batch {global_batch} must be a positive multiple of dp_size*micro_batch = "
            f"{dp_size}*{micro_batch}; change global_batch or micro_batch"
        )


def build_loader(
    config: DataConfig,
    split_name: str,
    *,
    dp_rank: int,
    dp_size: int,
    global_batch: int,
    micro_batch: int,
    num_samples: int | None = None,
    task=None,
) -> StatefulLoader:
    """A loader over ``split_name``: ``num_samples`` (``None``: one pass over the split) rounded
    down to whole global batches. ``task(config, split_name, num_samples)`` → (dataset,
    fingerprint) builds another task's samples (a model family's, e.g. span corruption) than
    GPT windows."""
    check_layout(dp_rank, dp_size, global_batch, micro_batch)
    if config.num_workers < 0:
        raise DataError(f"num_workers must be >= 0, got {config.num_workers}")
    if task is None:
        dataset = build_dataset(config, split_name, num_samples)
        fingerprint = data_fingerprint(config, dataset, split_name)
    else:
        dataset, fingerprint = task(config, split_name, num_samples)
    return StatefulLoader(
        dataset,
        fingerprint,
        dp_rank=dp_rank,
        dp_size=dp_size,
        global_batch=global_batch,
        micro_batch=micro_batch,
        num_samples=num_samples,
        num_workers=config.num_workers,
        prefetch_factor=config.prefetch_factor,
        pin_memory=config.pin_memory,
    )


def build_train_loader(
    config: DataConfig, *, dp_rank: int, dp_size: int, global_batch: int, micro_batch: int, train_samples: int | None
) -> StatefulLoader:
    """The training loader: ``train_samples`` = steps * global_batch (``None``: one epoch)."""
    return build_loader(
        config, "train", dp_rank=dp_rank, dp_size=dp_size, global_batch=global_batch,
        micro_batch=micro_batch, num_samples=train_samples,
    )
