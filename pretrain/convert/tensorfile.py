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


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """A safetensors file's header (name → dtype, shape, data_offsets) and where its data begins."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def file_checksums(path: str | os.PathLike, chunk: int = 1 << 24) -> dict[str, tuple[str, tuple, str]]:
    """name → (safetensors dtype code, shape, sha256 of its bytes), hashed from the file in
    chunks (neither mapped nor loaded whole, so memory stays constant)."""
    header, start = read_header(path)
    out = {}
    with open(path, "rb") as f:
        for name, entry in header.items():
            begin, end = entry["data_offsets"]
            f.seek(start + begin)
            digest = hashlib.sha256()
            left = end - begin
            while left:
                block = f.read(min(chunk, left))
                if not block:
                    raise ValueError(f"{path}: tensor {name} is truncated")
                digest.update(block)
                left -= len(block)
            out[name] = (entry["dtype"], tuple(entry["shape"]), digest.hexdigest())
    return out


TORCH_DTYPES = {code: dtype for dtype, code in ST_DTYPES.items()}


class SafetensorsReader:
    """Read tensors of a safetensors file one at a time into their own memory (the file is not
    mapped, so a tensor read and dropped leaves nothing resident)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.header, self.start = read_header(self.path)

    def names(self) -> list[str]:
        return list(self.header)

    def meta(self, name: str) -> tuple[tuple, torch.dtype]:
        entry = self.header[name]
        return tuple(entry["shape"]), TORCH_DTYPES[entry["dtype"]]

    def get(self, name: str) -> torch.Tensor:
        shape, dtype = self.meta(name)
        begin, end = self.header[name]["data_offsets"]
        data = bytearray(end - begin)
        with open(self.path, "rb") as f:
            f.seek(self.start + begin)
            if f.readinto(data) != len(data):
                raise ValueError(f"{self.path}: tensor {name} is truncated")
        if not data:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(shape)
