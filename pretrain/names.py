"""Plain parameter and module names under the wrappers that parallelism adds."""

from __future__ import annotations

# Wrapper segments that never name a real submodule: torch.compile, activation checkpointing,
# FSDP1 and CPU offload wrappers. DDP's ``module.`` is stripped only as the leading segment.
_WRAPPER_SEGMENTS = {
    "_orig_mod",
    "_checkpoint_wrapped_module",
    "_fsdp_wrapped_module",
    "_offload_wrapped_module",
}


def clean_key(key: str) -> str:
    """The plain parameter name: without compile/checkpoint/FSDP wrappers or a DDP prefix."""
    parts = [p for p in key.split(".") if p not in _WRAPPER_SEGMENTS]
    if parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)
