"""What the multi-process tests run: a tiny decoder, learnable packed batches, an independent
single-process training loop (the reference), and the same training under a parallel layout.

The reference runs the model and a loss by hand (the decoder's: models.loss; another family's:
``step_loss``) with a plain fp64 clipping rule; the layouts run the trainer's machinery
(pretrain.parallel: build_parts, ParallelRunner, clipping, the family's spec)."""

from __future__ import annotations

import dataclasses

import torch

from models.attention.layer import AttentionConfig
from models.decoder.config import DecoderConfig
from models.ffn.swiglu import SwiGLUConfig
from models.loss import language_model_loss
from models.passes import train_passes
from models.spec import build_model
from pretrain.optim import OptimConfig, build_optimizer
from pretrain.parallel.config import ParallelConfig
from pretrain.parallel.mesh import build_mesh, check_layout
from pretrain.parallel.parallelize import build_parts
from pretrain.parallel.runtime import ParallelRunner

TINY = DecoderConfig(
    vocab_size=256, d_model=64, n_layers=4, max_seq_len=32, mixer=AttentionConfig(n_heads=4, n_kv_heads=2),
    ffn=SwiGLUConfig(d_ff=128),
)
GLOBAL_BATCH, SEQ, SEED, MAX_NORM = 8, 32, 0, 1.0


def variant(config: DecoderConfig, mixer: dict | None = None, ffn: dict | None = None, **fields) -> DecoderConfig:
    """``config`` with some of its own, its mixer's and its FFN's fields changed."""
    return dataclasses.replace(
        config,
        mixer=dataclasses.replace(config.mixer, **(mixer or {})),
        ffn=dataclasses.replace(config.ffn, **(ffn or {})),
        **fields,
    )
OPTIM = OptimConfig(lr=3e-3)


def global_batch(step: int, batch: int = GLOBAL_BATCH, seq: int = SEQ, vocab: int = TINY.vocab_size) -> dict:
    """Packed rows of documents whose tokens follow t → 5t + 3 (mod vocab) from a random start,
    positions restarting per document, ~15% of positions masked out of the loss."""
    g = torch.Generator().manual_seed(1000 + step)
    starts = torch.rand(batch, seq + 1, generator=g) < 0.08
    starts[:, 0] = True
    doc_ids = starts.long().cumsum(1) - 1
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    position = torch.zeros(batch, seq + 1, dtype=torch.long)
    for t in range(1, seq + 1):
        same = ~starts[:, t]
        tokens[:, t] = torch.where(same, (5 * tokens[:, t - 1] + 3) % vocab, tokens[:, t])
        position[:, t] = torch.where(same, position[:, t - 1] + 1, 0)
    mask = (torch.rand(batch, seq, generator=g) > 0.15).long()
    return {
        "input_ids": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "position_ids": position[:, :-1],
        "doc_ids": doc_ids[:, :-1],
        "loss_mask": mask,
    }


def cut(batch: dict, start: int, size: int) -> dict:
    return {k: v[start : start + size] for k, v in batch.items()}


@torch.no_grad()
def clip_reference(model: torch.nn.Module, max_norm: float) -> float:
    """torch's clipping rule (scale by min(1, max_norm / (norm + 1e-6))) with the norm in fp64."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = float(sum(g.double().pow(2).sum() for g in grads) ** 0.5)
    scale = max_norm / (norm + 1e-6)
    if scale < 1:
        for g in grads:
            g.mul_(scale)
    return norm


def decoder_loss(model, mb: dict, tokens: float, share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(what to backpropagate, the reported loss) of one micro-batch of the decoder: summed
    cross entropy over the global batch's ``tokens`` (``share``, the micro-batch's fraction of
    the global batch, weighs auxiliary losses in families that have them)."""
    logits = model(mb["input_ids"], position_ids=mb["position_ids"], doc_ids=mb["doc_ids"])
    loss = language_model_loss(logits, mb["labels"], mb["loss_mask"], normalizer=tokens)[0]
    return loss, loss


def reference_run(
    steps: int, micro: int, model_config=TINY, step_loss=decoder_loss, batches=global_batch
) -> list[tuple[float, float]]:
    """(loss, grad norm) per step of one process training the whole global batch in
    micro-batches, with ``step_loss`` and a plain fp64 clipping rule only."""
    with torch.device("meta"):
        model = build_model(model_config)
    model.to_empty(device="cpu")
    torch.manual_seed(SEED)
    model.init_weights()
    optimizer = build_optimizer(model, OPTIM)
    history = []
    for step in range(steps):
        batch = batches(step)
        tokens = float(batch["loss_mask"].sum())
        total = 0.0
        for start in range(0, GLOBAL_BATCH, micro):
            loss, reported = step_loss(model, cut(batch, start, micro), tokens, micro / GLOBAL_BATCH)
            loss.backward()
            total += float(reported.detach())
        norm = clip_reference(model, MAX_NORM)
        optimizer.step()
        optimizer.zero_grad()
        history.append((total, norm))
    return history


class ParallelTraining:
    """The tiny model under one layout on this rank: parts, runner and optimizers."""

    def __init__(
        self,
        world: int,
        parallel: ParallelConfig,
        micro: int,
        recompute: str = "none",
        every: int = 1,
        model_config=TINY,
        batches=global_batch,
    ):
        self.model_config, self.batches = model_config, batches
        dims = check_layout(parallel, model_config, world, global_batch=GLOBAL_BATCH, micro_batch=micro, seq_len=SEQ)
        self.mesh = build_mesh(dims, "cpu")
        self.dims, self.micro = dims, micro
        device = torch.device("cpu")
        self.parts = build_parts(
            model_config, parallel, dims, self.mesh, device, recompute=recompute, recompute_every=every, seed=SEED
        )
        self.runner = ParallelRunner(
            self.parts, dims, self.mesh, device, n_microbatches=GLOBAL_BATCH // (dims.dp * micro),
            pp_schedule=parallel.pp_schedule,
        )
        self.optimizers = [build_optimizer(part, OPTIM) for part in self.parts.parts]

    def local_micro_batches(self, step: int) -> tuple[list[dict], float]:
        batch = self.batches(step)
        per_rank = GLOBAL_BATCH // self.dims.dp
        mine = cut(batch, self.runner.dp_rank * per_rank, per_rank)
        return [cut(mine, i, self.micro) for i in range(0, per_rank, self.micro)], float(batch["loss_mask"].sum())

    def step(self, step: int) -> tuple[float, float]:
        micro_batches, tokens = self.local_micro_batches(step)
        passes = train_passes(self.model_config, step, SEED)
        loss = self.runner.reduce_loss(self.runner.forward_backward(micro_batches, tokens, passes))
        norm = self.runner.clip_grad_norm_(MAX_NORM)
        for optimizer in self.optimizers:
            optimizer.step()
        self.runner.post_step()
        for optimizer in self.optimizers:
            optimizer.zero_grad()
        return float(loss), norm


def train_layouts(
    rank: int, world: int, layouts: dict[str, tuple], steps: int, model_config=TINY, batches=global_batch
) -> dict:
    """Train each named layout — (ParallelConfig fields, micro-batch[, recompute mode[, every]])
    — for ``steps`` steps on ``batches(step)`` (default: packed GPT rows)."""
    results = {}
    for name, (fields, micro, *recompute) in layouts.items():
        training = ParallelTraining(
            world, ParallelConfig(**fields), micro, *recompute, model_config=model_config, batches=batches
        )
        results[name] = [training.step(step) for step in range(steps)]
    return results
