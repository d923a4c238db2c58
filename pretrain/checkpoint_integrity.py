"""What a checkpoint held when it was written: every file's size and SHA-256, recorded in the
completion marker at save (``files``) and checked before a run resumes from it.

A missing or truncated shard, an emptied ``.metadata`` or bytes flipped inside a shard are found
here, in one line naming the file, before any weight is loaded (DCP itself would raise a raw
``FileNotFoundError`` / ``UnpicklingError``, or load flipped bytes silently).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

_CHUNK = 1 << 24


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def inventory(directory: Path, exclude: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``{relative path: {"bytes": size, "sha256": hex}}`` of every file under ``directory``
    except the names in ``exclude`` (the marker that will hold the inventory)."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        relative = path.relative_to(directory).as_posix()
        if relative not in exclude:
            files[relative] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    return files


def damage(directory: Path, marker: dict[str, Any]) -> str | None:
    """The first difference between ``directory`` and the inventory in its marker, in words;
    None when every recorded file is present and intact (or the marker predates inventories)."""
    files = marker.get("files")
    if not isinstance(files, dict):
        return None
    for relative, record in files.items():
        path = directory / relative
        if not path.is_file():
            return f"{relative} is missing"
        size = path.stat().st_size
        if size != record["bytes"]:
            return f"{relative} has {size} bytes but {record['bytes']} were written"
        if _sha256(path) != record["sha256"]:
            return f"{relative} does not match the SHA-256 recorded at save (its bytes changed)"
    return None
