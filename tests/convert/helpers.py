"""Checkpoints to convert, written by our own checkpoint manager from a real model."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from models.attention.layer import AttentionConfig
from models.configtree import to_dict
from models.decoder.config import DecoderConfig
from models.ffn.swiglu import SwiGLUConfig
from models.spec import build_model
from pretrain.checkpoint import CheckpointManager


def decoder_config(tie: bool = False, vocab: int = 4096) -> DecoderConfig:
    return DecoderConfig(
        vocab_size=vocab, d_model=64, n_layers=2, max_seq_len=64, rope_theta=5000.0, norm_eps=1e-6,
        tie_embeddings=tie, mixer=AttentionConfig(n_heads=4, n_kv_heads=2), ffn=SwiGLUConfig(d_ff=96),
    )


def random_model(config, seed: int = 0) -> torch.nn.Module:
    """A model with every parameter random (norm gains too, so a mis-mapped norm shows)."""
    torch.manual_seed(seed)
    model = build_model(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model


def save_run(run_dir: Path, model, step: int = 7, tokenizer: Path | None = None) -> Path:
    """A run directory as the trainer leaves it: checkpoints/step_N (model only) + tokenizer."""
    path = CheckpointManager(run_dir / "checkpoints").save(step, model, extra_state={"config": {"model": to_dict(model.config)}, "step": step})
    if tokenizer is not None:
        shutil.copyfile(tokenizer, run_dir / tokenizer.name)
    return path
