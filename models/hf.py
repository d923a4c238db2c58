"""Hugging Face adapters: a family's two-way map between our configs and state dicts and a
``transformers`` model class's. transformers is imported only when an adapter is used.

An adapter lists its tensors as :class:`TensorRule`s, patterns with ``{i}`` for the block index
(``layers.{i}.mixer.wq.weight`` ↔ ``model.layers.{i}.self_attn.q_proj.weight``) and a transform
each way (identity for a plain renaming). Rules are per tensor, so a converter can stream a
checkpoint one tensor at a time. Tensors shared by several of our names (tied embeddings) are
listed in ``aliases``: the alias is written from, and read back as, its source.

``disk_map`` is the layout ``save_pretrained`` writes, when it differs from the in-memory one
``tensor_map`` describes: a tensor we hold stacked (MoE experts ``[E, ...]``) may be stored by
HF as one tensor per slice along dim 0 (``TensorMap.stacked``), still one of ours at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


@dataclass(frozen=True)
class TensorRule:
    ours: str
    theirs: str
    to_hf: Callable[[torch.Tensor], torch.Tensor] = _identity
    from_hf: Callable[[torch.Tensor], torch.Tensor] = _identity


@dataclass(frozen=True)
class TensorMap:
    """The concrete rules of one model shape: ``ours`` name → (HF name, rule); ``aliases``:
    our name → the our name it shares storage with (present in ``ours`` itself); ``hf_aliases``
    likewise for HF names; ``stacked``: our name → the HF names of its slices along dim 0, in
    order (``ours[e]`` is HF's ``stacked[ours][e]``), for tensors not in ``rules``."""

    rules: dict[str, tuple[str, TensorRule]]
    aliases: dict[str, str] = field(default_factory=dict)
    hf_aliases: dict[str, str] = field(default_factory=dict)
    stacked: dict[str, tuple[str, ...]] = field(default_factory=dict)


class HFAdapter:
    """Subclasses define ``architecture`` (the transformers class name), ``config_to_hf``,
    ``config_from_hf`` and ``tensor_map(config)``."""

    architecture = ""

    def config_to_hf(self, config):
        raise NotImplementedError

    def refusal(self, config) -> str | None:
        """Why ``config`` has no form in ``architecture``; None when it has one."""
        return None

    def _check(self, config) -> None:
        problem = self.refusal(config)
        if problem:
            raise ValueError(f"cannot convert to {self.architecture}: {problem}")

    def config_from_hf(self, hf_config, **overrides):
        raise NotImplementedError

    def tensor_map(self, config) -> TensorMap:
        raise NotImplementedError

    def disk_map(self, config) -> TensorMap:
        """The tensors as ``save_pretrained`` writes them; the in-memory map unless overridden."""
        return self.tensor_map(config)

    # ----------------------------------------------------------- state dicts
    def state_to_hf(self, state: Mapping[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
        """HF state dict from ours (aliases written as HF's own tied tensors)."""
        tmap = self.tensor_map(config)
        _check_names(set(state), set(tmap.rules), set(tmap.aliases), "state dict")
        out = {theirs: rule.to_hf(state[ours]) for ours, (theirs, rule) in tmap.rules.items()}
        for alias, source in tmap.hf_aliases.items():
            out[alias] = out[source]
        return out

    def state_from_hf(self, hf_state: Mapping[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
        """Our state dict from an HF one; aliases share their source's tensor."""
        tmap = self.tensor_map(config)
        inverse = {theirs: (ours, rule) for ours, (theirs, rule) in tmap.rules.items()}
        _check_names(set(hf_state), set(inverse), set(tmap.hf_aliases), "HF state dict")
        out = {ours: rule.from_hf(hf_state[theirs]) for theirs, (ours, rule) in inverse.items()}
        for alias, source in tmap.aliases.items():
            out[alias] = out[source]
        return out

    # ---------------------------------------------------------------- models
    def hf_class(self):
        import transformers

        return getattr(transformers, self.architecture)

    def to_hf_model(self, model: torch.nn.Module):
        """A transformers model (fp32, on CPU) holding copies of ``model``'s weights."""
        hf = self.hf_class()(self.config_to_hf(model.config))
        state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
        hf.load_state_dict(self.state_to_hf(state, model.config), strict=True)
        return hf.eval()

    def from_hf_model(self, hf, **overrides) -> torch.nn.Module:
        """Our model holding copies of an HF model's weights (in the HF model's dtype)."""
        from models.spec import build_model

        config = self.config_from_hf(hf.config, **overrides)
        with torch.device("meta"):
            model = build_model(config)
        model.to_empty(device="cpu")
        model.init_weights()
        model.to(next(hf.parameters()).dtype)
        model.load_state_dict(self.state_from_hf(hf.state_dict(), config), strict=True)
        return model


def _check_names(given: set[str], expected: set[str], optional: set[str], what: str) -> None:
    missing = sorted(expected - given)
    unexpected = sorted(given - expected - optional)
    if missing or unexpected:
        raise KeyError(f"{what} does not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")


def expand_rules(rules: list[TensorRule], n_layers: int) -> dict[str, tuple[str, TensorRule]]:
    """Rules with ``{i}`` instantiated for every block index."""
    out = {}
    for rule in rules:
        indices = range(n_layers) if "{i}" in rule.ours else [None]
        for i in indices:
            ours = rule.ours.format(i=i) if i is not None else rule.ours
            out[ours] = (rule.theirs.format(i=i) if i is not None else rule.theirs, rule)
    return out
