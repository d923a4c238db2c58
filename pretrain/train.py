"""The training loop. Read top to bottom: setup, resume, then one optimizer step at a time.

One optimizer step consumes ``train.global_batch`` sequences: each data-parallel rank takes its
contiguous slice, in micro-batches of ``train.micro_batch``. The loss is normalised by the number
of loss-bearing tokens in the whole global batch (summed over micro-batches and data-parallel
ranks) before backward, so any layout and any micro-batch size give the same gradients as one
process doing the whole batch at once.

The model is built through pretrain/parallel (``parallel:`` section): the device mesh, this
rank's pipeline stages ("parts", each with its optimizer and schedule), tensor/sequence
parallelism, recomputation, FSDP2/DDP; ``ParallelRunner`` runs each step's forward/backward.
"""

from __future__ import annotations

import functools
import math
import resource
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from data.loader import build_loader
from models.counting import mfu, training_flops_per_token
from models.passes import PLAIN, eval_passes, train_passes
from models.spec import get_spec
from pretrain.banner import run_banner
from pretrain.builtin_data import resolve_data
from pretrain.checkpoint import CheckpointManager, seed_rng
from pretrain.config import Config, validate
from pretrain.distributed import DistInfo, any_rank, barrier, init_distributed, shutdown
from pretrain.errors import TrainingError
from pretrain.metrics import MetricsLogger
from pretrain.optim import build_optimizer, build_scheduler
from pretrain.parallel.mesh import ParallelDims, build_mesh
from pretrain.parallel.parallelize import build_parts
from pretrain.parallel.runtime import ParallelRunner
from pretrain.report import write_report
from pretrain.signals import EXIT_CHECKPOINTED_FOR_REQUEUE, StopRequest
from pretrain.storage_order import check_storage_order


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    tokens: int
    flops: float  # training FLOPs of the step (every pass)
    skipped: bool
    data_wait: float


def uses_bf16(config: Config, device: torch.device) -> bool:
    """bf16 compute on GPU (``auto`` or ``bf16``); plain fp32 on CPU unless ``bf16`` is asked."""
    return config.train.dtype == "bf16" or (config.train.dtype == "auto" and device.type == "cuda")


def autocast_context(config: Config, device: torch.device):
    """bf16 autocast over fp32 master weights when ``uses_bf16``, else nothing."""
    if uses_bf16(config, device):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated accelerator memory, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class Trainer:
    def __init__(self, config: Config, dist: DistInfo, preset: str | None = None) -> None:
        self.config = config
        self.preset = preset
        self.dist = dist
        validate(config, world_size=dist.world_size)
        self.run_dir = Path(config.run.dir)
        self.data = resolve_data(config, dist)
        seed_rng(config.run.seed)

        self.dims = ParallelDims.resolve(config.parallel, dist.world_size)
        mesh = build_mesh(self.dims, dist.device.type) if dist.distributed else None
        # With FSDP2, bf16 is its mixed-precision policy (bf16 gathered parameters, fp32 gradient
        # reduction) instead of autocast.
        fsdp_bf16 = self.dims.fsdp and uses_bf16(config, dist.device)
        model = build_parts(
            config.model, config.parallel, self.dims, mesh, dist.device, recompute=config.train.recompute,
            recompute_every=config.train.recompute_every, param_dtype=torch.bfloat16 if fsdp_bf16 else None,
            seed=config.run.seed,
        )
        self.parts = model.parts
        self.grad_accum = config.train.global_batch // (config.train.micro_batch * self.dims.dp)
        self.runner = ParallelRunner(
            model, self.dims, mesh, dist.device, n_microbatches=self.grad_accum,
            pp_schedule=config.parallel.pp_schedule, z_loss=config.train.z_loss,
            autocast=nullcontext if fsdp_bf16 else lambda: autocast_context(config, dist.device),
        )
        self.optimizers = [build_optimizer(part, config.optim) for part in self.parts]
        self.schedulers = [build_scheduler(o, config.train.max_steps, config.schedule) for o in self.optimizers]

        dp, dp_rank = self.dims.dp, self.runner.dp_rank
        family_task = get_spec(config.model).task
        task = functools.partial(family_task, config.model) if family_task is not None else None
        self.train_loader = build_loader(
            self.data, "train", dp_rank=dp_rank, dp_size=dp, global_batch=config.train.global_batch,
            micro_batch=config.train.micro_batch, num_samples=config.train.max_steps * config.train.global_batch,
            task=task,
        )
        self.valid_loader = None
        if config.train.eval_interval:
            eval_batch = config.train.micro_batch * dp
            self.valid_loader = build_loader(
                self.data, "valid", dp_rank=dp_rank, dp_size=dp, global_batch=eval_batch,
                micro_batch=config.train.micro_batch, num_samples=config.train.eval_batches * eval_batch, task=task,
            )
        self.checkpoints = CheckpointManager(
            self.run_dir / "checkpoints", keep_last=config.checkpoint.keep_last, seed=config.run.seed
        )
        self.step = 0
        self.saved_step: int | None = None
        self.bad_steps = 0
        self.loss_terms: dict[str, float] = {}

    @property
    def model(self):
        """The first model part: the whole model without pipeline parallelism."""
        return self.parts[0]

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The first part's optimizer (the only one without pipeline parallelism)."""
        return self.optimizers[0]

    @property
    def scheduler(self):
        """The first part's schedule; every part's is at the same step."""
        return self.schedulers[0]

    # ----------------------------------------------------------------- resume
    def resume(self) -> Path | None:
        """Restore the checkpoint all ranks agree on (``checkpoint.resume``: the latest, none or a
        path; rank 0 decides); returns its path, or None for a fresh run."""
        path = self.checkpoints.choose(self.config.checkpoint.resume)
        if path is None:
            return None
        check_storage_order(path, self.config.model)
        extra = self.checkpoints.load(path, self.parts, self.optimizers)
        for scheduler in self.schedulers:
            scheduler.load_state_dict(extra["scheduler"])
        self.train_loader.load_state_dict(extra["train_loader"])
        self.step = self.saved_step = int(extra["step"])
        return path

    def save(self) -> Path:
        extra = {
            "step": self.step,
            "scheduler": self.scheduler.state_dict(),
            "train_loader": self.train_loader.state_dict(),
            "config": self.config.to_dict(),
        }
        path = self.checkpoints.save(self.step, self.parts, self.optimizers, extra)
        self.saved_step = self.step
        self.log.message(f"saved checkpoint {path}")
        return path

    # ------------------------------------------------------------------- step
    def train_step(self) -> StepResult:
        waited = time.perf_counter()
        micro_batches = [to_device(next(self.train_iter), self.dist.device) for _ in range(self.grad_accum)]
        waited = time.perf_counter() - waited
        num_tokens = float(self.runner.reduce_dp(self.runner.loss_tokens(micro_batches)).item())
        passes = train_passes(self.config.model, self.step, self.config.run.seed)
        loss_share = self.runner.forward_backward(micro_batches, num_tokens, passes)
        loss_value = float(self.runner.reduce_loss(loss_share).item())
        self.loss_terms = {name: float(v) for name, v in self.runner.take_loss_terms().items()}

        grad_norm = self.runner.clip_grad_norm_(self.config.optim.grad_clip)
        skipped = not (math.isfinite(loss_value) and math.isfinite(grad_norm))
        if skipped:
            self.bad_steps += 1
            self.log.message(
                f"step {self.step + 1}: non-finite loss ({loss_value}) or gradient norm ({grad_norm}); "
                f"skipping the update ({self.bad_steps} in a row)"
            )
            if self.bad_steps >= self.config.train.max_bad_steps:
                raise TrainingError(
                    f"{self.bad_steps} consecutive steps had a non-finite loss or gradient; stopping. "
                    "Lower optim.lr, raise schedule.warmup_steps, or check the data around this step"
                )
        else:
            self.bad_steps = 0
            for optimizer in self.optimizers:
                optimizer.step()
            self.runner.post_step()
        for optimizer, scheduler in zip(self.optimizers, self.schedulers):
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        self.step += 1
        tokens = self.config.train.global_batch * self.config.data.seq_len
        flops = self.step_flops(micro_batches, passes)
        return StepResult(
            loss=loss_value, grad_norm=grad_norm, tokens=tokens, flops=flops, skipped=skipped, data_wait=waited
        )

    def step_flops(self, micro_batches: list, passes) -> float:
        """Training FLOPs of one step over the global batch (MFU): the family's ``row_flops`` of
        the rows seen (models/spec.py), else ``data.seq_len`` × the per-token count."""
        model, global_batch = self.config.model, self.config.train.global_batch
        row_flops = get_spec(model).row_flops
        if row_flops is None:
            seq_len = self.config.data.seq_len
            return global_batch * seq_len * sum(training_flops_per_token(model, seq_len, p.setting) for p in passes)
        rows = [sum(row_flops(model, batch, p.setting) for p in passes) for batch in micro_batches]
        return global_batch * sum(rows) / len(rows)

    def evaluate(self) -> dict[str, float]:
        """Validation loss of the model as built (``valid_loss``) and, for models with
        evaluation passes (models/passes.py), of each pass (``valid_loss/<pass>``)."""
        out = {}
        passes = eval_passes(self.config.model)
        for p in passes if passes != PLAIN else ():
            self.runner.select(p)
            out[f"valid_loss/{p.name}"] = self._valid_loss()
            if p.setting is None:
                out["valid_loss"] = out[f"valid_loss/{p.name}"]
        self.runner.select(PLAIN[0])
        if "valid_loss" not in out:
            out["valid_loss"] = self._valid_loss()
        return out

    @torch.no_grad()
    def _valid_loss(self) -> float:
        self.runner.train(False)
        self.valid_loader.consumed_samples = 0  # the same validation batches every time
        loader = iter(self.valid_loader)
        batches = [to_device(next(loader), self.dist.device) for _ in range(self.config.train.eval_batches)]
        # A pipeline runs as many micro-batches at once as a training step has.
        group = self.grad_accum if self.dims.pp > 1 else 1
        loss = torch.zeros((), dtype=torch.float64, device=self.dist.device)
        for start in range(0, len(batches), group):
            loss += self.runner.eval_loss_sum(batches[start : start + group])
        tokens = self.runner.loss_tokens(batches)
        self.runner.reduce_loss(loss)
        self.runner.reduce_dp(tokens)
        self.runner.train(True)
        return float(loss / tokens.clamp(min=1))

    # ------------------------------------------------------------------- loop
    def fit(self) -> int:
        config = self.config
        stop = StopRequest().install()
        resumed_from = self.resume()
        if resumed_from is None and config.init_from:
            from pretrain.convert.init import load_initial_weights

            loaded = load_initial_weights(self.parts, config.init_from, self.run_dir, config.model)
            resumed_from = f"{loaded} (model.init_from, weights only)"
        self.log = MetricsLogger(
            self.run_dir, config.logging, config.train.max_steps, self.step, config.to_dict(),
            is_main=self.dist.is_main,
        )
        try:
            if self.dist.is_main:
                self.config_file().write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
            for line in run_banner(config, self.dims, self.data.paths, resumed_from, self.step, self.preset):
                self.log.message(line)
            self.train_iter = iter(self.train_loader)
            window = {"tokens": 0, "flops": 0.0, "time": 0.0, "data": 0.0}
            while self.step < config.train.max_steps:
                started = time.perf_counter()
                result = self.train_step()
                window["time"] += time.perf_counter() - started
                window["tokens"] += result.tokens
                window["flops"] += result.flops
                window["data"] += result.data_wait
                if self.step % config.logging.interval == 0 or self.step == config.train.max_steps:
                    self.log.log({**self.metrics(result, window), **self.loss_terms, **self.runner.module_metrics()})
                    window = {"tokens": 0, "flops": 0.0, "time": 0.0, "data": 0.0}
                if self.valid_loader is not None and self.step % config.train.eval_interval == 0:
                    self.log.log({"step": self.step, **self.evaluate()})
                if any_rank(stop.requested, self.dist.device):
                    self.save()
                    self.log.message(
                        f"stop requested ({stop.signal_name or 'on another rank'}): checkpointed at step "
                        f"{self.step}; exiting with {EXIT_CHECKPOINTED_FOR_REQUEUE} so the job can be requeued"
                    )
                    return EXIT_CHECKPOINTED_FOR_REQUEUE
                if config.checkpoint.interval and self.step % config.checkpoint.interval == 0:
                    self.save()
            if self.saved_step != self.step:
                self.save()
            run_dir = self.run_dir.resolve()
            if self.dist.is_main:  # metrics.jsonl is line-buffered: complete on disk
                write_report([run_dir], run_dir / "report")
            self.log.message(
                f"done: {self.step} steps. Run directory {run_dir}: metrics.jsonl, report/, config.yaml, "
                f"checkpoints/ (latest: {self.checkpoints.latest()}). Sample from it with:\n"
                f"  pretrain generate --checkpoint {run_dir / 'checkpoints'} --prompt \"And God said\""
            )
            return 0
        finally:
            stop.uninstall()
            self.log.close()

    def config_file(self) -> Path:
        return self.run_dir / "config.yaml"

    def metrics(self, result: StepResult, window: dict) -> dict:
        elapsed = max(window["time"], 1e-9)
        tokens_per_s = window["tokens"] / elapsed
        per_device = tokens_per_s / self.dist.world_size
        flops_per_token = window["flops"] / max(window["tokens"], 1)
        device_name = torch.cuda.get_device_name(self.dist.device) if self.dist.device.type == "cuda" else None
        return {
            "step": self.step,
            "loss": result.loss,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": result.grad_norm,
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_device": per_device,
            "tflops": per_device * flops_per_token / 1e12,
            "mfu": mfu(per_device, flops_per_token, device_name),
            "peak_mem_gib": peak_memory_gib(self.dist.device),
            "data_wait_s": window["data"],
            "skipped": result.skipped,
        }


def train(config: Config, preset: str | None = None) -> int:
    dist = init_distributed()
    trainer = Trainer(config, dist, preset)
    code = trainer.fit()
    barrier()
    shutdown()
    return code
