"""Atomic, resumable checkpoints in torch.distributed.checkpoint (DCP) sharded format.

A checkpoint is a directory ``ROOT/step_NNNNNNNN`` holding the DCP shards of the model and
optimizer (each rank writes its own shards; any layout can load them), ``extra_state.pt``
(non-tensor training state written once by rank 0), ``config.json`` (a human-readable copy of
``extra_state["config"]``), ``rng/rank_NNNNN.pt`` (one RNG snapshot per rank) and the completion
marker ``complete.json``. Every rank writes into ``step_NNNNNNNN.tmp-<id>``; rank 0 renames it
into place only after all ranks finished, then points ``ROOT/latest`` at it. See
docs/checkpoints.md for the protocol and the resume rules.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import re
import shutil
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from data.indexed import fsync_path
from pretrain.checkpoint_integrity import damage, inventory
from pretrain.errors import CheckpointError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MARKER = "complete.json"
EXTRA_STATE = "extra_state.pt"
CONFIG_JSON = "config.json"
CONFIG_KEY = "config"
RNG_DIR = "rng"
LATEST = "latest"
TMP_TAG = ".tmp-"
_STEP_DIR = re.compile(r"^step_(\d+)$")

ModelParts = nn.Module | Sequence[nn.Module]
Optimizers = torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None



def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def read_marker(path: str | os.PathLike) -> dict[str, Any] | None:
    """The completion marker of a checkpoint directory, or None when it is not complete."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        return None
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or not isinstance(marker.get("step"), int):
        return None
    return marker


def is_complete(path: str | os.PathLike) -> bool:
    """True for a finished checkpoint: DCP ``.metadata`` plus our completion marker."""
    return Path(path).is_dir() and read_marker(path) is not None


# ---------------------------------------------------------------- RNG state


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy (global), torch CPU and (when initialised) current-device CUDA RNG states,
    as plain types that ``torch.load(weights_only=True)`` accepts."""
    name, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (name, key.tolist(), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_rng(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------- durable file helpers


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a
    torn one: temporary sibling, fsync, rename, fsync of the directory."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}{TMP_TAG}{uuid.uuid4().hex[:12]}")
    try:
        _write_durable(tmp, data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)


def _remove_tree(path: Path) -> None:
    """Delete a directory so that a crash mid-way cannot leave something that looks complete:
    rename it to a temporary name first, then remove it."""
    doomed = path.with_name(f"{path.name}{TMP_TAG}deleted-{uuid.uuid4().hex[:8]}")
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


# ---------------------------------------------------------------- the manager


class CheckpointManager:
    """Save and load training checkpoints under ``root_dir``.

    ``save`` and ``load`` are collective: under torch.distributed every rank of
    ``process_group`` (default: the world) calls them with its own model shard. Without a
    process group they run in this process alone. ``keep_last`` keeps that many newest complete
    checkpoints (None keeps all). ``seed`` reseeds the RNG of ranks that a checkpoint saved with
    fewer ranks holds no RNG snapshot for (``seed + rank``).
    """

    def __init__(
        self,
        root_dir: str | os.PathLike,
        keep_last: int | None = None,
        *,
        seed: int = 0,
        process_group: dist.ProcessGroup | None = None,
        thread_count: int = 1,
    ):
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
        self.root = Path(root_dir)
        self.keep_last = keep_last
        self.seed = seed
        self.process_group = process_group
        self.thread_count = thread_count
        self.rng_restored = False

    # -- collective helpers

    def _distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def _rank(self) -> int:
        return dist.get_rank(self.process_group) if self._distributed() else 0

    def _world_size(self) -> int:
        return dist.get_world_size(self.process_group) if self._distributed() else 1

    def _barrier(self) -> None:
        if self._distributed():
            dist.barrier(group=self.process_group)

    def _on_rank0(self, fn: Callable[[], Any], quote_rank: bool = True) -> Any:
        """Run ``fn`` on rank 0 and hand its result to every rank; a failure on rank 0 raises
        CheckpointError everywhere instead of leaving the other ranks waiting (its message
        prefixed by where it came from, unless ``quote_rank`` is off)."""
        result = error = cause = None
        if self._rank() == 0:
            try:
                result = fn()
            except Exception as e:
                if not self._distributed():
                    raise
                error, cause = (f"rank 0: {type(e).__name__}: {e}" if quote_rank else str(e)), e
        if self._distributed():
            box = [(result, error)]
            src = dist.get_global_rank(self.process_group, 0) if self.process_group else 0
            dist.broadcast_object_list(box, src=src, group=self.process_group)
            result, error = box[0]
        if error is not None:
            raise CheckpointError(error) from cause
        return result

    # -- discovery

    def checkpoints(self) -> list[Path]:
        """Complete checkpoint directories under the root, oldest step first."""
        if not self.root.is_dir():
            return []
        found = []
        for entry in self.root.iterdir():
            match = _STEP_DIR.match(entry.name)
            if match and is_complete(entry):
                found.append((int(match.group(1)), entry))
        return [path for _, path in sorted(found)]

    def latest(self) -> Path | None:
        """The checkpoint to resume from: the one ``ROOT/latest`` names when it is complete,
        otherwise the complete checkpoint with the highest step; None when there is none."""
        pointer = self.root / LATEST
        try:
            name = pointer.read_text().strip()
        except OSError:
            name = None
        if name and _STEP_DIR.match(name) and is_complete(self.root / name):
            return self.root / name
        if name is not None:
            log.warning("%s names %r, which is not a complete checkpoint; scanning", pointer, name)
        complete = self.checkpoints()
        return complete[-1] if complete else None

    def choose(self, resume: str = "auto") -> Path | None:
        """Collective: the checkpoint every rank resumes from, decided by rank 0 and checked on
        every rank. ``resume``: ``auto`` (the latest complete checkpoint, None when there is
        none), ``none`` (None; refused when checkpoints exist, so a run is not overwritten) or a
        checkpoint path. A rank that does not see the chosen checkpoint complete is an error on
        every rank (a split run is worse than none)."""

        def decide() -> str | None:
            if resume == "none":
                if self.latest() is not None:
                    raise CheckpointError(
                        f"{self.root} already holds checkpoints and checkpoint.resume=none; use a new run.dir, "
                        "or checkpoint.resume=auto to continue"
                    )
                return None
            if resume == "auto":
                return self._newest_intact()
            path = Path(resume)
            if not is_complete(path):
                raise CheckpointError(f"checkpoint.resume={resume}: {path} is not a complete checkpoint")
            problem = damage(path, read_marker(path))
            if problem:
                raise CheckpointError(
                    f"checkpoint.resume={resume} is damaged: {problem}; name another checkpoint, or set "
                    "checkpoint.resume=auto to fall back to the newest intact one"
                )
            return str(path)

        chosen = self._on_rank0(decide, quote_rank=False)
        if chosen is None:
            return None
        seen = is_complete(chosen)
        if self._distributed():
            views: list = [None] * self._world_size()
            dist.all_gather_object(views, seen, group=self.process_group)
            blind = [rank for rank, ok in enumerate(views) if not ok]
            if blind:
                raise CheckpointError(
                    f"rank 0 chose to resume from {chosen}, but rank(s) {blind} do not see it complete; "
                    f"{self.root} must be on a filesystem every node shares"
                )
        return Path(chosen)

    def _newest_intact(self) -> str | None:
        """The latest checkpoint, or, when it is damaged, the newest intact one before it (with a
        warning naming what was wrong); an error when every checkpoint is damaged."""
        latest = self.latest()
        if latest is None:
            return None
        candidates = [latest] + [p for p in reversed(self.checkpoints()) if p != latest]
        found = []
        for path in candidates:
            problem = damage(path, read_marker(path))
            if problem is None:
                return str(path)
            found.append(f"{path.name}: {problem}")
            log.warning("checkpoint %s is damaged (%s); trying the previous complete checkpoint", path, problem)
        raise CheckpointError(
            f"every checkpoint under {self.root} is damaged ({'; '.join(found)}); restore one, or start "
            "again in a new run.dir"
        )

    def resume(
        self, model: ModelParts, optimizer: Optimizers = None, **load_kwargs: Any
    ) -> dict[str, Any] | None:
        """Collective auto-resume: load the checkpoint ``choose("auto")`` agrees on and return its
        extra state, or None (nothing loaded) when there is no complete checkpoint yet."""
        path = self.choose("auto")
        return None if path is None else self.load(path, model, optimizer, **load_kwargs)

    # -- save

    def save(
        self,
        step: int,
        model: ModelParts,
        optimizer: Optimizers = None,
        extra_state: dict[str, Any] | None = None,
    ) -> Path:
        """Write checkpoint ``step`` and return its final directory.

        ``extra_state`` (rank 0's copy is saved) holds plain Python values and tensors: scheduler
        and data-loader state dicts, the step, the resolved config under ``"config"``.
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        rng_state = capture_rng_state()
        rank, world = self._rank(), self._world_size()
        final = self.root / step_dir_name(step)
        extra_bytes = b""

        def prepare() -> str:  # rank 0: refuse bad extra state before any rank writes
            nonlocal extra_bytes
            extra_bytes = _checked_extra_state(extra_state)
            return self._prepare(final)

        tmp = self.root / self._on_rank0(prepare)

        parts, optims = _normalize(model, optimizer)
        state, _ = _collect_state(parts, optims)
        with quiet_single_process():
            dcp.save(
                state,
                storage_writer=FileSystemWriter(tmp, thread_count=self.thread_count),
                process_group=self.process_group,
                no_dist=not self._distributed(),
            )
        (tmp / RNG_DIR).mkdir(exist_ok=True)
        _write_durable(tmp / RNG_DIR / f"rank_{rank:05d}.pt", _torch_bytes(rng_state))
        if rank == 0:
            _write_durable(tmp / EXTRA_STATE, extra_bytes)
            config = (extra_state or {}).get(CONFIG_KEY)
            if isinstance(config, dict):
                text = json.dumps(config, indent=2, sort_keys=True, default=str) + "\n"
                _write_durable(tmp / CONFIG_JSON, text.encode())
        self._barrier()
        self._on_rank0(lambda: self._commit(tmp, final, step, world))
        return final

    def _prepare(self, final: Path) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()
        name = f"{final.name}{TMP_TAG}{uuid.uuid4().hex[:12]}"
        (self.root / name).mkdir()
        return name

    def _commit(self, tmp: Path, final: Path, step: int, world: int) -> None:
        fsync_path(tmp / RNG_DIR)
        marker = {
            "format": FORMAT_VERSION,
            "step": step,
            "world_size": world,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "torch": torch.__version__,
            "files": inventory(tmp, exclude=(MARKER,)),
        }
        _write_durable(tmp / MARKER, (json.dumps(marker, indent=2) + "\n").encode())
        fsync_path(tmp)
        replaced = None
        if final.exists():
            replaced = final.with_name(f"{final.name}{TMP_TAG}replaced-{uuid.uuid4().hex[:8]}")
            os.rename(final, replaced)
        os.rename(tmp, final)
        fsync_path(self.root)
        atomic_write(self.root / LATEST, (final.name + "\n").encode())
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
        log.info("saved checkpoint %s", final)
        self._prune(final)

    def _prune(self, newest: Path) -> None:
        if self.keep_last is None:
            return
        complete = self.checkpoints()
        keep = set(complete[-self.keep_last :]) | {newest}
        for path in complete:
            if path not in keep:
                try:
                    _remove_tree(path)
                    log.info("removed old checkpoint %s", path)
                except OSError as e:
                    log.warning("could not remove old checkpoint %s: %s", path, e)

    def _remove_leftovers(self) -> None:
        for entry in self.root.iterdir():
            if TMP_TAG in entry.name:
                log.info("removing leftover %s", entry)
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)

    # -- load

    def load(
        self,
        path: str | os.PathLike,
        model: ModelParts,
        optimizer: Optimizers = None,
        *,
        strict: bool = True,
        restore_rng: bool = True,
    ) -> dict[str, Any]:
        """Load checkpoint ``path`` into ``model`` (and ``optimizer``, when given) in whatever
        layout they have now, restore this rank's RNG state, and return the extra state.

        Loading is collective like ``save``. With ``strict=False`` keys missing from the
        checkpoint keep their current values.
        """
        path = Path(path)
        marker = read_marker(path) if path.is_dir() else None
        if marker is None:
            raise CheckpointError(f"{path} is not a complete checkpoint")
        parts, optims = _normalize(model, optimizer)
        state, part_keys = _collect_state(parts, optims)
        reader = FileSystemReader(path)
        saved = reader.read_metadata().state_dict_metadata.keys()
        request = _loadable(state, saved, strict, path)
        with quiet_single_process():
            dcp.load(
                request,
                storage_reader=reader,
                process_group=self.process_group,
                no_dist=not self._distributed(),
            )
        state["model"].update(request["model"])
        if "optimizer" in state:
            state["optimizer"].update(request["optimizer"])
        options = _options(strict)
        for part, optim, (model_keys, optim_keys) in zip(parts, optims, part_keys, strict=True):
            model_sd = {k: state["model"][k] for k in model_keys}
            if optim is None:
                set_model_state_dict(part, model_sd, options=options)
            else:
                optim_sd = {k: state["optimizer"][k] for k in optim_keys}
                set_state_dict(
                    part,
                    optim,
                    model_state_dict=model_sd,
                    optim_state_dict=optim_sd,
                    options=options,
                )
        extra = torch.load(path / EXTRA_STATE, weights_only=True)
        if restore_rng:
            self._restore_rng(path, marker)
        log.info("loaded checkpoint %s (step %d)", path, marker["step"])
        return extra

    def _restore_rng(self, path: Path, marker: dict[str, Any]) -> None:
        rank, world = self._rank(), self._world_size()
        saved_world = int(marker.get("world_size", 0))
        if world != saved_world and rank == 0:
            log.warning(
                "checkpoint %s was saved by %d ranks, loading on %d: RNG streams differ from an "
                "uninterrupted run",
                path,
                saved_world,
                world,
            )
        snapshot = path / RNG_DIR / f"rank_{rank:05d}.pt"
        if snapshot.is_file():
            restore_rng_state(torch.load(snapshot, weights_only=True))
            self.rng_restored = True
        else:
            seed_rng(self.seed + rank)
            self.rng_restored = False


def _checked_extra_state(extra_state: dict[str, Any] | None) -> bytes:
    """Serialized extra state, refused now (not at resume time) when ``torch.load(...,
    weights_only=True)`` could not read it back."""
    data = _torch_bytes(dict(extra_state or {}))
    try:
        torch.load(io.BytesIO(data), weights_only=True)
    except Exception as e:
        lines = str(e).splitlines()
        detail = next((line for line in lines if "Unsupported global" in line), lines[-1])
        raise CheckpointError(
            "extra_state must hold only dicts, lists, tuples, str, int, float, bool, None and "
            f"tensors ({detail.strip()})"
        ) from None
    return data


def _loadable(
    state: dict[str, dict[str, Any]], saved: Iterable[str], strict: bool, path: Path
) -> dict[str, dict[str, Any]]:
    """The part of ``state`` to read from a checkpoint holding the flat keys ``saved``.

    Optimizer hyperparameters the checkpoint lacks (``initial_lr`` of a scheduler added since,
    options of a newer torch) keep their current values. Other missing entries are an error
    unless ``strict`` is off, in which case they keep their current values too."""
    known = set()
    for key in saved:  # a value DCP flattened further (a list of tensors) is saved under key.N
        parts = key.split(".")
        known.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))

    request: dict[str, dict[str, Any]] = {}
    missing = []
    for group, entries in state.items():
        request[group] = {}
        for key, value in entries.items():
            if f"{group}.{key}" in known:
                request[group][key] = value
            elif not (group == "optimizer" and key.startswith("param_groups.")):
                missing.append(f"{group}.{key}")
    if missing and strict:
        raise CheckpointError(
            f"{path} lacks {len(missing)} entries this model/optimizer needs, e.g. {missing[:3]}"
        )
    return request


@contextlib.contextmanager
def quiet_single_process() -> Iterator[None]:
    """Silence DCP's notice that it runs without a process group: that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _options(strict: bool = True) -> StateDictOptions:
    return StateDictOptions(strict=strict, flatten_optimizer_state_dict=True)


def _normalize(
    model: ModelParts, optimizer: Optimizers
) -> tuple[list[nn.Module], list[torch.optim.Optimizer | None]]:
    """Model parts (pipeline stages held by this rank) paired with their optimizers."""
    parts = [model] if isinstance(model, nn.Module) else list(model)
    if optimizer is None:
        optims: list[torch.optim.Optimizer | None] = [None] * len(parts)
    elif isinstance(optimizer, torch.optim.Optimizer):
        optims = [optimizer]
    else:
        optims = list(optimizer)
    if len(optims) != len(parts) or not parts:
        raise ValueError(f"{len(parts)} model parts need as many optimizers, got {len(optims)}")
    return parts, optims


def _collect_state(
    parts: Iterable[nn.Module], optims: Iterable[torch.optim.Optimizer | None]
) -> tuple[dict[str, dict[str, Any]], list[tuple[list[str], list[str]]]]:
    """One DCP state dict ``{"model": ..., "optimizer": ...}`` keyed by canonical FQNs over all
    parts, and each part's keys (so a loaded dict can be handed back part by part). Parts hold
    disjoint parameters; a buffer present in several parts is saved once."""
    model_sd: dict[str, Any] = {}
    optim_sd: dict[str, Any] = {}
    keys = []
    any_optim = False
    for part, optim in zip(parts, optims, strict=True):
        if optim is None:
            msd, osd = get_model_state_dict(part, options=_options()), {}
        else:
            msd, osd = get_state_dict(part, optim, options=_options())
            any_optim = True
        model_sd.update(msd)
        optim_sd.update(osd)
        keys.append((list(msd), list(osd)))
    state: dict[str, dict[str, Any]] = {"model": model_sd}
    if any_optim:
        state["optimizer"] = optim_sd
    return state, keys
