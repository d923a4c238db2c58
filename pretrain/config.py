"""The run's configuration: one typed tree, loaded from a YAML preset plus dotted overrides.

    pretrain train --config configs/tiny.yaml train.max_steps=50 optim.lr=3e-4 run.dir=runs/x

Sections: ``run``, ``model`` (a family's config, tagged by ``model.family``: models/config.py), ``data`` (data.loader.DataConfig),
``optim``, ``schedule``, ``train``, ``parallel`` (pretrain.parallel.config.ParallelConfig),
``checkpoint``, ``logging``. ``validate`` checks every
section and the cross-section rules and raises one ConfigError listing each problem with its fix,
before anything heavy (data preparation, model allocation) starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from data.loader import DataConfig
from models.config import ModelConfig
from models.configtree import ConfigError, apply_overrides, from_dict, load_yaml, to_dict
from models.decoder.config import DecoderConfig
from models.passes import eval_passes
from pretrain.metrics import LoggingConfig
from pretrain.optim import OptimConfig, ScheduleConfig
from pretrain.parallel.config import ParallelConfig
from pretrain.parallel.mesh import layout_errors
from pretrain.parallel.recompute import RECOMPUTE_MODES

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_PRESET = "tiny"


@dataclass
class RunConfig:
    dir: str = "runs/default"
    seed: int = 1234


@dataclass
class TrainConfig:
    """``global_batch`` sequences per optimizer step, cut into ``micro_batch`` sequences per
    forward/backward on each data-parallel rank (gradient accumulation makes up the rest).
    ``recompute`` (none | selective | op | full, see pretrain/parallel/recompute.py) applies to
    the blocks whose index is a multiple of ``recompute_every``."""

    max_steps: int = 1000
    global_batch: int = 32
    micro_batch: int = 4
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    z_loss: float = 0.0
    eval_interval: int = 0
    eval_batches: int = 8
    max_bad_steps: int = 5
    recompute: Literal["none", "selective", "op", "full"] = "none"
    recompute_every: int = 1

    def validate(self) -> list[str]:
        errors = []
        if self.recompute not in RECOMPUTE_MODES:
            errors.append(f"train.recompute must be one of {', '.join(RECOMPUTE_MODES)}; got {self.recompute!r}")
        if self.recompute_every < 1:
            errors.append(f"train.recompute_every must be >= 1 (1: every block), got {self.recompute_every}")
        for name in ("max_steps", "global_batch", "micro_batch", "eval_batches", "max_bad_steps"):
            if getattr(self, name) <= 0:
                errors.append(f"train.{name} must be > 0, got {getattr(self, name)}")
        if self.eval_interval < 0:
            errors.append(f"train.eval_interval must be >= 0 (0 disables validation), got {self.eval_interval}")
        if self.z_loss < 0:
            errors.append(f"train.z_loss must be >= 0, got {self.z_loss}")
        return errors


@dataclass
class CheckpointConfig:
    """``resume``: ``auto`` continues from the run directory's latest complete checkpoint when
    there is one (when its files differ from what was written, from the newest intact one before
    it, with a warning; an error when none is intact); ``none`` starts fresh (refusing to overwrite an existing run's checkpoints);
    a path resumes from that checkpoint."""

    interval: int = 500
    keep_last: int = 3
    resume: str = "auto"

    def validate(self) -> list[str]:
        errors = []
        if self.interval < 0:
            errors.append(f"checkpoint.interval must be >= 0 (0 saves only at the end), got {self.interval}")
        if self.keep_last < 1:
            errors.append(f"checkpoint.keep_last must be >= 1, got {self.keep_last}")
        return errors


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=DecoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    init_from: str | None = None  # set as model.init_from=DIR (pretrain/convert/init.py)

    def to_dict(self) -> dict:
        return to_dict(self)


def resolve_preset(name_or_path: str | None) -> Path:
    """A YAML path, or the name of a preset in ``configs/`` (``tiny``, ``125m``, ``350m``, ``1b``)."""
    if name_or_path is None:
        name_or_path = DEFAULT_PRESET
    path = Path(name_or_path)
    if path.is_file():
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if preset.is_file():
        return preset
    known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
    raise ConfigError(f"config {name_or_path!r} is neither a YAML file nor a preset (presets: {known})")


def load_config(name_or_path: str | None = None, overrides: list[str] = ()) -> Config:
    from pretrain.convert.init import apply_init_from

    tree = apply_overrides(load_yaml(resolve_preset(name_or_path)), list(overrides))
    tree = apply_init_from(tree, list(overrides))
    config = from_dict(Config, tree)
    validate(config)
    return config


def validate_data(data: DataConfig) -> list[str]:
    errors = []
    if data.seq_len < 1:
        errors.append(f"data.seq_len must be >= 1, got {data.seq_len}")
    if data.num_workers < 0:
        errors.append(f"data.num_workers must be >= 0 (0 loads in the training process), got {data.num_workers}")
    if data.prefetch_factor < 1:
        errors.append(f"data.prefetch_factor must be >= 1, got {data.prefetch_factor}")
    return errors


def validate(config: Config, world_size: int | None = None) -> None:
    """Check every section and the cross-section rules, the parallel layout against a world of
    ``world_size`` ranks included (None: the rules that need no world size); raise one
    ConfigError listing every problem."""
    errors: list[str] = []
    errors.extend(config.model.problems())
    if not errors:
        try:
            eval_passes(config.model)
        except ValueError as e:
            errors.append(f"model: {e}")
    errors.extend(validate_data(config.data))
    for section in (config.optim, config.schedule, config.train, config.checkpoint, config.logging):
        errors.extend(section.validate())
    train = config.train
    dims, problems = layout_errors(
        config.parallel, config.model, world_size, global_batch=train.global_batch,
        micro_batch=train.micro_batch, seq_len=config.data.seq_len,
    )
    errors.extend(problems)
    if not problems and dims.pp > 1 and train.eval_interval:
        per_step = train.global_batch // (dims.dp * train.micro_batch)
        if train.eval_batches % per_step:
            errors.append(
                f"train.eval_batches ({train.eval_batches}) must be a multiple of the {per_step} micro-batches of a "
                "step with pipeline parallelism (validation runs through the same schedule)"
            )
    if config.data.seq_len > config.model.max_seq_len:
        errors.append(
            f"data.seq_len ({config.data.seq_len}) exceeds model.max_seq_len ({config.model.max_seq_len}); "
            "lower data.seq_len or raise model.max_seq_len"
        )
    if config.schedule.warmup_steps >= train.max_steps and config.schedule.kind != "constant":
        errors.append(
            f"schedule.warmup_steps ({config.schedule.warmup_steps}) must be below train.max_steps "
            f"({train.max_steps}) for a decaying schedule"
        )
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))
