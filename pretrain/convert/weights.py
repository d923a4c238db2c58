"""What flows through a conversion: a model config and its tensors under our parameter names,
listed first (name, shape, dtype) and then read one at a time, so a writer can plan its files
before any tensor is in memory."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from pretrain.convert.errors import ConversionError


@dataclass
class Weights:
    """``listing``: our name → (shape, dtype), in reading order; ``read()`` yields ``(name,
    tensor)`` in that order. ``tokenizer``: the tokenizer file that goes with the weights
    (tokenizer.model or tokenizer.json), when known; ``step``: the training step, when known;
    ``fetch(name)``: one tensor by name, for writers that need another order (Megatron's stacked
    layers)."""

    config: object
    listing: dict[str, tuple[tuple, torch.dtype]]
    read: Callable[[], Iterator[tuple[str, torch.Tensor]]]
    tokenizer: Path | None = None
    step: int | None = None
    source: str = ""
    fetch: Callable[[str], torch.Tensor] | None = None

    def total_bytes(self) -> int:
        from pretrain.convert.tensorfile import nbytes

        return sum(nbytes(shape, dtype) for shape, dtype in self.listing.values())

    def cast(self, dtype: torch.dtype | None) -> Weights:
        """The same weights with floating tensors cast to ``dtype`` (None: unchanged)."""
        if dtype is None:
            return self
        listing = {k: (s, dtype if d.is_floating_point else d) for k, (s, d) in self.listing.items()}
        inner = self.read

        def cast(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.to(dtype) if tensor.is_floating_point() else tensor

        def read():
            for name, tensor in inner():
                yield name, cast(tensor)

        fetch = None if self.fetch is None else (lambda name, inner_fetch=self.fetch: cast(inner_fetch(name)))
        return replace(self, listing=listing, read=read, fetch=fetch)


def expected_names(config) -> tuple[dict[str, tuple[tuple, torch.dtype]], dict[str, str]]:
    """The tensors a model of ``config`` holds (parameters and persistent buffers, each stored
    once: name → (shape, dtype)) and its aliases (a second name of a tied tensor → the first)."""
    from models.counting import build_meta

    model = build_meta(config)
    state = model.state_dict(keep_vars=True)
    first: dict[int, str] = {}
    tensors, aliases = {}, {}
    for name, tensor in state.items():
        key = id(tensor)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
            tensors[name] = (tuple(tensor.shape), tensor.dtype)
    return tensors, aliases


def check_against_config(listing: dict, config, source: str) -> None:
    """Refuse weights whose names or shapes do not match what ``config`` builds, naming the
    first offending tensor and the fix."""
    expected, aliases = expected_names(config)
    missing = [n for n in expected if n not in listing]
    if missing:
        raise ConversionError(
            f"{source} lacks tensor {missing[0]} ({len(missing)} missing) that its config needs; "
            "the weights are incomplete or belong to another model: convert the matching checkpoint"
        )
    unexpected = [n for n in listing if n not in expected and n not in aliases]
    if unexpected:
        raise ConversionError(
            f"{source} holds tensor {unexpected[0]} ({len(unexpected)} unexpected) that its config does not build; "
            "the config does not describe these weights (wrong family or kind?)"
        )
    for name, (shape, _) in listing.items():
        if name in expected and tuple(shape) != expected[name][0]:
            hint = " (vocab_size differs)" if "embed" in name or "head" in name else ""
            raise ConversionError(
                f"{source}: tensor {name} has shape {tuple(shape)} but the config builds {expected[name][0]}{hint}; "
                "fix the config so it describes these weights"
            )
