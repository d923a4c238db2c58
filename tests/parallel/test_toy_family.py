"""A model family defined entirely in this file, registered only here, trained by the project's
generic machinery under every kind of layout with the results of one process.

The ``toy`` family: blocks alternate two mixer kinds (the registered ``attention`` and a
``toy_shift`` kind defined below), every block also writes into a second stream (``memory``) so
that every pipeline boundary carries the tuple (hidden, memory), and a per-block ``Probe`` gates
the residual update, adds an auxiliary loss and keeps a statistic that a post-step hook folds
into a running average over the data-parallel ranks (a buffer, so checkpoints carry it).

The reference is a plain single-process loop: the LM loss from models.loss plus the auxiliary
terms recomputed by hand from the probes' inputs (each micro-batch weighted by its share of the
global batch), clipping in fp64, and the running average updated by hand.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import causal_lm
from models.attention.layer import AttentionConfig, prepare_self_attention
from models.aux_loss import attach_aux_loss
from models.config import MixerConfig, ModelConfig
from models.context import ForwardContext
from models.counting import param_counts, training_flops_per_token
from models.ffn.swiglu import SwiGLU
from models.linear import Linear
from models.loss import language_model_loss
from models.norm import RMSNorm
from models.plans import Colwise, GatherInputs, LocalInputs, Replicated, Rowwise, Tokenwise, VocabEmbedding, VocabHead
from models.rope import rope_tables
from models.spec import KindSpec, ModelSpec, build_mixer, registered
from pretrain.checkpoint import CheckpointManager
from pretrain.names import clean_key
from pretrain.parallel.config import ParallelConfig
from tests.parallel.launch import run_ranks
from tests.parallel.workloads import GLOBAL_BATCH, SEED, ParallelTraining, reference_run

# ----------------------------------------------------------------------------- the family


@dataclass
class ShiftConfig(MixerConfig):
    kind: str = "toy_shift"
    width: int = 96

    def problems(self, prefix: str, d_model: int) -> list[str]:
        return [] if self.width > 0 else [f"{prefix}.width must be positive"]

    def tp_sizes(self, prefix: str, d_model: int) -> dict[str, int]:
        return {f"{prefix}.width": self.width}


class Shift(nn.Module):
    """out = wo(silu(wa·x) ⊙ previous(wb·x)): each position mixes in the previous position of
    its own document (ctx.segments)."""

    def __init__(self, d_model: int, width: int):
        super().__init__()
        self.wa, self.wb, self.wo = Linear(d_model, width), Linear(d_model, width), Linear(width, d_model)

    def init_weights(self, std: float, out_std: float) -> None:
        for w in (self.wa, self.wb):
            nn.init.normal_(w.weight, std=std)
        nn.init.normal_(self.wo.weight, std=out_std)

    def tp_plan(self) -> dict:
        return {"wa": Colwise(), "wb": Colwise(), "wo": Rowwise()}

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        b = self.wb(x)
        previous = torch.cat([torch.zeros_like(b[:, :1]), b[:, :-1]], dim=1)
        if ctx.segments is not None:
            same = torch.ones_like(ctx.segments, dtype=torch.bool)
            same[:, 1:] = ctx.segments[:, 1:] == ctx.segments[:, :-1]
            previous = previous * same[..., None]
        return self.wo(F.silu(self.wa(x)) * previous)


class Probe(nn.Module):
    """out = y · sigmoid(gate·y) / 2; auxiliary loss mean(sigmoid(gate·y)²); ``peak`` keeps the
    step's largest gate (a maximum over tokens: the same under recomputation, in any order and
    for any micro-batch size), and the post-step hook folds the data-parallel maximum into
    ``average``."""

    def __init__(self, d_model: int):
        super().__init__()
        self.gate = nn.Linear(d_model, 1, bias=False)
        self.aux_loss_scale = 1.0
        self.register_buffer("peak", torch.zeros(()))
        self.register_buffer("average", torch.zeros(()))

    def tp_plan(self) -> dict:
        return {"": LocalInputs((True,)), "gate": Replicated()}

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.gate(y))
        aux = g.square().mean()
        if torch.is_grad_enabled():
            self.peak.copy_(torch.maximum(self.peak, g.detach().max()))
        return attach_aux_loss(y * g / 2, aux, self.aux_loss_scale)

    def post_step(self, reduce) -> None:
        self.average.mul_(0.5).add_(reduce(self.peak.clone(), "max"), alpha=0.5)
        self.peak.zero_()

    def step_metrics(self, reduce) -> dict:
        return {"average": self.average}


class ToyBlock(nn.Module):
    def __init__(self, mixer: nn.Module, d_model: int, d_ff: int, eps: float):
        super().__init__()
        self.mixer_norm, self.mixer = RMSNorm(d_model, eps), mixer
        self.ffn_norm, self.ffn = RMSNorm(d_model, eps), SwiGLU(d_model, d_ff)
        self.probe = Probe(d_model)
        self.write = nn.Linear(d_model, d_model, bias=False)

    def tp_plan(self) -> dict:
        return {
            "mixer_norm": Tokenwise(), "mixer": GatherInputs((True, False)), "ffn_norm": Tokenwise(),
            "ffn": GatherInputs((True,)), "write": Tokenwise(),
        }

    def forward(self, h, memory, ctx):
        h = h + self.mixer(self.mixer_norm(h), ctx)
        y = self.ffn_norm(h)
        return h + self.ffn(y) + self.probe(y), memory + self.write(y)


@dataclass
class ToyConfig(ModelConfig):
    family: str = "toy"
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 4
    d_ff: int = 128
    max_seq_len: int = 32
    attention: MixerConfig = field(default_factory=lambda: AttentionConfig(n_heads=4, n_kv_heads=2))
    shift: MixerConfig = field(default_factory=ShiftConfig)

    @property
    def n_blocks(self) -> int:
        return self.n_layers

    def problems(self) -> list[str]:
        return [*self.attention.problems("model.attention", self.d_model), *self.shift.problems("model.shift", 64)]

    def tp_sizes(self) -> dict[str, int]:
        return {
            "model.vocab_size": self.vocab_size, "model.d_ff": self.d_ff,
            **self.attention.tp_sizes("model.attention", self.d_model), **self.shift.tp_sizes("model.shift", 64),
        }


class Toy(nn.Module):
    """embed → blocks carrying (h, memory) → norm(h + memory) → head."""

    def __init__(self, config: ToyConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        self.embed = nn.Embedding(config.vocab_size, d)
        mixers = [config.attention if i % 2 == 0 else config.shift for i in range(config.n_layers)]
        self.layers = nn.ModuleDict(
            {str(i): ToyBlock(build_mixer(m, d, i), d, config.d_ff, 1e-5) for i, m in enumerate(mixers)}
        )
        self.norm, self.head = RMSNorm(d, 1e-5), Linear(d, config.vocab_size)
        self.init_weights()

    def block_names(self) -> list[str]:
        return [f"layers.{key}" for key in self.layers]

    def pipeline_units(self) -> list[tuple[str, ...]]:
        units = [(name,) for name in self.block_names()]
        return [("embed", *units[0]), *units[1:-1], (*units[-1], "norm", "head")]

    def tp_plan(self) -> dict:
        return {"embed": VocabEmbedding(), "norm": Tokenwise(), "head": VocabHead()}

    @torch.no_grad()
    def init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=1 / math.sqrt(module.weight.shape[-1]))
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
        for name, buffer in self.named_buffers():
            buffer.zero_()

    def forward(self, x, memory=None, position_ids=None, doc_ids=None):
        if self.embed is not None:
            x = self.embed(x)
            memory = torch.zeros_like(x)
        mixers = [block.mixer for block in self.layers.values()]
        ctx = ForwardContext(
            rope={16: rope_tables(position_ids, 16, 10000.0, torch.float32)},
            attention=prepare_self_attention(mixers, x.shape[1], 0, doc_ids, position_ids.device),
            segments=doc_ids,
        )
        for block in self.layers.values():
            x, memory = block(x, memory, ctx)
        if self.head is None:
            return x, memory
        return self.head(self.norm(x + memory))


SPEC = ModelSpec(
    name="toy", config=ToyConfig, build=Toy, inputs=causal_lm.inputs, targets=causal_lm.targets,
    loss_tokens=causal_lm.loss_tokens, loss=causal_lm.loss,
)
SHIFT = KindSpec("toy_shift", ShiftConfig, lambda config, d_model, layer_id: Shift(d_model, config.width))
CONFIG = ToyConfig()


def toy_registered():
    return registered(families=(SPEC,), mixers=(SHIFT,))


# ----------------------------------------------------------------------------- the reference

STEPS = 3
MICRO = 2


def reference(steps: int) -> tuple[list, list[dict]]:
    """Losses and gradient norms per step of one process, and each probe's running average
    after every step."""
    hooked: dict[str, list[torch.Tensor]] = {}
    peaks: list[dict[str, float]] = []

    def toy_loss(model, mb, tokens, share):
        if not hooked:  # first call: record every probe's input
            for name, module in model.named_modules():
                if isinstance(module, Probe):
                    module.aux_loss_scale = 0.0  # the auxiliary terms are added below, by hand
                    hooked[name] = []
                    module.register_forward_pre_hook(lambda m, args, name=name: hooked[name].append(args[0]))
        for inputs in hooked.values():
            inputs.clear()
        if len(peaks) * (GLOBAL_BATCH // MICRO) == toy_loss.calls:
            peaks.append({})
        toy_loss.calls += 1
        logits = model(mb["input_ids"], position_ids=mb["position_ids"], doc_ids=mb["doc_ids"])
        lm = language_model_loss(logits, mb["labels"], mb["loss_mask"], normalizer=tokens)[0]
        total = lm
        for name, inputs in hooked.items():
            gate = model.get_submodule(name).gate
            g = torch.sigmoid(inputs[0] @ gate.weight.t())
            peaks[-1][name] = max(peaks[-1].get(name, 0.0), float(g.detach().max()))
            total = total + share * g.square().mean()
        return total, lm

    toy_loss.calls = 0
    history = reference_run(steps, MICRO, model_config=CONFIG, step_loss=toy_loss)
    averages, running = [], {}
    for step_peaks in peaks:
        running = {name: 0.5 * running.get(name, 0.0) + 0.5 * peak for name, peak in step_peaks.items()}
        averages.append(running)
    return history, averages


# ----------------------------------------------------------------------------- the layouts

LAYOUTS = {
    "tp2_sp": (dict(tp=2, sp=True), 2),
    "tp2": (dict(tp=2, sp=False), 2),
    "pp2_1f1b": (dict(pp=2, pp_schedule="1f1b"), 2),
    "pp2_zbv": (dict(pp=2, pp_schedule="zbv", virtual_stages=2), 1),
    "fsdp2": (dict(), 2),
    "ddp2": (dict(dp_replicate=2, dp_shard=1), 2),
    "fsdp2_selective": (dict(), 2, "selective"),
    "tp2_sp_op": (dict(tp=2), 2, "op"),
    "pp2_full": (dict(pp=2), 2, "full"),
    "fsdp2_compiled": (dict(compile=True, compile_backend="aot_eager"), 2),
}


def _averages(training: ParallelTraining) -> dict:
    """Each block's running average, by block name, from this rank's stages."""
    return {
        clean_key(name).removesuffix(".probe.average"): float(buffer)
        for part in training.parts.parts
        for name, buffer in part.named_buffers()
        if name.endswith("average")
    }


def train_toy(rank: int, world: int, names: list[str]) -> dict:
    results = {}
    with toy_registered():
        for name in names:
            fields, micro, *recompute = LAYOUTS[name]
            training = ParallelTraining(world, ParallelConfig(**fields), micro, *recompute, model_config=CONFIG)
            history = [training.step(step) for step in range(STEPS)]
            terms = {k: float(v) for k, v in training.runner.take_loss_terms().items()}
            results[name] = (history, _averages(training), training.runner.module_metrics(), terms)
    return results


def save_then_resume(rank: int, world: int, directory: str) -> dict:
    """Three steps under PP2 (1F1B), a checkpoint, then two more steps resumed under TP2+SP."""
    with toy_registered():
        first = ParallelTraining(world, ParallelConfig(pp=2, pp_schedule="1f1b"), 2, model_config=CONFIG)
        history = [first.step(step) for step in range(3)]
        manager = CheckpointManager(directory, seed=SEED)
        path = manager.save(3, first.parts.parts, first.optimizers, {"step": 3})
        second = ParallelTraining(world, ParallelConfig(tp=2, sp=True), 2, model_config=CONFIG)
        manager.load(path, second.parts.parts, second.optimizers)
        restored = _averages(second)
        history += [second.step(step) for step in range(3, 5)]
        return {"history": history, "restored": restored, "averages": _averages(second)}


# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def expected():
    with toy_registered():
        return reference(5)


@pytest.fixture(scope="module")
def trained():
    return run_ranks(2, train_toy, list(LAYOUTS))


def check_history(history, reference_history):
    assert len(history) == len(reference_history)
    for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(history, reference_history)):
        assert loss == pytest.approx(ref_loss, abs=1e-5), f"step {step + 1}"
        assert norm == pytest.approx(ref_norm, rel=1e-4), f"step {step + 1}"


def test_the_reference_learns(expected):
    history, averages = expected
    assert history[-1][0] < history[0][0] - 0.05
    assert len(averages[-1]) == CONFIG.n_layers and all(0 < a < 1 for a in averages[-1].values())


def check_averages(averages: dict, reference: dict) -> None:
    for block, value in averages.items():
        assert value == pytest.approx(reference[f"{block}.probe"], abs=1e-6), block


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_one_process(name, trained, expected):
    reference_history, reference_averages = expected
    for per_rank in trained:
        history, averages, metrics, terms = per_rank[name]
        check_history(history, reference_history[:STEPS])
        # The loss terms recorded over the 3 steps (ce_loss, z_loss), reduced like the loss;
        # pipeline schedules' shape-inference runs are not counted.
        assert terms["ce_loss"] == pytest.approx(sum(loss for loss, _ in reference_history[:STEPS]), abs=1e-5)
        assert terms["z_loss"] == 0.0
        # The post-step hook ran once per step on every rank holding the block, with the maximum
        # over data-parallel ranks: the same running average as one process.
        assert averages
        check_averages(averages, reference_averages[STEPS - 1])
        # The hooks' metrics from every pipeline stage reach every rank.
        assert sorted(metrics) == [f"layers.{i}.probe/average" for i in range(CONFIG.n_layers)]
        for key, value in metrics.items():
            assert value == pytest.approx(reference_averages[STEPS - 1][key.split("/")[0]], abs=1e-6)


def test_checkpoint_resumes_under_another_layout(expected):
    with tempfile.TemporaryDirectory() as directory:
        results = run_ranks(2, save_then_resume, directory)
    reference_history, reference_averages = expected
    for result in results:
        check_history(result["history"], reference_history)
        check_averages(result["restored"], reference_averages[2])  # the buffers came back
        check_averages(result["averages"], reference_averages[4])
    assert len(set().union(*(r["averages"] for r in results))) == CONFIG.n_layers


def test_counts_come_from_the_modules():
    """Parameters and FLOPs by hand: per block attention (q, o: d·d; k, v: d·d/2) or shift
    (3·d·w), SwiGLU 3·d·f, the probe's gate d, the write d·d, two norms 2·d; embedding, final
    norm, head."""
    with toy_registered():
        d, f, w, v, s = 64, 128, 96, 256, 32
        attention, shift = 2 * d * d + 2 * d * d // 2, 3 * d * w
        common = 3 * d * f + d + d * d
        blocks = 2 * (attention + common + 2 * d) + 2 * (shift + common + 2 * d)
        assert param_counts(CONFIG).total == v * d + blocks + d + v * d
        linear = 2 * (attention + common) + 2 * (shift + common) + v * d
        core = 2 * round(4 * 4 * 16 * s / 2)  # two attention blocks, causal over S/2 keys
        assert training_flops_per_token(CONFIG, s) == 3 * (2 * linear + core)


def test_config_errors_of_the_toy_family():
    with toy_registered():
        config = ModelConfig.from_dict({"family": "toy", "shift": {"kind": "toy_shift", "width": 32}})
        assert config.shift.width == 32
        with pytest.raises(Exception, match=r"'model.shift.window' is not a field of model.shift kind 'toy_shift'"):
            ModelConfig.from_dict({"family": "toy", "shift": {"kind": "toy_shift", "window": 3}})
    with pytest.raises(Exception, match="'toy' is unknown"):
        ModelConfig.from_dict({"family": "toy"})
