"""Streaming safetensors writing and checksums: a file is planned from its tensors' names,
shapes and dtypes, then written one tensor at a time, so only the tensor being written is in
memory. The layout is the safetensors one (8-byte little-endian header length, a JSON header
with ``dtype``/``shape``/``data_offsets`` per tensor and ``__metadata__``, the raw bytes), read
back by the safetensors library itself when verified."""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path

import torch

ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def nbytes(shape, dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor (contiguous, CPU)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def checksum(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor_bytes(tensor)).hexdigest()


class SafetensorsWriter:
    """Write ``entries`` (``name → (shape, dtype)``, in file order) to ``path`` one tensor at a
    time: ``write(name, tensor)`` in the same order, then ``close()``."""

    def __init__(self, path: str | os.PathLike, entries: dict[str, tuple[tuple, torch.dtype]], metadata=None):
        header: dict = {"__metadata__": dict(metadata or {})} if metadata else {}
        offset = 0
        for name, (shape, dtype) in entries.items():
            size = nbytes(shape, dtype)
            header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self.path = Path(path)
        self.expected = {name: (tuple(shape), dtype) for name, (shape, dtype) in entries.items()}
        self.order = list(entries)
        self.written = 0
        self.file = open(self.path, "wb")
        self.file.write(struct.pack("<Q", len(text)) + text)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.order[self.written]
        shape, dtype = self.expected[expected]
        if name != expected or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(
                f"{self.path.name}: got {name} {tuple(tensor.shape)} {tensor.dtype}, planned {expected} {shape} {dtype}"
            )
        self.file.write(tensor_bytes(tensor))
        self.written += 1

    def close(self) -> None:
        if self.written != len(self.order):
            raise ValueError(f"{self.path.name}: {len(self.order) - self.written} planned tensors were not written")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()

    def abort(self) -> None:
        self.file.close()
