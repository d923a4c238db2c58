"""Safe output: refuse to overwrite unless asked, write into a temporary sibling (named with the
checkpoint temporary tag, so nothing half-written looks complete) and rename it into place once
written and verified; report progress of long conversions. A conversion that was killed leaves
its temporary sibling behind: the next conversion into the same output removes it (only names
this module gives, ``OUTPUT.tmp-<12 hex>`` and ``OUTPUT.tmp-replaced-<8 hex>``; two conversions
into one output at the same time are not supported)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from data.indexed import fsync_path
from pretrain.checkpoint import TMP_TAG
from pretrain.convert.errors import ConversionError


@contextlib.contextmanager
def staged(output: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """A temporary path beside ``output`` (a directory to fill, or a file name to write);
    renamed to ``output`` when the block succeeds, removed when it fails."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise ConversionError(f"{output} already exists; choose another OUTPUT or pass --overwrite to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    for left in leftovers(output):
        print(f"removing {left}, left by an interrupted conversion into {output}", file=sys.stderr)
        _remove(left)
    tmp = output.with_name(f"{output.name}{TMP_TAG}{uuid.uuid4().hex[:12]}")
    try:
        yield tmp
        if tmp.is_dir():
            for path in tmp.rglob("*"):
                if path.is_file():
                    fsync_path(path)
        fsync_path(tmp)
        replaced = None
        if output.exists():
            replaced = output.with_name(f"{output.name}{TMP_TAG}replaced-{uuid.uuid4().hex[:8]}")
            os.rename(output, replaced)
        os.rename(tmp, output)
        fsync_path(output.parent)
        if replaced is not None:
            _remove(replaced)
    finally:
        if tmp.exists():
            _remove(tmp)


def leftovers(output: Path) -> list[Path]:
    """The temporary siblings of ``output`` that ``staged`` names, left by a killed conversion."""
    pattern = re.compile(re.escape(f"{output.name}{TMP_TAG}") + r"(?:[0-9a-f]{12}|replaced-[0-9a-f]{8})")
    return sorted(p for p in output.parent.iterdir() if pattern.fullmatch(p.name))


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class Progress:
    """``tensors i/n, bytes, ETA`` on stderr, at most every ``interval`` seconds and at the end."""

    def __init__(self, label: str, tensors: int, total_bytes: int, interval: float = 5.0, stream=None):
        self.label, self.tensors, self.total = label, tensors, max(total_bytes, 1)
        self.interval, self.stream = interval, stream or sys.stderr
        self.done_tensors = self.done_bytes = 0
        self.start = self.last = time.monotonic()

    def advance(self, nbytes: int) -> None:
        self.done_tensors += 1
        self.done_bytes += nbytes
        now = time.monotonic()
        if now - self.last >= self.interval or self.done_tensors == self.tensors:
            self.last = now
            elapsed = now - self.start
            rate = self.done_bytes / elapsed if elapsed > 0 else 0.0
            eta = (self.total - self.done_bytes) / rate if rate > 0 else 0.0
            print(
                f"{self.label}: {self.done_tensors}/{self.tensors} tensors, {self.done_bytes / 1e9:.2f}/"
                f"{self.total / 1e9:.2f} GB, {elapsed:.0f}s elapsed, ETA {eta:.0f}s",
                file=self.stream, flush=True,
            )
