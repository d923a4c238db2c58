"""The nested SwiGLU module and the helper that selects the active granularity."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from models.ffn.matformer.layout import interleave_perm, to_canonical, to_stored
from models.ffn.swiglu import SwiGLU
from models.linear import Linear, linear


def chunk_prefix(w: torch.Tensor, dim: int, chunk: int, keep: int) -> torch.Tensor:
    """``w`` cut along ``dim`` into consecutive chunks of ``chunk``; the first ``keep`` of each,
    concatenated (one contiguous tensor). A DTensor (a tensor-parallel shard) is cut locally —
    its shard holds whole chunks (layout.py) — and re-wrapped with the same placements, so the
    gradient reaches only the kept entries of this rank's shard."""
    if isinstance(w, DTensor):
        local = chunk_prefix(w.to_local(), dim, chunk, keep)
        shape = list(w.shape)
        shape[dim] = w.shape[dim] // chunk * keep
        return DTensor.from_local(
            local, w.device_mesh, w.placements, run_check=False, shape=torch.Size(shape),
            stride=torch.empty(shape, device="meta").stride(),
        )
    n = w.shape[dim] // chunk
    if n == 1:
        return w.narrow(dim, 0, keep).contiguous()
    if dim == 0:
        return w.reshape(n, chunk, w.shape[1])[:, :keep].reshape(n * keep, w.shape[1])
    return w.reshape(w.shape[0], n, chunk)[:, :, :keep].reshape(w.shape[0], n * keep)


class NestedLinear(Linear):
    """A linear layer of which only the first ``keep`` hidden units of each stored chunk of
    ``chunk`` take part; ``hidden_dim`` is the weight's hidden-unit axis (0: output rows of
    the gate/up projections, 1: input columns of the down projection).

    Unsharded, the kept units are taken in canonical order (``canonical[i]`` = stored index of
    canonical unit i), so a narrowed layer computes exactly what the extracted dense layer does
    (extract.py). A tensor-parallel shard takes its own chunks' prefixes (``chunk_prefix``).
    """

    def __init__(self, in_features: int, out_features: int, hidden_dim: int, chunk: int, canonical: torch.Tensor):
        super().__init__(in_features, out_features)
        self.hidden_dim, self.chunk, self.keep = hidden_dim, chunk, chunk
        self.canonical = canonical

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.keep == self.chunk:
            return linear(x, w)
        if isinstance(w, DTensor) or w.shape[self.hidden_dim] == self.chunk:
            return linear(x, chunk_prefix(w, self.hidden_dim, self.chunk, self.keep))
        n = w.shape[self.hidden_dim] // self.chunk
        rows = self.canonical[: n * self.keep].to(w.device)
        return linear(x, w.index_select(self.hidden_dim, rows))


class MatFormerFFN(SwiGLU):
    """SwiGLU over hidden size ``d_ff`` whose active width m is one of ``granularities``: the
    canonical hidden units [0, m). Stored in the interleaved order of layout.py for
    ``tp_interleave`` = T: chunk t of every granularity segment sits in stored block t, so
    granularity m is the first m/T units of each of the T stored blocks of d_ff/T. Same
    parameters, init and tensor-parallel plan as ``SwiGLU``."""

    def __init__(self, d_model: int, d_ff: int, granularities: list[int], tp_interleave: int = 1):
        self.d_model, self.d_ff, self.granularities = d_model, d_ff, list(granularities)
        self.tp_interleave = tp_interleave
        self._canonical = torch.argsort(interleave_perm(self.granularities, tp_interleave))
        super().__init__(d_model, d_ff)

    def projection(self, in_features: int, out_features: int, hidden_dim: int) -> NestedLinear:
        chunk = self.d_ff // self.tp_interleave
        return NestedLinear(in_features, out_features, hidden_dim, chunk, self._canonical)

    @property
    def granularity(self) -> int:
        """The active width m."""
        return self.w1.keep * self.tp_interleave

    def set_granularity(self, m: int | None) -> None:
        """Run at width ``m`` (one of ``granularities``; None: the full ``d_ff``)."""
        m = self.d_ff if m is None else m
        if m not in self.granularities:
            raise ValueError(f"granularity {m} is not one of this layer's {self.granularities}")
        for w in (self.w1, self.w3, self.w2):
            w.keep = m // self.tp_interleave

    def select_pass(self, level: int | None) -> None:
        """models/passes.py: a pass's setting is the index into ``granularities``."""
        self.set_granularity(None if level is None else self.granularities[level])

    def canonical_state(self, name: str, weights: dict[str, torch.Tensor]) -> None:
        """Rewrite this layer's entries of a state dict (keys ``<name>.w1.weight``...; any of
        them may be absent) from the stored (TP-interleaved) order to the canonical one, in place
        (pretrain export, conversion)."""
        self._reorder(name, weights, to_canonical)

    def storage_order(self) -> str:
        """How this layer's weights are ordered in a checkpoint (compared before loading one)."""
        if self.tp_interleave == 1:
            return "hidden units in canonical order (tp_interleave=1)"
        return (
            f"hidden units interleaved for tp_interleave={self.tp_interleave} over granularities {self.granularities}"
        )

    def stored_state(self, name: str, weights: dict[str, torch.Tensor]) -> None:
        """The inverse of :meth:`canonical_state`: canonical → stored order, in place (a
        conversion that writes our checkpoint format)."""
        self._reorder(name, weights, to_stored)

    def _reorder(self, name: str, weights: dict[str, torch.Tensor], reorder) -> None:
        if self.tp_interleave == 1:
            return
        perm = interleave_perm(self.granularities, self.tp_interleave)
        for key, dim in (("w1", 0), ("w3", 0), ("w2", 1)):
            if f"{name}.{key}.weight" in weights:
                weights[f"{name}.{key}.weight"] = reorder(weights[f"{name}.{key}.weight"], perm, dim)

    def inactive_params_per_token(self) -> int:
        """Parameters of the hidden units outside the active width (models/counting.py: a
        narrowed model's ``active`` count is its sub-model's)."""
        return 3 * self.d_model * (self.d_ff - self.granularity)

    def linear_flops_per_token(self) -> int:
        """Forward FLOPs of the three projections at the active width (models/counting.py)."""
        return 2 * 3 * self.d_model * self.granularity


def matformer_ffns(model: nn.Module) -> list[MatFormerFFN]:
    """The MatFormer FFNs of ``model`` in module order (block order for the built-in families)."""
    return [m for m in model.modules() if isinstance(m, MatFormerFFN)]


def set_granularity(model: nn.Module, granularity: int | list[int] | None) -> None:
    """Select the active width: one value for every MatFormer layer, a per-layer list
    (Mix'n'Match), or None for the full width. Raises on a value that is not one of a layer's
    granularities."""
    ffns = matformer_ffns(model)
    values = list(granularity) if isinstance(granularity, (list, tuple)) else [granularity] * len(ffns)
    if len(values) != len(ffns):
        raise ValueError(f"{len(values)} granularities given for {len(ffns)} MatFormer layers")
    for i, (ffn, m) in enumerate(zip(ffns, values)):
        if m is not None and m not in ffn.granularities:
            raise ValueError(f"MatFormer layer {i}: granularity {m} is not one of {ffn.granularities}")
    for ffn, m in zip(ffns, values):
        ffn.set_granularity(m)
