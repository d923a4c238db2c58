"""One optimizer step's forward and backward over this rank's model parts, under any layout.

The family's spec says what the model takes (``inputs``), what the loss takes (``targets``) and
computes the loss. The loss of every micro-batch is its summed per-token loss divided by the
loss-bearing token count of the whole global batch, and data-parallel gradients are summed
(pretrain/parallel/fsdp.py): the gradients are then those of one process running the whole
global batch. Without pipeline parallelism the micro-batches run one after another (DDP
synchronises only on the last); with it, the step's micro-batches go through the pipeline
schedule in one call, the last stage computing the loss. Loss values are reduced over the
data-parallel and pipeline groups only, never over tensor-parallel ranks (which hold the same
loss). Under context parallelism each rank runs its zigzag chunks of every sequence (``local``)
and "data-parallel" reductions span dp × cp.

A step may run several passes over the same micro-batches (models/passes.py: MatFormer's joint
training runs one per nested width): each pass's loss is scaled by its weight before backward,
so the gradients add up to those of Σ weight · loss; its loss terms are recorded as
``<term>/<pass>``.

Auxiliary losses of modules inside the model (e.g. load balancing) enter the gradient where they
arise, whatever the stage (models/aux_loss.py); each micro-batch's share is its fraction of the
global batch, set here once as the modules' ``aux_loss_scale``. Modules may also have a
``post_step(reduce)`` hook (called after every applied optimizer step) and ``step_metrics(reduce)``
(merged into the logged metrics); ``reduce(tensor, op="sum" | "max")`` reduces a plain tensor
over the data-parallel ranks (in place, and returns it). Modules with a ``loss_settings``
attribute (a fused loss head, models/kernels.py) get the step's LossSettings.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import loss_parallel

from models.passes import PLAIN, Pass, select_pass
from models.spec import LossSettings
from pretrain.names import clean_key
from pretrain.parallel.clip import clip_grad_norm_
from pretrain.parallel.context.zigzag import shard_sequence
from pretrain.parallel.fsdp import apply_ddp
from pretrain.parallel.mesh import ParallelDims, dp_mesh, flattened
from pretrain.parallel.parallelize import ModelParts
from pretrain.parallel.pipeline import build_schedule

# Loss metrics that are counts or sums, not loss terms to log.
_NOT_TERMS = ("num_tokens", "loss_sum")
_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


def pack_targets(targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list]:
    """The loss targets as one [B, N] tensor (a pipeline schedule splits one target tensor into
    micro-batches), and the layout to unpack them."""
    layout, flat = [], []
    floating = any(t.is_floating_point() for t in targets.values())
    for name, tensor in targets.items():
        layout.append((name, tuple(tensor.shape[1:]), tensor.dtype))
        flat.append(tensor.reshape(tensor.shape[0], -1).to(torch.float64 if floating else torch.int64))
    return torch.cat(flat, dim=1), layout


def unpack_targets(packed: torch.Tensor, layout: list) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for name, shape, dtype in layout:
        width = 1
        for n in shape:
            width *= n
        out[name] = packed[:, start : start + width].reshape(packed.shape[0], *shape).to(dtype)
        start += width
    return out


class ParallelRunner:
    """Forward/backward, evaluation, loss reductions, clipping and module hooks for ``model``'s
    parts on this rank; builds the pipeline schedule (PP) or the DDP wrapper (pure replication)."""

    def __init__(
        self,
        model: ModelParts,
        dims: ParallelDims,
        mesh: DeviceMesh | None,
        device: torch.device,
        *,
        n_microbatches: int,
        pp_schedule: str = "1f1b",
        z_loss: float = 0.0,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> None:
        self.model, self.dims, self.mesh, self.device = model, dims, mesh, device
        self.spec, self.autocast = model.spec, autocast
        self.parts = model.parts
        # A fused loss head computes the loss inside the model (models/kernels.py): it gets these too.
        fused = any(getattr(part, "fused_loss", False) for part in self.parts)
        self.settings = LossSettings(z_loss=z_loss, fused_head=fused)
        self.dp_group = dp_mesh(mesh).get_group() if mesh is not None and dims.dp > 1 else None
        # Context parallelism: each rank holds a part of every sequence; loss terms, token counts
        # and module statistics are summed over dp × cp as over data-parallel ranks alone.
        self.cp_rank = mesh["cp"].get_local_rank() if mesh is not None and dims.cp > 1 else 0
        if dims.cp > 1:
            self.dp_group = flattened(mesh, "dp_cp").get_group()
        self.pp_group = mesh["pp"].get_group() if mesh is not None and dims.pp > 1 else None
        self.ddp = apply_ddp(self.parts[0], dp_mesh(mesh)) if dims.ddp else None
        self.normalizer = 1.0
        self.current = PLAIN[0]  # the pass being run (models/passes.py)
        self.recording = True  # loss terms are recorded in training steps, not in evaluation
        self.layout: list = []
        self.terms: dict[str, torch.Tensor] = defaultdict(self._zero)
        self.hooked = self._hooked_modules()
        for _, module in self.hooked:
            if hasattr(module, "aux_loss_scale"):
                module.aux_loss_scale = 1.0 / (n_microbatches * dims.dp * dims.cp)  # cp: chunks of a sequence
            if hasattr(module, "loss_settings"):
                module.loss_settings = self.settings
        self.schedule = None
        if dims.pp > 1:
            self.schedule = build_schedule(
                self.parts, model.stage_ids, model.n_stages, pp_schedule, n_microbatches, self._pipeline_loss,
                self.pp_group, device, quiet=self._not_recording,
            )

    @contextlib.contextmanager
    def _not_recording(self):
        recording, self.recording = self.recording, False
        try:
            yield
        finally:
            self.recording = recording

    def _zero(self) -> torch.Tensor:
        return torch.zeros((), dtype=torch.float64, device=self.device)

    def _hooked_modules(self) -> list[tuple[str, nn.Module]]:
        """Modules with auxiliary losses, post-step hooks or metrics, by plain name."""
        found, seen = [], set()
        for part in self.parts:
            for name, module in part.named_modules():
                hooked = any(hasattr(module, a) for a in ("aux_loss_scale", "loss_settings", "post_step", "step_metrics"))
                if hooked and id(module) not in seen:
                    seen.add(id(module))
                    found.append((clean_key(name), module))
        return found

    @property
    def dp_rank(self) -> int:
        return dp_mesh(self.mesh).get_local_rank() if self.mesh is not None and self.dims.dp > 1 else 0

    def local(self, batch: dict) -> dict:
        """This rank's part of a data-parallel rank's micro-batch: its zigzag chunks of every
        sequence under context parallelism (pretrain/parallel/context/zigzag.py), else all."""
        return shard_sequence(batch, self.dims.cp, self.cp_rank) if self.dims.cp > 1 else batch

    def parameters(self) -> list[nn.Parameter]:
        return [p for part in self.parts for p in part.parameters()]

    def train(self, mode: bool = True) -> None:
        for part in self.parts:
            part.train(mode)

    def loss_tokens(self, micro_batches: list[dict]) -> torch.Tensor:
        """Loss-bearing tokens of this rank's micro-batches (float64)."""
        return sum(self.spec.loss_tokens(self.local(b)) for b in micro_batches).to(torch.float64)

    def _loss(self, output, targets: dict) -> torch.Tensor:
        loss, metrics = self.spec.loss(output, targets, self.normalizer, self.settings)
        if self.recording:
            suffix = f"/{self.current.name}" if self.current.name else ""
            for name, value in metrics.items():
                if name not in _NOT_TERMS:
                    self.terms[name + suffix] += value.to(torch.float64)
            if suffix:
                self.terms["loss" + suffix] += loss.detach().to(torch.float64)
        return loss if self.current.weight == 1.0 else loss * self.current.weight

    def select(self, p: Pass) -> None:
        """Run the following forwards as pass ``p`` (models/passes.py)."""
        self.current = p
        select_pass(self.parts, p.setting)

    def _pipeline_loss(self, output, target: torch.Tensor) -> torch.Tensor:
        return self._loss(output, unpack_targets(target, self.layout))

    def _context(self):
        stack = contextlib.ExitStack()
        stack.enter_context(loss_parallel() if self.dims.tp > 1 else contextlib.nullcontext())
        stack.enter_context(self.autocast())
        return stack

    # ----------------------------------------------------------- training
    def forward_backward(
        self, micro_batches: list[dict], num_tokens: float, passes: tuple[Pass, ...] = PLAIN
    ) -> torch.Tensor:
        """Run forward and backward over the step's micro-batches (this rank's slices), once per
        pass (their weighted gradients add up); returns this rank's share of the step loss,
        Σ weight · pass loss (float64; 0 on ranks without the last stage)."""
        self.normalizer, self.recording = num_tokens, True
        if passes == PLAIN:  # the model as built: nothing to select
            return self._one_pass(micro_batches, last_pass=True)
        total = self._zero()
        try:
            for k, p in enumerate(passes):
                self.select(p)
                total += self._one_pass(micro_batches, last_pass=k == len(passes) - 1)
        finally:
            self.select(PLAIN[0])
        return total

    def _one_pass(self, micro_batches: list[dict], last_pass: bool) -> torch.Tensor:
        if self.schedule is not None:
            return self._pipeline_step(micro_batches, train=True)
        return self._sequential_step(micro_batches, last_pass)

    def _sequential_step(self, micro_batches: list[dict], last_pass: bool) -> torch.Tensor:
        total = self._zero()
        model = self.ddp or self.parts[0]
        for i, batch in enumerate(micro_batches):
            last = last_pass and i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if self.ddp is None or last else self.ddp.no_sync()
            batch = self.local(batch)
            args, kwargs = self.spec.inputs(batch)
            with sync, self._context():
                loss = self._loss(model(*args, **kwargs), self.spec.targets(batch))
                loss.backward()
            total += loss.detach().to(torch.float64)
        return total

    def _pipeline_step(self, micro_batches: list[dict], train: bool) -> torch.Tensor:
        micro_batches = [self.local(mb) for mb in micro_batches]
        batch = {key: torch.cat([mb[key] for mb in micro_batches]) for key in micro_batches[0]}
        args, kwargs = self.spec.inputs(batch)
        args = args if self.model.has_first else ()
        losses: list[torch.Tensor] = []
        target = None
        if self.model.has_last:
            target, self.layout = pack_targets(self.spec.targets(batch))
        run = self.schedule.step if train else self.schedule.eval
        with self._context():
            run(*args, target=target, losses=losses if self.model.has_last else None, **kwargs)
        total = self._zero()
        for loss in losses:
            total += loss.detach().to(torch.float64)
        return total

    @torch.no_grad()
    def eval_loss_sum(self, micro_batches: list[dict]) -> torch.Tensor:
        """Summed per-token loss over ``micro_batches`` (float64; 0 off the last stage) of the
        selected pass. With a pipeline, pass as many micro-batches as a training step has."""
        self.normalizer, self.recording = 1.0, False
        if self.schedule is not None:
            return self._pipeline_step(micro_batches, train=False)
        total = self._zero()
        for batch in micro_batches:
            batch = self.local(batch)
            args, kwargs = self.spec.inputs(batch)
            with self._context():
                total += self._loss(self.parts[0](*args, **kwargs), self.spec.targets(batch)).to(torch.float64)
        return total

    def take_loss_terms(self) -> dict[str, torch.Tensor]:
        """The loss terms (``ce_loss``, ``z_loss``...) summed since the last call, reduced like the
        loss; collective."""
        names = sorted(self.terms)
        if self.pp_group is not None:  # only the rank holding the last stage computed them
            seen: list = [None] * self.dims.pp
            dist.all_gather_object(seen, names, group=self.pp_group)
            names = sorted(set().union(*seen))
        values = {name: self.reduce_loss(self.terms[name].clone()) for name in names}
        self.terms.clear()
        return values

    # ----------------------------------------------------------- reductions
    def reduce_dp(self, value: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum (or max) over the data-parallel ranks, in place."""
        if self.dp_group is not None:
            dist.all_reduce(value, op=_REDUCE_OPS[op], group=self.dp_group)
        return value

    def reduce_loss(self, value: torch.Tensor) -> torch.Tensor:
        """Sum a per-rank loss share over data-parallel ranks and pipeline stages, in place."""
        self.reduce_dp(value)
        if self.pp_group is not None:
            dist.all_reduce(value, group=self.pp_group)
        return value

    def clip_grad_norm_(self, max_norm: float) -> float:
        return clip_grad_norm_(self.parameters(), max_norm, self.pp_group)

    # ----------------------------------------------------------- module hooks
    def post_step(self) -> None:
        """Every module's ``post_step`` hook, after an applied optimizer step (collective)."""
        for _, module in self.hooked:
            if hasattr(module, "post_step"):
                module.post_step(self.reduce_dp)

    def module_metrics(self) -> dict[str, float]:
        """Every module's ``step_metrics``, named ``<module>/<metric>``, from every pipeline
        stage (collective)."""
        metrics = {}
        for name, module in self.hooked:
            if hasattr(module, "step_metrics"):
                for key, value in module.step_metrics(self.reduce_dp).items():
                    metrics[f"{name}/{key}"] = float(value)
        if self.pp_group is not None:
            gathered: list = [None] * self.dims.pp
            dist.all_gather_object(gathered, metrics, group=self.pp_group)
            metrics = {k: v for stage in gathered for k, v in stage.items()}
        return metrics
