"""torch.compile per block (``parallel.compile``, with ``parallel.compile_backend``).

Each block (with its recomputation wrapper, if any) is compiled in place (``Module.compile``:
parameter names and checkpoint keys do not change). All blocks share one compiled graph because
they have the same structure, so compile time does not grow with depth; FSDP2's hooks stay
outside the compiled region. Call after tensor parallelism and recomputation, before FSDP.
``backend``: ``inductor`` generates fused kernels (Triton on GPU, C++ on CPU); ``aot_eager``
traces the same graphs (forward and backward) without generating code, to find tracing problems
quickly.
"""

from __future__ import annotations

from torch import nn

from pretrain.parallel.recompute import RecomputedKernel


def apply_compile(model: nn.Module, backend: str = "inductor") -> None:
    """Compile each block in place; recomputed attention kernels (``train.recompute=selective``)
    keep the output of a kernel torch tags as random (pretrain/parallel/recompute.py,
    ``RecomputedKernel``)."""
    for name in model.block_names():
        block = model.get_submodule(name)
        for module in block.modules():
            if isinstance(getattr(module, "backend", None), RecomputedKernel):
                module.backend.keep_seeded = True
        block.compile(backend=backend, fullgraph=True)
