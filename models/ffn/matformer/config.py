"""Config of the ``matformer`` FFN kind: a SwiGLU whose first m hidden units form a sub-FFN."""

from __future__ import annotations

from dataclasses import dataclass, field

from models.config import FFNConfig
from models.passes import Pass

TRAIN_MODES = ("joint", "sampled")


@dataclass
class MatFormerConfig(FFNConfig):
    """- ``granularities``: the nested hidden sizes, increasing, the last one ``d_ff``.
    - ``train_mode``: ``joint`` (every step runs forward+backward at every granularity on the
      same batch, the losses weighted by ``loss_weights``) or ``sampled`` (one granularity per
      step, drawn from a schedule seeded by ``run.seed`` and the step number).
    - ``loss_weights``: λ_m per granularity for ``joint`` (default 1 each).
    - ``tp_interleave``: the tensor-parallel degrees the stored hidden-unit order serves
      (layout.py): any ``parallel.tp`` dividing it keeps every granularity a prefix on every
      rank. 1 is the plain order, identical to a ``swiglu`` FFN's.
    """

    kind: str = "matformer"
    d_ff: int = 1024
    granularities: list[int] = field(default_factory=lambda: [128, 256, 512, 1024])
    train_mode: str = "joint"
    loss_weights: list[float] | None = None
    tp_interleave: int = 1

    def problems(self, prefix: str, d_model: int) -> list[str]:
        out = []
        if self.d_ff <= 0:
            out.append(f"{prefix}.d_ff must be a positive integer, got {self.d_ff}")
        gs = list(self.granularities)
        if not gs:
            out.append(f"{prefix}.granularities must not be empty; give the nested sizes, e.g. [d_ff/4, d_ff/2, d_ff]")
        for i, g in enumerate(gs):
            if not 0 < g <= self.d_ff:
                out.append(f"{prefix}.granularities[{i}] = {g} must be in (0, d_ff={self.d_ff}]")
            if i and g <= gs[i - 1]:
                out.append(f"{prefix}.granularities[{i}] = {g} must exceed the previous one ({gs[i - 1]})")
        if gs and gs[-1] != self.d_ff:
            out.append(f"{prefix}.granularities must end with d_ff={self.d_ff}, got {gs[-1]}")
        if self.train_mode not in TRAIN_MODES:
            out.append(f"{prefix}.train_mode = {self.train_mode!r}; choose one of {list(TRAIN_MODES)}")
        if self.loss_weights is not None:
            if len(self.loss_weights) != len(gs):
                out.append(
                    f"{prefix}.loss_weights has {len(self.loss_weights)} entries for {len(gs)} granularities"
                )
            if any(not w >= 0 for w in self.loss_weights):
                out.append(f"{prefix}.loss_weights must be >= 0, got {self.loss_weights}")
            if self.train_mode != "joint":
                out.append(f"{prefix}.loss_weights only apply to train_mode=joint; remove them or set joint")
        if self.tp_interleave < 1:
            out.append(f"{prefix}.tp_interleave must be >= 1, got {self.tp_interleave}")
        else:
            for i, g in enumerate(gs):
                if g % self.tp_interleave:
                    out.append(
                        f"{prefix}.granularities[{i}] = {g} is not divisible by tp_interleave={self.tp_interleave}"
                    )
        return out

    def tp_sizes(self, prefix: str, d_model: int) -> dict[str, int]:
        # Divisibility of tp_interleave by tp keeps each granularity a per-rank prefix;
        # granularities divide by tp_interleave (problems()), so by tp too.
        return {f"{prefix}.d_ff": self.d_ff, f"{prefix}.tp_interleave": self.tp_interleave}

    def weights(self) -> list[float]:
        return list(self.loss_weights) if self.loss_weights is not None else [1.0] * len(self.granularities)

    def pass_names(self) -> list[str]:
        return [f"m{g}" for g in self.granularities]

    def train_passes(self, step: int, seed: int) -> list[Pass]:
        names = self.pass_names()
        if self.train_mode == "joint":
            return [Pass(name, w, level) for level, (name, w) in enumerate(zip(names, self.weights()))]
        level = sampled_level(len(names), step, seed)
        return [Pass(names[level], 1.0, level)]

    def eval_passes(self) -> list[Pass]:
        return [Pass(name, 1.0, level) for level, name in enumerate(self.pass_names())]


def sampled_level(n_levels: int, step: int, seed: int) -> int:
    """The granularity index of optimizer step ``step`` in ``sampled`` mode: uniform, from a
    generator seeded by (seed, step) alone, so a resumed run draws what the uninterrupted one
    drew and every rank draws the same."""
    import torch

    generator = torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))
    return int(torch.randint(n_levels, (), generator=generator))
